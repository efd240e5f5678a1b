#!/usr/bin/env python3
"""Time causal attention kernels, forward and backward, at train_gpt.py's shapes on one GPU.

  python3 tools/bench/attention_bench.py            # BENCH_SHAPES=48x2048 (training micro-step), 64x2048 (a TTT step)

For each shape (rows × tokens, 8 query and 4 key/value heads of 64 dims, bfloat16) it times:
  - sdpa_<backend>: F.scaled_dot_product_attention, causal, each backend alone (flash, cudnn, efficient),
    key/value heads repeated to the query heads, and with enable_gqa where the backend takes it;
  - varlen: train_gpt's packed variable-length kernel (FlashAttention-3 when installed, else torch's), on
    documents of FineWeb's lengths (median ~570 tokens), on one document per row, and on training's segments
    of the same documents (fixed capacity: the unused ones empty);
  - cudnn_varlen: cuDNN's ragged kernel (aten's _cudnn_attention_forward/_backward with cumulative sequence
    offsets, called eagerly here) on the same three layouts, key/value heads repeated to the query heads; its
    output and gradients are compared with varlen's on each layout. train_gpt.py does not use it: on torch 2.11
    its dq and dk were wrong and it ran ~50x slower than torch's varlen; a later torch must fix both first;
  - fa4 / fa4_varlen_<layout>: FlashAttention-4 (the flash-attn-4 package, CuTe DSL kernels with Hopper ones;
    tools/bench/fa4_wheels.sh stages it on a machine without a package index), grouped queries, causal: dense
    (its own function) and on the three packed layouts (train_gpt's custom op around it, what training runs),
    compared with SDPA flash and with torch's varlen; skipped when not installed;
  - flex_fineweb_docs: flex_attention (compiled) with a block mask of the same FineWeb-length documents;
  - sdpa_mask_fineweb_docs: SDPA with the explicit (rows, 1, T, T) document mask.
Training's segments are laid out for each BENCH_DOC_SEGMENT_TOKENS size (default "128 256 512"; the model's
default is `train_segments`, another `train_segmentsN`): a smaller capacity launches fewer empty segments.
BENCH_CASES (a regular expression, e.g. "^fa4_varlen") times only the cases it matches, and compares those whose
reference it also matches.
Milliseconds are medians over BENCH_REPS runs (CUDA events) after warm-up; a kernel that refuses a shape says why.
"""
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from gpu_timing import median_ms  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 8, 4, 64
CUDA = torch.device("cuda")


def fineweb_lengths(total: int, rng) -> list[int]:
    """Document lengths of a packed batch: log-normal around FineWeb's median (~570 tokens, mean ~950)."""
    out = []
    while sum(out) < total:
        out.append(int(max(2, rng.lognormal(np.log(570), 1.0))))
    out[-1] -= sum(out) - total
    return [n for n in out if n > 0]


def row_cut_segments(rows: int, seq: int, lengths: list[int]) -> list[int]:
    """cu_seqlens of the packed batch: every document cut also at row ends (a row never spans two)."""
    bounds, pos = {0, rows * seq}, 0
    for n in lengths:
        pos += n
        bounds.add(min(pos, rows * seq))
    bounds |= {r * seq for r in range(rows)}
    return sorted(bounds)


