#!/usr/bin/env python3
"""Muon's orthogonalisation per optimizer step: plain Polar Express against Gram Newton–Schulz (MUON_BACKEND).

  python3 tools/bench/ns_bench.py                      # on a GPU: bfloat16, CUDA events, the model's real shapes
  python3 tools/bench/ns_bench.py --world-sizes 1,8 --reps 50
  python3 tools/bench/ns_bench.py --cpu-smoke          # tiny shapes on the CPU, for the tests: checked, barely timed

The inputs are Muon's buckets: every block matrix of one shape stacked (11 layers × q and o 512×512, k and v
256×512, MLP up 2048×512 and down 512×2048 at the default settings), each rank orthogonalising its share of
ceil(count / world size) matrices per bucket, as Muon does. Each input is row-normalised like MuonEq-R's, with one
of two spectra: "gaussian" (random, condition ≈ 3) and "decaying" (singular values log-spaced over three decades,
closer to real momentum, where the bfloat16 error of the Gram form shows). Inputs are float32, like Muon's
updates, so the times include the conversion to bfloat16 that training does too.

For each backend and step count this prints the milliseconds per optimizer step (all buckets, one rank's share),
the matmul GFLOP it ran (counted by torch's FlopCounterMode), the time per bucket shape, and against float64
references: the largest elementwise deviation from the polar factor U·Vᵀ and from float64 Polar Express at the
same step count (bfloat16 rounding alone), and the band [min, max] of the result's singular values. Gram and
polar compute the same polynomial, so at equal steps they should agree up to rounding; the time decides the
default (MUON_BACKEND=gram only if it is faster at equal quality, i.e. at equal MUON_NS_STEPS).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train_gpt as tg  # noqa: E402

SPECTRA = ("gaussian", "decaying")
DECAYING_DECADES = 3  # "decaying": singular values from 1 down to 10^-3
SMOKE_SCALE = 8  # --cpu-smoke: every dimension divided by this
SMOKE_LAYERS = 2


def bucket_shapes(h: tg.Hyperparameters, scale: int = 1) -> list[tuple[int, int, int]]:
    """(matrices, rows, cols) of each Muon bucket of the model `h` describes, dimensions divided by `scale`."""
    dim = h.model_dim // scale
    kv_dim = h.num_kv_heads * (h.model_dim // h.num_heads) // scale
    hidden = h.mlp_mult * dim
    layers = h.num_layers
    return [(2 * layers, dim, dim),  # attention q and proj
            (2 * layers, kv_dim, dim),  # attention k and v
            (layers, hidden, dim),  # MLP up
            (layers, dim, hidden)]  # MLP down


def random_updates(count: int, rows: int, cols: int, spectrum: str, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """`count` float32 matrices (Muon's update dtype) with the given spectrum, each row scaled to unit norm
    (MuonEq-R). Drawn on the CPU, so both devices see the same inputs; built on `device`."""
    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device)

    if spectrum == "decaying":
        k = min(rows, cols)
        left, right = torch.linalg.qr(draw(count, rows, k)).Q, torch.linalg.qr(draw(count, cols, k)).Q
        s = torch.logspace(0, -DECAYING_DECADES, k, dtype=torch.float64, device=device)
        x = (left * s) @ right.mT
    else:
        x = draw(count, rows, cols)
    return (x / x.norm(dim=-1, keepdim=True)).float()


def wide(y: torch.Tensor) -> torch.Tensor:
    return y if y.size(-2) <= y.size(-1) else y.mT


def polar_factor(x: torch.Tensor) -> torch.Tensor:
    """U·Vᵀ in float64, as (W·Wᵀ)^(-1/2)·W for the wide orientation W = U·S·Vᵀ: an eigendecomposition of the small
    Gram matrix instead of an SVD of the whole matrix (the same factor; far cheaper at 2048 columns)."""
    w = wide(x.double())
    eigenvalues, vectors = torch.linalg.eigh(w @ w.mT)
    polar = (vectors * eigenvalues.rsqrt().unsqueeze(-2)) @ vectors.mT @ w
    return polar if x.size(-2) <= x.size(-1) else polar.mT


def singular_band(y: torch.Tensor) -> tuple[float, float]:
    w = wide(y.double())
    s = torch.linalg.eigvalsh(w @ w.mT).clamp(min=0).sqrt()
    return s.min().item(), s.max().item()


def time_ms(fn, reps: int, warmup: int, device: torch.device) -> float:
    """Mean milliseconds of fn() over `reps` calls after `warmup` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / reps
    start_s = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start_s) * 1000 / reps


