#!/usr/bin/env python3
"""Quantization benchmark: one trained float model, several ways to quantize and compress it, one table.

  python3 tools/bench/quant_bench.py --state final_model.pt                      # every configuration
  python3 tools/bench/quant_bench.py --state final_model.pt --configs rtn-e6,gptq+lqer-e7 --baselines all

The model is built from the environment's Hyperparameters, as train_gpt.py builds it (set the same
architecture switches, DATA_PATH, TOKENIZER_PATH, VOCAB_SIZE and TRAIN_BATCH_TOKENS as the run that wrote the
state dict; VAL_TOKENS_LIMIT shortens the evaluation). final_model.pt is the EMA weights a run saves before
its export. The float model is scored once. GPTQ Hessians are collected once, on GPTQ_CALIBRATION_BATCHES
training batches, exactly as a run collects them (calibration_batches + collect_hessians). Then, for each
configuration:
  quantize (quantize_state_dict) → serialize → rANS → decompress and check the bytes → dequantize → score,
and the row gives val_bpb, its gap to the float model, the artifact bytes with rANS (and with lzma-9e and
brotli-11: these take a minute or more each on a 36 MB payload, so by default only for the first
configuration), code + rANS bytes against the 16,000,000 limit, and the seconds to quantize, compress and
decompress. Runs on CUDA when there is a GPU, else on the CPU (a tiny model, e.g. PRESET=smoke).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
import train_gpt as tg  # noqa: E402

CONFIGS = {  # name → Hyperparameters fields set on top of the environment's
    "rtn-e6": {"quant_method": "rtn", "embed_bits": 6, "lqer_enabled": False},
    "rtn-e7": {"quant_method": "rtn", "embed_bits": 7, "lqer_enabled": False},
    "gptq-e6": {"quant_method": "gptq", "embed_bits": 6, "lqer_enabled": False},
    "gptq-e7": {"quant_method": "gptq", "embed_bits": 7, "lqer_enabled": False},
    "gptq+lqer-e6": {"quant_method": "gptq", "embed_bits": 6, "lqer_enabled": True},
    "gptq+lqer-e7": {"quant_method": "gptq", "embed_bits": 7, "lqer_enabled": True},
    # absmax's row grid in place of SDClip's: no clipping and finer steps, so more bytes
    "rtn-absmax-e7": {"quant_method": "rtn", "quant_grid": "absmax", "embed_bits": 7, "lqer_enabled": False},
    "gptq-absmax-e7": {"quant_method": "gptq", "quant_grid": "absmax", "embed_bits": 7, "lqer_enabled": False},
}


def timed(fn, device: torch.device):
    tg.synchronize(device)
    start = time.perf_counter()
    result = fn()
    tg.synchronize(device)
    return result, time.perf_counter() - start


def bench(state_path: str, h: tg.Hyperparameters, names: list[str], baselines: str = "first",
          device: torch.device | None = None, log=print) -> dict:
    """Score the float model and every configuration in `names`; return {"float": ..., "rows": [...]}."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = tg.GPT(h).to(device)
    model.load_state_dict(torch.load(state_path, map_location=device, weights_only=True))
    float_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    val = tg.load_validation(h, tg.load_tokenizer(h.tokenizer_path, h.vocab_size))  # as train_gpt.py's main() does
    runtime = tg.Runtime(device=device)
    compiled = h.compile and device.type == "cuda"
    loss_fn = torch.compile(model.token_losses) if compiled else model.token_losses

    def score() -> float:
        model.eval()
        return tg.evaluate_bpb(loss_fn, val, h, runtime)[1]

    float_bpb, seconds = timed(score, device)
    log(f"float val_bpb:{float_bpb:.5f} ({val.num_targets} tokens, {seconds:.1f}s{', compiling' if compiled else ''})")
    hessians = None
    if any(CONFIGS[n]["quant_method"] == "gptq" for n in names):
        hessians, seconds = timed(lambda: tg.collect_hessians(model, tg.calibration_batches(h, runtime), device), device)
        log(f"gptq hessians: {h.gptq_calibration_batches} batches of {h.train_batch_tokens} tokens, {seconds:.1f}s")
    code_bytes, _ = tg.counted_code_bytes(os.path.join(REPO, "train_gpt.py"))
    try:
        import brotli  # noqa: F401
        has_brotli = True
    except ImportError:
        has_brotli = False
        log("brotli is not installed: no brotli-11 sizes")
    rows = []
    for i, name in enumerate(names):
        hc = dataclasses.replace(h, **CONFIGS[name])
        quantized, quantize_s = timed(lambda: tg.quantize_state_dict(
            float_state, hc, hessians if hc.quant_method == "gptq" else None), device)
        payload = tg.serialize_quantized(quantized)
        blob, compress_s = timed(lambda: tg.compress_artifact(payload, "rans"), device)
        restored, decompress_s = timed(lambda: tg.decompress_artifact(blob), device)
        if restored != payload:
            raise RuntimeError(f"{name}: the rANS round trip changed the payload")
        row = {"config": name, "payload_bytes": len(payload), "rans_bytes": len(blob), "total_bytes": len(blob) + code_bytes,
               "quantize_s": quantize_s, "compress_s": compress_s, "decompress_s": decompress_s,
               "lqer_tensors": [n for n, e in quantized.items() if "lqer" in e]}
        embed = quantized.get("tok_emb.weight", {})
        if embed.get("kind") == "int":  # rows the coder stores as differences from a prototype (untrained tokens)
            row["embed_copy_rows"] = int(tg.row_prototype(embed["q"].cpu().numpy().view(np.uint8) ^ 0x80)[1].sum())
        if baselines == "all" or (baselines == "first" and i == 0):
            for compressor in ("lzma", "brotli") if has_brotli else ("lzma",):
                other, seconds = timed(lambda: tg.compress_artifact(payload, compressor, 11), device)
                row[f"{compressor}_bytes"], row[f"{compressor}_s"] = len(other), seconds
        model.load_state_dict(tg.dequantize_state_dict(tg.deserialize_quantized(restored)))
        row["val_bpb"] = score()
        row["gap"] = row["val_bpb"] - float_bpb
        rows.append(row)
        log(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}))
    return {"float_bpb": float_bpb, "code_bytes": code_bytes, "limit_bytes": h.artifact_limit_bytes, "rows": rows}


