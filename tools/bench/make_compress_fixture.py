#!/usr/bin/env python3
"""Cut a small slice of a real artifact's quantized symbols into tests/fixtures/.

  python3 tools/bench/make_compress_fixture.py ARTIFACT [--out tests/fixtures/quantized_slice.npz]

The slice: whole rows (the coder's tables are per column, so rows must stay whole) of one tensor of each
kind in the artifact: the int7 embedding with its LQER factors, the int6 attention and MLP matrices of one
block, an MLP matrix with LQER factors, the int8 gates, and one float16 tensor; with their real float16 row
scales. Rows are taken evenly spaced, so each slice sees rows from the whole matrix. The .npz also records
which artifact it came from (file name, size, sha256) and the slice itself, so the fixture can be rebuilt.

The test that reads it (tests/test_compress_fixture.py) rebuilds a payload with serialize_quantized and
checks train_gpt's rANS round trip on it and its size against brotli-11.

The checked-in fixture comes from the artifact of the proxy model of 2026-11-30 (15,925,361 bytes; 180 s on
one H200, default config, main at 7f858fd / d2eb6cf), whose file name and sha256 the .npz records.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
import train_gpt as tg  # noqa: E402

DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "quantized_slice.npz")
# tensor → rows to keep (every `step`-th row, `count` of them); LQER factors keep their first `lqer_cols`
# columns of a (whole int4 groups) and all of b. About 180K symbols: ~100 KB in the .npz.
SLICE = {
    "tok_emb.weight": {"step": 64, "count": 128, "lqer_cols": 1024},
    "blocks.1.mlp.up.weight": {"step": 32, "count": 64, "lqer_cols": 512},
    "blocks.5.attn.q.weight": {"step": 16, "count": 32},
    "blocks.5.attn.k.weight": {"step": 16, "count": 16},
    "blocks.5.attn.v.weight": {"step": 16, "count": 16},
    "blocks.5.attn.proj.weight": {"step": 16, "count": 32},
    "blocks.5.mlp.down.weight": {"step": 32, "count": 16},
    "blocks.5.attn.gate": {"step": 1, "count": 8},
    "smear_gate": {"step": 1, "count": 1},
    "blocks.5.attn_scale": {},
}


def slice_lqer(factors: dict, cols: int) -> dict[str, np.ndarray]:
    """a's first `cols` columns (and their group scales and zeros), all of b."""
    groups = cols // tg.LQER_GROUP
    a, b = factors["a"], factors["b"]
    return {"lqer.a.q": a["q"][:, :cols].numpy(), "lqer.a.scale": a["scale"][:, :groups].numpy(),
            "lqer.a.zero": a["zero"][:, :groups].numpy(),
            "lqer.b.q": b["q"].numpy(), "lqer.b.scale": b["scale"].numpy(), "lqer.b.zero": b["zero"].numpy()}


def slice_entry(entry: dict, spec: dict) -> dict[str, np.ndarray]:
    """Arrays of one tensor's slice, keyed by field ("q", "scale", "bits", "lqer.a.q", ... or "float16")."""
    if entry["kind"] == "float16":
        return {"float16": entry["data"].numpy()}
    rows = np.arange(spec["count"]) * spec["step"]
    arrays = {"q": entry["q"].numpy()[rows], "scale": entry["scale"].numpy()[rows], "bits": np.array(entry["bits"])}
    if "lqer" in entry and "lqer_cols" in spec:
        arrays |= slice_lqer(entry["lqer"], spec["lqer_cols"])
    return arrays


def fixture_arrays(blob: bytes, source_name: str) -> dict[str, np.ndarray]:
    quantized = tg.deserialize_quantized(tg.decompress_artifact(blob))
    arrays = {}
    for name, spec in SLICE.items():
        for field, value in slice_entry(quantized[name], spec).items():
            arrays[f"{name}|{field}"] = value
    source = {"artifact": source_name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "slice": SLICE}
    arrays["source"] = np.array(json.dumps(source))
    return arrays


def load_fixture(path: str) -> tuple[dict[str, dict], dict]:
    """(a quantized state dict as serialize_quantized takes it, the source record) from a fixture file."""
    with np.load(path) as npz:
        fields = {k: npz[k] for k in npz.files}
    source = json.loads(str(fields.pop("source")))
    quantized = {}
    for name in source["slice"]:  # the artifact's own order
        if f"{name}|float16" in fields:
            quantized[name] = {"kind": "float16", "data": torch.from_numpy(fields[f"{name}|float16"])}
            continue
        entry = {"kind": "int", "bits": int(fields[f"{name}|bits"]), "q": torch.from_numpy(fields[f"{name}|q"]),
                 "scale": torch.from_numpy(fields[f"{name}|scale"])}
        if f"{name}|lqer.a.q" in fields:
            entry["lqer"] = {k: {part: torch.from_numpy(fields[f"{name}|lqer.{k}.{part}"]) for part in ("q", "scale", "zero")}
                             for k in ("a", "b")}
        quantized[name] = entry
    return quantized, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    with open(args.artifact, "rb") as f:
        arrays = fixture_arrays(f.read(), os.path.basename(args.artifact))
    np.savez_compressed(args.out, **arrays)
    symbols = sum(v.size for k, v in arrays.items() if k.endswith("|q") or k.endswith(".q"))
    print(f"{args.out}: {os.path.getsize(args.out):,} bytes, {symbols:,} int symbols")


if __name__ == "__main__":
    main()
