#!/usr/bin/env python3
"""One block's MLP in training, forward and backward, by how its matmuls run: FP8 against bfloat16.

  python3 tools/bench/fp8_mlp_bench.py                     # on a GPU: the model's shape, 98,304 tokens
  python3 tools/bench/fp8_mlp_bench.py --modes "bf16 row" --tokens 49152

Each mode runs the MLP as the training graph does, its input made by the RMSNorm before it, compiled:
  fused   FUSED_MLP's Triton kernels (bfloat16; the default's path)
  bf16    the two products through cuBLAS, LeakyReLU² between them
  tensor  FP8_MATMULS=1: both products in FP8 with a scale per operand
  row     FP8_MATMULS=1 FP8_SCALING=row: a scale per row, dL/dW in bfloat16
and reports the median time of forward + backward (CUDA events) with the input's and both weights' gradients,
and each mode's output and gradients against the bf16 mode's (relative norm of the difference). The step bench
(bench_step.py) times the whole model; this one times the casts where they are made, in a few seconds of
compilation per mode. On a CPU it runs without compiling, at a small size, for the tests ("fused" needs CUDA).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train_gpt as tg  # noqa: E402
from gpu_timing import median_ms  # noqa: E402

MODES = ("fused", "bf16", "tensor", "row")


def mlp_for(mode: str, dim: int, mult: int, device: torch.device) -> tg.MLP:
    torch.manual_seed(0)
    mlp = tg.MLP(tg.Hyperparameters(model_dim=dim, mlp_mult=mult)).to(device).train()
    mlp.fused = mode == "fused"
    mlp.up.fp8 = mlp.down.fp8 = mode if mode in ("tensor", "row") else ""
    return mlp


def run(mlp: tg.MLP, x: torch.Tensor, grad_out: torch.Tensor, step) -> list[torch.Tensor]:
    """Output, dL/dx, dL/dW_up, dL/dW_down of one forward + backward."""
    x = x.detach().requires_grad_()
    for p in mlp.parameters():
        p.grad = None
    with tg.autocast_bf16(x.device):
        y = step(x)
    y.backward(grad_out)
    return [y.detach().float(), x.grad.float(), mlp.up.weight.grad.float(), mlp.down.weight.grad.float()]


def bench(modes: list[str], tokens: int, dim: int, mult: int, reps: int, device: torch.device,
          report=lambda mode, result: None) -> dict:
    """{mode: {"ms": median ms of forward + backward (None on a CPU), "errors": [output, dx, dW_up, dW_down] against
    bf16's}}; report(mode, result) as each mode finishes."""
    g = torch.Generator(device="cpu").manual_seed(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(tokens, dim, generator=g).to(device, dtype)
    grad_out = (torch.randn(tokens, dim, generator=g) / dim).to(device, dtype)
    results, reference = {}, None
    for mode in ["bf16"] + [m for m in modes if m != "bf16"]:
        mlp = mlp_for(mode, dim, mult, device)

        def forward(inp, mlp=mlp):
            return mlp(tg.rms_norm(inp))

        step = torch.compile(forward) if device.type == "cuda" else forward
        out = run(mlp, x, grad_out, step)
        reference = reference or out
        errors = [((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(out, reference)]
        ms = median_ms(lambda: run(mlp, x, grad_out, step), device, reps, warmup=2) if device.type == "cuda" else None
        if mode in modes:
            results[mode] = {"ms": ms, "errors": errors}
            report(mode, results[mode])
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=" ".join(MODES), help=f"of {', '.join(MODES)}, separated by spaces")
    ap.add_argument("--tokens", type=int, default=48 * 2048, help="rows: tokens per micro-step (default 98,304)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--mult", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    modes = args.modes.split()
    if not modes or any(m not in MODES for m in modes):
        raise SystemExit(f"--modes {args.modes!r}: use some of {', '.join(MODES)}")
    device = tg.configure_device(0, 1)  # the run's TF32 and compiler options on CUDA
    if "fused" in modes and (device.type != "cuda" or tg.triton is None):
        raise SystemExit("mode fused needs CUDA and Triton: leave it out of --modes here")
    if any(m in modes for m in ("tensor", "row")) and not tg.scaled_mm_runs(device):
        raise SystemExit(f"torch._scaled_mm does not run on {device}: leave tensor and row out of --modes")
    print(f"MLP of one block on {device}: {args.tokens} tokens, {args.dim} → {args.mult * args.dim} → {args.dim}")
    print("| mode | ms forward + backward | output / dx / dW_up / dW_down against bf16 (relative) |")
    print("|---|---|---|", flush=True)

    def report(mode: str, r: dict) -> None:
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "–"
        print(f"| {mode} | {ms} | {' / '.join(f'{e:.1e}' for e in r['errors'])} |", flush=True)

    bench(modes, args.tokens, args.dim, args.mult, args.reps, device, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
