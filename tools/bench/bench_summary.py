#!/usr/bin/env python3
"""Summarise train_gpt.py logs: median ms per step, tokens/s, model FLOP utilisation, val_bpb, bytes.

  python3 tools/bench/bench_summary.py logs/RUN.txt [...]

Reads the logs through tools/submission/logparse.py, found from this file's place in tools/ (the job scripts
copy the whole tools/ folder).
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "submission"))
try:
    from logparse import LogFormatError, parse_log  # noqa: E402
except ImportError:  # pragma: no cover - only when copied without its parser
    raise SystemExit("bench_summary.py needs tools/submission/logparse.py: copy the whole tools/ folder")

PEAK_BF16_TFLOPS = 798.0  # an 8192³ bf16 matmul on this workplace's H100 (device KINDS.md, 2026-11-13)


def flops_per_token(s, params):
    """6·N for the matmuls (embedding counted once, as the tied head) plus causal attention's score and value products."""
    layers, dim, seq = int(s["num_layers"]), int(s["model_dim"]), int(s["train_seq_len"])
    return 6 * params + 6 * layers * seq * dim  # 3 passes × 2 products × 2 flops × seq/2 (causal) × dim


def summarise(path):
    log = parse_log(path)
    s = log.hparams
    out = {"run": path}
    steps = [(p.step, p.train_time_ms) for p in log.train]
    params = log.model_params
    gaps = [(t2 - t1) / (s2 - s1) for (s1, t1), (s2, t2) in zip(steps, steps[1:]) if s1 >= 5]
    if gaps and params:
        ms = statistics.median(gaps)
        tokens = int(s["train_batch_tokens"])
        out.update(steps_timed=len(gaps), ms_per_step=round(ms, 1), tokens_per_s=round(tokens / ms * 1000),
                   mfu_pct=round(100 * flops_per_token(s, params) * tokens / (ms / 1000) / PEAK_BF16_TFLOPS / 1e12, 1))
    # the log's own precision: 1 decimal for seconds, 4 for the rounded scores, 8 for the exact one
    fields = (("compile_s", log.compile_warmup_s, "{:.1f}"), ("peak_mem_mib", log.peak_mem_allocated_mib, "{}"),
              ("steps", log.pre_quant_step, "{}"), ("pre_quant_bpb", log.pre_quant_val_bpb, "{:.4f}"),
              ("pre_quant_eval_s", log.pre_quant_eval_ms, None), ("quant_compress_s", log.quantize_compress_s, "{:.1f}"),
              ("model_bytes", log.model_bytes, "{}"), ("code_bytes", log.code_bytes, "{}"),
              ("total_bytes", log.total_bytes, "{}"), ("roundtrip_eval_s", log.final_eval_ms, None),
              ("roundtrip_bpb", log.final_exact_val_bpb, "{:.8f}"), ("ttt_eval_s", log.ttt_eval_ms, None),
              ("ttt_bpb", log.ttt_val_bpb, "{:.8f}"))
    for key, value, fmt in fields:
        if value is not None:
            out[key] = round(value / 1000, 1) if fmt is None else fmt.format(value)
    if "pre_quant_bpb" in out and "roundtrip_bpb" in out:
        out["quant_gap"] = round(float(out["roundtrip_bpb"]) - float(out["pre_quant_bpb"]), 5)
    if not log.finished:
        out["finished"] = "no"
    return out


if __name__ == "__main__":
    status = 0
    for path in sys.argv[1:]:
        try:
            print(" ".join(f"{k}={v}" for k, v in summarise(path).items()))
        except (LogFormatError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    sys.exit(status)
