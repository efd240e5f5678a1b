#!/usr/bin/env python3
"""Where the 16,000,000 bytes go: counted code, and the model by tensor group before and after compression.

  python3 tools/submission/size_audit.py --artifact final_model.artifact            # the artifact as written
  python3 tools/submission/size_audit.py --state final_model.pt                     # quantize float weights first
  python3 tools/submission/size_audit.py --state final_model.pt --artifact final_model.artifact [--script train_gpt.py]

--state: a float state dict (final_model.pt), quantized with train_gpt.quantize_state_dict and the
Hyperparameters the environment gives (defaults, or EMBED_BITS=7 etc., as for a run), then serialized and
compressed with COMPRESSOR exactly as a run would: that compressed size is the real model total.
--artifact: the file itself, read with decompress_artifact + deserialize_quantized; its file size is the
real model total. With both, the audit reports the artifact and says whether the state dict re-quantizes to
the same payload. That is exact for QUANT_METHOD=rtn. A GPTQ run's integers (and the LQER factors of their
error) come from the run's calibration Hessians, which final_model.pt does not hold, so for QUANT_METHOD=gptq
the audit re-checks what does not depend on them (the tensor layout, the row scales, the float16 tensors) and
says that the integers cannot be re-checked; --state alone then sizes a round-to-nearest stand-in.

Groups: embedding, attention, MLP and other int matrices (their integer values), scales (every int matrix's
float16 row scales), lqer (LQER factors: int4 codes, group scales and zeros), float16 (the small tensors
stored as float16), and the index (the payload's length prefix and JSON). Raw bytes of the groups add up to the payload. Each group is also compressed alone with
brotli (quality --quality, default 11): a group's share of the artifact. The artifact is compressed as a
whole (by the compressor its header names), so its size differs from the sum of the parts; both are printed.
Code: raw bytes of the script and its packed (counted) form, tools/submission/pack_script.py.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

LIMIT = 16_000_000
GROUPS = ("embedding", "attention", "mlp", "other_int", "scales", "lqer", "float16", "index")
CLASS_GROUP = {"embed": "embedding", "attn": "attention", "mlp": "mlp", "other": "other_int"}


def code_sizes(script: str) -> dict:
    with open(script, "rb") as f:
        raw = len(f.read())
    packed, _ = tg.counted_code_bytes(script)
    return {"script": script, "raw_bytes": raw, "packed_bytes": packed}


def group_bytes(quantized: dict) -> dict[str, dict]:
    """Group → {"tensors", "params", "chunks": [bytes]} in the payload's own byte order (what serialize writes)."""
    groups = {g: {"tensors": 0, "params": 0, "chunks": []} for g in GROUPS}
    for name, e in quantized.items():
        if e["kind"] == "int":
            g = groups[CLASS_GROUP[tg.tensor_class(name)]]
            g["tensors"] += 1
            g["params"] += e["q"].numel()
            g["chunks"].append(e["q"].cpu().numpy().astype("i1").tobytes())
            groups["scales"]["params"] += e["scale"].numel()
            groups["scales"]["chunks"].append(e["scale"].cpu().numpy().astype("<f2").tobytes())
            for factor in e.get("lqer", {}).values():  # LQER_ENABLED: int4 codes, group scales and zeros
                groups["lqer"]["tensors"] += 1
                groups["lqer"]["params"] += factor["q"].numel()
                groups["lqer"]["chunks"] += [factor["q"].cpu().numpy().astype("i1").tobytes()] + [
                    factor[k].cpu().numpy().astype("<f2").tobytes() for k in ("scale", "zero")]
        else:
            g = groups["float16"]
            g["tensors"] += 1
            g["params"] += e["data"].numel()
            g["chunks"].append(e["data"].cpu().numpy().astype("<f2").tobytes())
    return groups


def recheck_parts(from_state: dict, artifact: dict) -> dict[str, bool]:
    """Which parts of the artifact the state dict gives again: those that do not depend on GPTQ's Hessians."""
    layout = {n: (e["kind"], e.get("bits"), tuple((e.get("q") if e["kind"] == "int" else e["data"]).shape))
              for n, e in from_state.items()}
    same_layout = layout == {n: (e["kind"], e.get("bits"), tuple((e.get("q") if e["kind"] == "int" else e["data"]).shape))
                             for n, e in artifact.items()}
    if not same_layout:
        return {"layout": False, "scales": False, "float16": False, "integers": False}
    pairs = [(e, artifact[n]) for n, e in from_state.items()]
    return {"layout": True,
            "scales": all(torch.equal(a["scale"], b["scale"]) for a, b in pairs if a["kind"] == "int"),
            "float16": all(torch.equal(a["data"], b["data"]) for a, b in pairs if a["kind"] == "float16"),
            "integers": all(torch.equal(a["q"], b["q"]) for a, b in pairs if a["kind"] == "int")}