def train_segment_layouts(tg, starts: torch.Tensor, sizes: list[int]) -> dict[str, torch.Tensor]:
    """cu_seqlens of the batch whose document starts are `starts` (rows, seq), as training lays them out at each
    DOC_SEGMENT_TOKENS in `sizes`: the model's default is named train_segments, another size N train_segmentsN."""
    default = tg.Hyperparameters.doc_segment_tokens
    return {("train_segments" if n == default else f"train_segments{n}"):
            tg.document_segments(starts, starts.numel() // n)[0] for n in sizes}


def fwd_bwd(attn, q, k, v):
    def run():
        q.grad = k.grad = v.grad = None
        out = attn(q, k, v)
        out.backward(torch.ones_like(out))
    return run


def fwd_only(attn, q, k, v):
    def run():
        with torch.no_grad():
            attn(q, k, v)
    return run


def max_difference(attn, reference, q, k, v) -> str:
    """The largest absolute differences of the output and of the three gradients between two kernels."""
    results = []
    for fn in (attn, reference):
        q.grad = k.grad = v.grad = None
        out = fn(q, k, v)
        out.backward(torch.randn_like(out, generator=torch.Generator("cuda").manual_seed(0)))
        results.append([out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    return " ".join(f"{name}:{(a.float() - b.float()).abs().max().item():.2e}"
                    for name, a, b in zip(("out", "dq", "dk", "dv"), *results))


class CudnnRagged(torch.autograd.Function):
    """cuDNN's causal attention inside each segment of packed (tokens, heads, head_dim) tensors, contiguous, with
    as many key as query heads; the backward gets the output (contiguous) and the log-sum-exp (tokens, heads, 1)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_len):
        out, lse = torch.ops.aten._cudnn_attention_forward(
            query=q, key=k, value=v, attn_bias=None, cum_seq_q=cu_seqlens, cum_seq_k=cu_seqlens, max_q=max_len,
            max_k=max_len, compute_log_sumexp=True, dropout_p=0.0, is_causal=True)[:2]
        out = out.contiguous()
        ctx.save_for_backward(q, k, v, out, lse.view(q.size(0), q.size(1), 1), cu_seqlens)
        ctx.max_len = max_len
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        philox = torch.zeros(1, dtype=torch.int64, device=q.device)  # dropout's random state, unread at dropout 0
        grads = torch.ops.aten._cudnn_attention_backward(
            grad_out=grad.contiguous(), query=q, key=k, value=v, out=out, logsumexp=lse, philox_seed=philox,
            philox_offset=philox, attn_bias=None, cum_seq_q=cu_seqlens, cum_seq_k=cu_seqlens, max_q=ctx.max_len,
            max_k=ctx.max_len, dropout_p=0.0, is_causal=True)
        return *(g.contiguous() for g in grads), None, None


def cudnn_varlen_attention(q, k, v, cu_seqlens, max_len):
    """CudnnRagged with grouped queries: keys and values repeated to the query heads (the kernel takes no groups;
    autograd sums their gradients back over each group), all three contiguous, as the ragged offsets assume."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return CudnnRagged.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_len)


def flash_attn_4():
    """FlashAttention-4's dense causal attention, or None when the package is not installed (its varlen kernel is
    timed through train_gpt's custom op, the path training runs)."""
    try:
        from flash_attn.cute.interface import flash_attn_func
    except Exception as exc:  # noqa: BLE001 - not installed, or its CUDA libraries do not load here
        print(f"fa4: {type(exc).__name__}: {exc}")
        return None

    def first(out):  # the output, without the log-sum-exp some versions return beside it
        return out[0] if isinstance(out, tuple) else out

    def dense(q, k, v):
        return first(flash_attn_func(q, k, v, causal=True))
    return dense


def train_gpt_kernels():
    """train_gpt (for its varlen kernel and training's segments) and FlashAttention-4's custom op from it, or None.
    train_gpt's varlen then runs torch's kernel (FlashAttention-2), the reference of the comparisons, also where
    it would pick FlashAttention-4's op; that one is timed on its own (fa4_varlen_<layout>)."""
    try:
        import train_gpt as tg
    except ImportError as exc:
        print(f"varlen: {exc}")
        return None, None
    fa4_op, tg._fa4_varlen = tg._fa4_varlen, None
    if fa4_op is None:
        return tg, None
    return tg, lambda q, k, v, cu_seqlens, max_len: fa4_op(q.contiguous(), k.contiguous(), v.contiguous(),
                                                            cu_seqlens, max_len, 0)[0]


def main() -> None:
    fa4 = flash_attn_4()
    tg, fa4_varlen = train_gpt_kernels()
    reps = int(os.environ.get("BENCH_REPS", 20))
    shapes = [tuple(map(int, s.split("x"))) for s in os.environ.get("BENCH_SHAPES", "48x2048,64x2048").split(",")]
    segment_sizes = [int(n) for n in os.environ.get("BENCH_DOC_SEGMENT_TOKENS", "128 256 512").split()]
    only = re.compile(os.environ.get("BENCH_CASES", ""))
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__} {torch.cuda.get_device_name()}")
    for rows, seq in shapes:
        q = torch.randn(rows, seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(rows, seq, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(rows, seq, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cases = {}

        def sdpa(backend, gqa):
            def attn(q, k, v):
                if not gqa:
                    k, v = k.repeat_interleave(HEADS // KV_HEADS, 2), v.repeat_interleave(HEADS // KV_HEADS, 2)
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         is_causal=True, enable_gqa=gqa)
                return out.transpose(1, 2)
            return attn

        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            cases[f"sdpa_{name}"] = sdpa(backend, False)
            cases[f"sdpa_{name}_gqa"] = sdpa(backend, True)
        if fa4:
            cases["fa4"] = fa4

        lengths = fineweb_lengths(rows * seq, rng)
        cu_docs = torch.tensor(row_cut_segments(rows, seq, lengths), device="cuda", dtype=torch.int32)
        cu_rows = torch.arange(0, rows * seq + 1, seq, device="cuda", dtype=torch.int32)
        layouts = {}
        if tg is not None:
            def packed(attend, cu):
                def attn(q, k, v):
                    out = attend(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, seq)
                    return out.view(rows, seq, HEADS, HEAD_DIM)
                return attn
            starts = torch.zeros(rows * seq, dtype=torch.bool, device="cuda")
            starts[cu_docs[:-1].long()] = True
            layouts = {"fineweb_docs": cu_docs, "one_doc_per_row": cu_rows,
                       **train_segment_layouts(tg, starts.view(rows, seq), segment_sizes)}
            for layout, cu in layouts.items():
                cases[f"varlen_{layout}"] = packed(tg.varlen_causal_attention, cu)
                cases[f"cudnn_varlen_{layout}"] = packed(cudnn_varlen_attention, cu)
                if fa4_varlen is not None:
                    cases[f"fa4_varlen_{layout}"] = packed(fa4_varlen, cu)

        doc_id = torch.zeros(rows * seq, dtype=torch.int32, device="cuda")
        doc_id[cu_docs[1:-1].long()] = 1
        doc_id = doc_id.cumsum(0).view(rows, seq)
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = torch.compile(flex_attention, dynamic=False)

            def same_doc(b, h, qi, ki):
                return (qi >= ki) & (doc_id[b, qi] == doc_id[b, ki])
            block_mask = create_block_mask(same_doc, rows, None, seq, seq, device="cuda")

            def flex_docs(q, k, v):
                out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                           enable_gqa=True)
                return out.transpose(1, 2)
            cases["flex_fineweb_docs"] = flex_docs
        except Exception as exc:  # noqa: BLE001 - a bench reports what it cannot run
            print(f"flex_attention: {type(exc).__name__}: {exc}")

        mask = ((doc_id[:, :, None] == doc_id[:, None, :])
                & torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril())[:, None]

        def sdpa_mask(q, k, v):
            k, v = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
            return out.transpose(1, 2)
        cases["sdpa_mask_fineweb_docs"] = sdpa_mask

        cases = {name: attn for name, attn in cases.items() if only.search(name)}
        print(f"== {rows}x{seq}: {len(lengths)} FineWeb-length documents")
        if {"sdpa_cudnn_gqa", "sdpa_flash"} <= cases.keys():
            print(f"cudnn_gqa against flash: {max_difference(cases['sdpa_cudnn_gqa'], cases['sdpa_flash'], q, k, v)}")
        pairs = [(f"{kernel}_{layout}", f"varlen_{layout}") for layout in layouts
                 for kernel in ("cudnn_varlen", "fa4_varlen")]
        for name, reference in [("fa4", "sdpa_flash")] + pairs:
            if name not in cases or reference not in cases:
                continue
            try:
                diff = max_difference(cases[name], cases[reference], q, k, v)
            except Exception as exc:  # noqa: BLE001
                diff = f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            print(f"{name} against {reference}: {diff}")
        for name, attn in cases.items():
            try:
                fb = median_ms(fwd_bwd(attn, q, k, v), CUDA, reps, warmup=3)
                f = median_ms(fwd_only(attn, q, k, v), CUDA, reps, warmup=3)
                print(f"{name:28s} fwd+bwd {fb:7.2f} ms   fwd {f:6.2f} ms", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"{name:28s} refused: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
        del mask


if __name__ == "__main__":
    main()
