"""Timing of one GPU operation for the kernel benches (attention_bench.py, mlp_tiles_bench.py)."""
import time

import torch


def median_ms(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median of `reps` timings of fn() in ms after `warmup` untimed calls: CUDA events around each call on a GPU;
    elsewhere one call timed by the clock (a CPU run only checks that a bench works)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - start)
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return sorted(times)[len(times) // 2]
