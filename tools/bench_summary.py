#!/usr/bin/env python3
"""Summarise train_gpt.py logs: median ms per step, tokens/s, model FLOP utilisation, val_bpb, bytes.

  python3 tools/bench_summary.py logs/RUN.txt [...]
"""
import re
import statistics
import sys

PEAK_BF16_TFLOPS = 798.0  # an 8192³ bf16 matmul on this workplace's H100 (device KINDS.md, 2026-11-13)


def read_settings(lines):
    settings = dict(kv.split("=", 1) for kv in lines[0].split() if "=" in kv)
    return {k: v for k, v in settings.items()}


def flops_per_token(s, params):
    """6·N for the matmuls (embedding counted once, as the tied head) plus causal attention's score and value products."""
    layers, dim, seq = int(s["num_layers"]), int(s["model_dim"]), int(s["train_seq_len"])
    return 6 * params + 6 * layers * seq * dim  # 3 passes × 2 products × 2 flops × seq/2 (causal) × dim


def summarise(path):
    lines = open(path, encoding="utf-8").read().splitlines()
    s = read_settings(lines)
    out = {"run": path}
    steps = [(int(m[1]), float(m[2])) for m in (re.match(r"step:(\d+)/\d+ train_loss:\S+ train_time:(\d+)ms", l) for l in lines) if m]
    params = next((int(l.split(":")[1]) for l in lines if l.startswith("model_params:")), None)
    gaps = [(t2 - t1) / (s2 - s1) for (s1, t1), (s2, t2) in zip(steps, steps[1:]) if s1 >= 5]
    if gaps and params:
        ms = statistics.median(gaps)
        tokens = int(s["train_batch_tokens"])
        out.update(steps_timed=len(gaps), ms_per_step=round(ms, 1), tokens_per_s=round(tokens / ms * 1000),
                   mfu_pct=round(100 * flops_per_token(s, params) * tokens / (ms / 1000) / PEAK_BF16_TFLOPS / 1e12, 1))
    for l in lines:
        for key, pattern in (("compile_s", r"compile_warmup_time:([\d.]+)s"), ("peak_mem_mib", r"peak memory allocated: (\d+) MiB"),
                             ("steps", r"pre_quant_ema step:(\d+)"), ("pre_quant_bpb", r"pre_quant_ema .*val_bpb:([\d.]+)"),
                             ("pre_quant_eval_s", r"pre_quant_ema .*eval_time:(\d+)ms"),
                             ("quant_compress_s", r"quantize_compress_time:([\d.]+)s"),
                             ("model_bytes", r"Serialized model \S+: (\d+) bytes"), ("code_bytes", r"Code size \(packed\): (\d+) bytes"),
                             ("total_bytes", r"Total submission size \S+: (\d+) bytes"),
                             ("roundtrip_bpb", r"roundtrip_exact val_loss:\S+ val_bpb:([\d.]+)"),
                             ("roundtrip_eval_s", r"roundtrip val_loss.*eval_time:(\d+)ms")):
            m = re.search(pattern, l)
            if m:
                out[key] = m.group(1)
    for key in ("pre_quant_eval_s", "roundtrip_eval_s"):
        if key in out:
            out[key] = round(int(out[key]) / 1000, 1)
    if "pre_quant_bpb" in out and "roundtrip_bpb" in out:
        out["quant_gap"] = round(float(out["roundtrip_bpb"]) - float(out["pre_quant_bpb"]), 5)
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(" ".join(f"{k}={v}" for k, v in summarise(path).items()))