def markdown(result: dict) -> str:
    out = [f"float val_bpb {result['float_bpb']:.5f}; code {result['code_bytes']:,} B; limit {result['limit_bytes']:,} B", "",
           "| config | val_bpb | gap | rANS B | lzma-9e B | brotli-11 B | code + rANS B | fits | quantize s | rANS s | decode s | lzma s | brotli s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        opt = lambda key, fmt: fmt.format(r[key]) if key in r else "–"
        out.append(f"| {r['config']} | {r['val_bpb']:.5f} | {r['gap']:+.5f} | {r['rans_bytes']:,} | {opt('lzma_bytes', '{:,}')} | "
                   f"{opt('brotli_bytes', '{:,}')} | {r['total_bytes']:,} | {'yes' if r['total_bytes'] <= result['limit_bytes'] else 'NO'} | "
                   f"{r['quantize_s']:.1f} | {r['compress_s']:.1f} | {r['decompress_s']:.1f} | {opt('lzma_s', '{:.0f}')} | {opt('brotli_s', '{:.0f}')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", required=True, help="float state dict written by train_gpt.py (final_model.pt)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--baselines", choices=("first", "all", "none"), default="first",
                    help="which configurations also get lzma-9e and brotli-11 sizes (slow); default: the first")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    names = a.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; known: {list(CONFIGS)}")
    result = bench(a.state, tg.Hyperparameters.from_env(), names, a.baselines)
    print(markdown(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