def audit(state_path: str | None = None, artifact_path: str | None = None, script: str | None = None,
          quality: int = 11, h: tg.Hyperparameters | None = None) -> dict:
    import brotli
    if not state_path and not artifact_path:
        raise ValueError("give --state and/or --artifact")
    h = h or tg.Hyperparameters.from_env()
    result = {"limit_bytes": LIMIT, "quality": quality}
    from_state = None
    if state_path:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{state_path}: not a state dict of tensors")
        from_state = tg.serialize_quantized(tg.quantize_state_dict(state, h))
    if artifact_path:
        with open(artifact_path, "rb") as f:
            blob = f.read()
        payload = tg.decompress_artifact(blob)
        result["model_source"] = f"artifact {artifact_path}"
        result["compressor"] = tg.COMPRESSORS[tg.ARTIFACT_HEADER.unpack_from(blob)[1]]
        result["artifact_bytes"] = len(blob)
        if from_state is not None:
            result["state_matches_artifact"] = from_state == payload if h.quant_method == "rtn" else None
            result["recheck"] = recheck_parts(tg.deserialize_quantized(from_state), tg.deserialize_quantized(payload))
            result["quant_method"] = h.quant_method
    else:
        payload = from_state
        blob = tg.compress_artifact(payload, h.compressor, h.brotli_quality)
        result["compressor"] = h.compressor
        result["model_source"] = (f"state dict {state_path} quantized (matrix_bits={h.matrix_bits}, "
                                  f"embed_bits={h.embed_bits}), {h.compressor}"
                                  + (", rounded to nearest: without the run's Hessians, not its GPTQ integers"
                                     if h.quant_method == "gptq" else ""))
        result["artifact_bytes"] = len(blob)
    quantized = tg.deserialize_quantized(payload)
    (meta_len,) = struct.unpack_from("<I", payload, 0)
    groups = group_bytes(quantized)
    groups["index"]["chunks"] = [payload[:4 + meta_len]]
    table = {}
    for name in GROUPS:
        g = groups[name]
        data = b"".join(g["chunks"])
        if not data and name in ("other_int", "lqer"):
            continue
        table[name] = {"tensors": g["tensors"], "params": g["params"], "raw_bytes": len(data),
                       "compressed_bytes": len(brotli.compress(data, quality=quality)) if data else 0}
    result["groups"] = table
    result["payload_bytes"] = len(payload)
    result["payload_data_bytes"] = len(payload) - 4 - meta_len
    result["artifact_header_bytes"] = tg.ARTIFACT_HEADER.size
    result["groups_compressed_sum"] = sum(g["compressed_bytes"] for g in table.values())
    if script:
        result["code"] = code_sizes(script)
        result["total_bytes"] = result["artifact_bytes"] + result["code"]["packed_bytes"]
        result["headroom_bytes"] = LIMIT - result["total_bytes"]
    else:
        result["headroom_bytes"] = LIMIT - result["artifact_bytes"]
    return result


def render(r: dict) -> str:
    out = []
    if "code" in r:
        c = r["code"]
        out.append(f"code {c['script']}: raw {c['raw_bytes']:,} B, packed (counted) {c['packed_bytes']:,} B")
    out.append(f"model: {r['model_source']}")
    out.append(f"  {'group':<10} {'tensors':>7} {'params':>12} {'raw bytes':>12} {'brotli-' + str(r['quality']) + ' alone':>16} {'ratio':>6}")
    for name, g in r["groups"].items():
        ratio = g["compressed_bytes"] / g["raw_bytes"] if g["raw_bytes"] else 0.0
        out.append(f"  {name:<10} {g['tensors']:>7} {g['params']:>12,} {g['raw_bytes']:>12,} {g['compressed_bytes']:>16,} {ratio:>6.3f}")
    raw_sum = sum(g["raw_bytes"] for g in r["groups"].values())
    out.append(f"  {'sum':<10} {'':>7} {'':>12} {raw_sum:>12,} {r['groups_compressed_sum']:>16,}")
    out.append(f"payload {r['payload_bytes']:,} B (data {r['payload_data_bytes']:,} + index "
               f"{r['payload_bytes'] - r['payload_data_bytes']:,}); artifact {r['artifact_bytes']:,} B "
               f"({r['artifact_header_bytes']}-byte header + {r['compressor']}; "
               f"{r['artifact_bytes'] - r['groups_compressed_sum']:+,} B against the groups compressed alone)")
    if r.get("quant_method") == "rtn":
        out.append("state dict re-quantizes to the artifact's payload: " + ("yes" if r["state_matches_artifact"] else
                   "NO (other hyperparameters, or other weights)"))
    elif "recheck" in r:
        parts = r["recheck"]
        yes = lambda ok: "yes" if ok else "NO"  # noqa: E731
        out.append(f"state dict against the artifact (QUANT_METHOD={r['quant_method']}): tensor layout "
                   f"{yes(parts['layout'])}, row scales {yes(parts['scales'])}, float16 tensors {yes(parts['float16'])}; "
                   f"the integers (and LQER factors) cannot be re-checked: GPTQ computed them from the run's "
                   f"calibration Hessians, which the state dict does not hold")
    if "total_bytes" in r:
        out.append(f"total {r['total_bytes']:,} B = code {r['code']['packed_bytes']:,} + model {r['artifact_bytes']:,}; "
                   f"headroom to {r['limit_bytes']:,}: {r['headroom_bytes']:,} B"
                   + ("  OVER THE LIMIT" if r["headroom_bytes"] < 0 else ""))
    else:
        out.append(f"model alone {r['artifact_bytes']:,} B; headroom to {r['limit_bytes']:,} before code: {r['headroom_bytes']:,} B")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", help="float state dict, e.g. final_model.pt")
    ap.add_argument("--artifact", help="artifact, e.g. final_model.artifact")
    ap.add_argument("--script", default=os.path.join(REPO, "train_gpt.py"),
                    help="the counted script, source or packed (default: this repository's train_gpt.py)")
    ap.add_argument("--no-code", action="store_true", help="leave the code out")
    ap.add_argument("--quality", type=int, default=11, help="brotli quality for the per-group figures (default 11)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = ap.parse_args(argv)
    try:
        r = audit(a.state, a.artifact, None if a.no_code else a.script, a.quality)
    except (ValueError, OSError, tg.ArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=1) if a.json else render(r))
    return 0 if r["headroom_bytes"] >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