def bench_case(inputs: list[torch.Tensor], references: list[dict], backend: str, steps: int, args,
               device: torch.device) -> dict:
    dtype = torch.bfloat16

    def run(x):
        return tg.orthogonalise(x, steps, dtype, backend, args.gram_min_aspect)

    per_shape = [time_ms(lambda x=x: run(x), args.reps, args.warmup, device) for x in inputs]
    with FlopCounterMode(display=False) as counter:  # the products actually run, to set against the time
        for x in inputs:
            run(x)
    dev_polar = dev_pe = 0.0
    low, high = math.inf, 0.0
    for x, ref in zip(inputs, references):
        y = run(x).double()
        dev_polar = max(dev_polar, (y - ref["polar"]).abs().max().item())
        dev_pe = max(dev_pe, (y - ref[f"pe{steps}"]).abs().max().item())
        band = singular_band(y)
        low, high = min(low, band[0]), max(high, band[1])
    return dict(ms=sum(per_shape), per_shape=per_shape, gflop=counter.get_total_flops() / 1e9, dev_polar=dev_polar,
                dev_pe=dev_pe, band=(low, high))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (for tests)")
    parser.add_argument("--world-sizes", default="8,1", help="ranks sharing each bucket (8: the record's share)")
    parser.add_argument("--steps", default="4,5", help="Newton–Schulz step counts to compare")
    parser.add_argument("--spectra", default=",".join(SPECTRA))
    parser.add_argument("--gram-min-aspect", type=float, default=tg.Hyperparameters.muon_gram_min_aspect)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    h = tg.Hyperparameters()
    if args.cpu_smoke:
        device, scale, h.num_layers = torch.device("cpu"), SMOKE_SCALE, SMOKE_LAYERS
        args.reps, args.warmup = min(args.reps, 2), min(args.warmup, 1)
    elif torch.cuda.is_available():
        device, scale = torch.device("cuda"), 1
    else:
        raise SystemExit("no CUDA device: run on a GPU, or pass --cpu-smoke")
    shapes = bucket_shapes(h, scale)
    steps_list = [int(s) for s in args.steps.split(",")]
    print(f"device:{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} dtype:bfloat16 "
          f"buckets:{' '.join(f'{n}x{r}x{c}' for n, r, c in shapes)} gram_min_aspect:{args.gram_min_aspect}")
    generator = torch.Generator().manual_seed(args.seed)
    for spectrum in args.spectra.split(","):
        for world in (int(w) for w in args.world_sizes.split(",")):
            shares = [(-(-n // world), r, c) for n, r, c in shapes]
            inputs = [random_updates(k, r, c, spectrum, generator, device) for k, r, c in shares]
            references = [dict(polar=polar_factor(x), **{f"pe{s}": tg.polar_express(x.double(), s, torch.float64)
                                                           for s in steps_list}) for x in inputs]
            print(f"spectrum:{spectrum} world_size:{world} share:{' '.join(f'{k}x{r}x{c}' for k, r, c in shares)}")
            for steps in steps_list:
                for backend in tg.MUON_BACKENDS:
                    res = bench_case(inputs, references, backend, steps, args, device)
                    print(f"  backend:{backend:5s} steps:{steps} ms_per_step:{res['ms']:.3f} gflop:{res['gflop']:.2f} "
                          f"per_shape_ms:{','.join(f'{t:.3f}' for t in res['per_shape'])} "
                          f"max_dev_polar_factor:{res['dev_polar']:.4f} max_dev_fp64_polar_express:{res['dev_pe']:.4f} "
                          f"sv_band:[{res['band'][0]:.3f},{res['band'][1]:.3f}]")


if __name__ == "__main__":
    main()
