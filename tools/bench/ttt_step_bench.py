#!/usr/bin/env python3
"""Time one step of LoRA TTT (score a chunk, backward, the adapters' Adam step) on one GPU, by window shape.

  python3 tools/bench/ttt_step_bench.py          # any train_gpt.py variable applies (TTT_COMPILE_MODE, TTT_BATCH_DOCS, ...)

The model is the default one with random weights (the time does not depend on their values). Prints the
warm-up (warm_up_lora: compilation of the scoring graph and its backward), then for each BENCH_SHAPES entry
ROWSxWIDTH (default 64x2048,64x1024,64x512,64x256,16x128) the median forward / backward / optimizer milliseconds
over BENCH_REPS steps, the positions (rows × width) per second of the whole step, and the wall time of the
shape's first two steps (with CUDA graphs: its warm-up and recording). BENCH_BOUNDED=1 makes the
windows go through document-bounded attention anyway (as before TTT skipped it), to compare.
BENCH_PROFILE=ROWSxWIDTH adds the profiler's top operations at that shape, by GPU time and by host time.
BENCH_COMPILE_TIMES=1 prints, after the warm-up, where its compilation went (torch._dynamo.utils.compile_times:
seconds by compiler stage, tracing, AOT autograd, Inductor's lowering, Triton compiles and autotuning).
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train_gpt as tg  # noqa: E402


def step(lora, loss_fn, tokens, rows: int, width: int, h, timer) -> None:
    """The last chunk of a width-`width` window on `rows` documents that are all longer than it."""
    device, chunk = tokens.device, h.ttt_chunk
    first = torch.arange(rows, device=device)[:, None] * (width + 1)
    length = torch.full((rows, 1), width + 1, device=device)
    timer.start()
    lora.select_rows(rows)
    x, offsets, y, _, scored = tg.lora_chunk_inputs(tokens, first, length, width, width, chunk)
    losses = tg.lora_chunk_losses(loss_fn, x, y, offsets)
    timer.mark("forward")
    tg.adapt_on_chunk(lora, losses, scored, h, timer)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("ttt_step_bench.py measures a GPU: none is visible")
    h = tg.Hyperparameters.from_env()
    device = tg.configure_device(0, 1)  # the run's TF32 and compiler options
    reps = int(os.environ.get("BENCH_REPS", 10))
    shapes = [tuple(map(int, s.split("x"))) for s in
              os.environ.get("BENCH_SHAPES", "64x2048,64x1024,64x512,64x256,16x128").split(",")]
    torch.manual_seed(h.seed)
    model = tg.GPT(h).to(device)
    tg.use_device_paths(model, h, device)
    model.eval().requires_grad_(False)
    if os.environ.get("BENCH_BOUNDED") == "1":
        hidden = model.hidden
        model.hidden = lambda idx, one_document=False: hidden(idx)
    lora = tg.BatchedLoRA(model, h, device)
    loss_fn = tg.lora_loss_fn(lora, h, device)
    t0 = time.perf_counter()
    tg.warm_up_lora(lora, loss_fn, h, device, print)
    print(f"warm_up_s:{time.perf_counter() - t0:.1f} compile_mode:{h.ttt_compile_mode} "
          f"bounded:{os.environ.get('BENCH_BOUNDED', '0')}", flush=True)
    if os.environ.get("BENCH_COMPILE_TIMES") == "1":
        print(torch._dynamo.utils.compile_times(repr="str", aggregate=True), flush=True)
    tokens = torch.randint(0, h.vocab_size, (max(r * (w + 1) for r, w in shapes) + 2,), device=device)
    lora.active = True
    for rows, width in shapes:
        timer = tg.PartTimes(device, time.perf_counter)
        samples, first_two = [], time.perf_counter()
        for i in range(reps + 2):
            lora.start_batch()
            step(lora, loss_fn, tokens, rows, width, h, timer)
            parts = timer.collect()
            if i == 1:  # a new shape's first steps: where CUDA graphs warm up and record
                first_two = time.perf_counter() - first_two
            if i >= 2:
                samples.append(parts)
        med = {p: 1000 * statistics.median(s[p] for s in samples) for p in tg.PartTimes.PARTS}
        total = sum(med.values())
        print(f"shape {rows}x{width}: forward {med['forward']:.2f} backward {med['backward']:.2f} "
              f"optimizer {med['optimizer']:.2f} ms; {rows * width / total:.0f}K positions/s; "
              f"first two steps {first_two:.2f} s", flush=True)
    if os.environ.get("BENCH_PROFILE"):
        rows, width = map(int, os.environ["BENCH_PROFILE"].split("x"))
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                step(lora, loss_fn, tokens, rows, width, h, tg.PartTimes(device, time.perf_counter))
            torch.cuda.synchronize()
        for key in ("cuda_time_total", "self_cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))
    lora.close()


if __name__ == "__main__":
    main()
