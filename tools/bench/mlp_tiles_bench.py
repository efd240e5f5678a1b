#!/usr/bin/env python3
"""Tile configurations of FUSED_MLP's Triton matmul against cuBLAS, at the MLP's real shapes.

  python3 tools/bench/mlp_tiles_bench.py                                   # on a GPU: the default set of tiles
  python3 tools/bench/mlp_tiles_bench.py --tiles "128,256,64,8,3 128,128,64,4,4" --tokens 98304

One micro-step of the model runs, per block, the up-projection with LeakyReLU(0.5)² in its epilogue
(forward: x · W_upᵀ, M = tokens, K = MODEL_DIM, N = hidden) and the product dL/da = dL/dout · W_down with the
activation's derivative in its epilogue (backward). For each tile configuration (BLOCK_M, BLOCK_N, BLOCK_K,
warps, stages) this checks both against a float32 reference (a configuration that computes wrong results is
reported as such, never timed as a winner), then times them with CUDA events. The baseline is what FUSED_MLP=0
runs: the same products through cuBLAS, plus the compiled elementwise activation (forward) and derivative
(backward). The fastest correct configuration is the one to put in train_gpt.py's MLP_TILES.
On a CPU it runs in Triton's interpreter (TRITON_INTERPRET=1), for the tests: results are checked, not timed.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train_gpt as tg  # noqa: E402
from gpu_timing import median_ms  # noqa: E402

DEFAULT_TILES = ("128,128,64,8,3", "128,128,64,4,4", "128,256,64,8,3", "128,256,64,8,4", "256,128,64,8,3",
                 "64,256,64,4,4", "128,64,64,4,4")


def parse_tiles(text: str) -> tuple[int, ...]:
    try:
        tiles = tuple(int(v) for v in text.split(","))
    except ValueError:
        tiles = ()
    if len(tiles) != 5 or min(tiles) < 1:
        raise SystemExit(f"tiles {text!r}: need five positive integers BLOCK_M,BLOCK_N,BLOCK_K,warps,stages")
    return tiles


def reference(x: torch.Tensor, w_up: torch.Tensor, g: torch.Tensor, w_down: torch.Tensor):
    """(h, a, dL/dh) in float32 from the same bfloat16 inputs; h is rounded to bfloat16 as the kernel stores it."""
    h = (x.float() @ w_up.float().T).to(torch.bfloat16).float()
    a = torch.where(h > 0, h, 0.5 * h).square()
    grad_h = (g.float() @ w_down.float()) * torch.where(h > 0, 2 * h, 0.5 * h)
    return h, a, grad_h


def bench(tiles_list: list[tuple[int, ...]], tokens: int, dim: int, hidden: int, reps: int,
          device: torch.device) -> dict:
    """{"baseline": {...}, "rows": [{"tiles", "ok", "max_rel_error", "forward_ms", "backward_ms", ...}]}."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, dim, generator=g).to(device, torch.bfloat16)
    w_up = (torch.randn(hidden, dim, generator=g) / dim ** 0.5).to(device, torch.bfloat16)
    w_down = (torch.randn(dim, hidden, generator=g) / hidden ** 0.5).to(device, torch.bfloat16)
    grad_out = torch.randn(tokens, dim, generator=g).to(device, torch.bfloat16)
    h_ref, a_ref, grad_h_ref = reference(x, w_up, grad_out, w_down)
    flops = 2 * tokens * dim * hidden  # each of the two products

    compiled = device.type == "cuda"
    act = torch.compile(lambda h: torch.nn.functional.leaky_relu(h, 0.5).square()) if compiled else \
        (lambda h: torch.nn.functional.leaky_relu(h, 0.5).square())
    dact = torch.compile(lambda ga, h: ga * torch.where(h > 0, 2 * h, 0.5 * h)) if compiled else \
        (lambda ga, h: ga * torch.where(h > 0, 2 * h, 0.5 * h))
    h_bf = h_ref.to(torch.bfloat16)
    baseline = {"forward_ms": median_ms(lambda: act(x @ w_up.T), device, reps),
                "backward_ms": median_ms(lambda: dact(grad_out @ w_down, h_bf), device, reps),
                "matmul_ms": median_ms(lambda: x @ w_up.T, device, reps)}
    rows = []
    for tiles in tiles_list:
        h = torch.empty(tokens, hidden, device=device, dtype=torch.bfloat16)
        a, grad_h = torch.empty_like(h), torch.empty_like(h)
        row = {"tiles": ",".join(map(str, tiles))}
        try:
            tg._mlp_matmul_launch(x, w_up.t(), h, a, backward=False, tiles=tiles)
            tg._mlp_matmul_launch(grad_out, w_down, h, grad_h, backward=True, tiles=tiles)
        except Exception as exc:  # e.g. out of shared memory for these tiles: reported, not fatal
            rows.append({**row, "ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
            continue
        errors = [((got.float() - want).norm() / want.norm()).item()
                  for got, want in ((h, h_ref), (a, a_ref), (grad_h, grad_h_ref))]
        row.update(ok=max(errors) < 2e-2, max_rel_error=max(errors))
        if row["ok"]:
            row["forward_ms"] = median_ms(lambda: tg._mlp_matmul_launch(x, w_up.t(), h, a, False, tiles), device, reps)
            row["backward_ms"] = median_ms(lambda: tg._mlp_matmul_launch(grad_out, w_down, h, grad_h, True, tiles),
                                          device, reps)
            row["tflops"] = 2 * flops / ((row["forward_ms"] + row["backward_ms"]) / 1000) / 1e12
        rows.append(row)
    baseline["tflops"] = flops / (baseline["matmul_ms"] / 1000) / 1e12
    return {"baseline": baseline, "rows": rows, "shape": (tokens, dim, hidden)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", default=" ".join(DEFAULT_TILES), help="configurations separated by spaces")
    ap.add_argument("--tokens", type=int, default=48 * 2048, help="rows: tokens per micro-step (default 98,304)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if tg.triton is None:
        raise SystemExit("Triton is not installed: the fused MLP kernel cannot run")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = bench([parse_tiles(t) for t in args.tiles.split()], args.tokens, args.dim, args.hidden, args.reps, device)
    base = result["baseline"]
    print(f"shape M={args.tokens} K={args.dim} N={args.hidden} on {device}; cuBLAS matmul {base['matmul_ms']:.3f} ms "
          f"({base['tflops']:.0f} TFLOP/s); unfused forward {base['forward_ms']:.3f} ms, backward {base['backward_ms']:.3f} ms")
    print("| tiles (M,N,K,warps,stages) | correct | forward ms | backward ms | fused TFLOP/s | against unfused |")
    print("|---|---|---|---|---|---|")
    unfused = base["forward_ms"] + base["backward_ms"]
    for r in result["rows"]:
        if not r["ok"]:
            why = r.get("error") or f"relative error {r['max_rel_error']:.2e}"
            print(f"| {r['tiles']} | no: {why} | | | | |")
            continue
        fused = r["forward_ms"] + r["backward_ms"]
        print(f"| {r['tiles']} | yes | {r['forward_ms']:.3f} | {r['backward_ms']:.3f} | {r['tflops']:.0f} | "
              f"{fused / unfused:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
