#!/usr/bin/env python3
"""One table of compressors on the same quantized payload: bytes, seconds, ratio to brotli-11.

  nice -n 10 python3 tools/bench/compress_bench.py final_model.artifact [--rows simple,pipeline] [--json out.json]

The payload is the artifact's, decompressed with train_gpt.decompress_artifact; every row compresses that
same payload and checks that its own decompressor gives it back byte for byte.

Rows:
- brotli-11: the payload as it is.
- brotli-11, byte shuffle: the records' transform before brotli, a stride-2 byte transposition of the whole
  blob (even bytes, then odd bytes). train_gpt.py has no such shuffle of its own (it byte-plans only the
  float16 sections, inside rans_compress); this is our reading of the spec's "byte shuffle + brotli-11".
- lzma-9e: xz preset 9 | extreme (train_gpt's COMPRESSOR=lzma).
- rANS: train_gpt's COMPRESSOR=rans, the artifact's own coder.
- pipeline: the published per-group pipeline, reproduced here and never in train_gpt.py. The int6 and
  int7 matrices are grouped by role (attention, MLP, embedding, other); in the groups of at least
  LARGE_GROUP symbols, each matrix's rows are reordered by a greedy L1 nearest-neighbour walk (its
  permutation stored, u16 per row); each group goes through the external `lrzip -z -L 9 -T` (ZPAQ back end, the
  man page's highest level), and the rest (index, scales, float16 tensors, gates, LQER codes, permutations)
  through brotli-11. Its bytes are the lrzip files (headers included) plus the brotli part.
- pipeline, rows unsorted (--rows pipeline-unsorted): the same without the row reordering, to see what the
  sort and its stored permutations (u16 a row, then brotli) pay.
Seconds are wall time on this machine (CPU) for one run each.
"""
from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train_gpt as tg  # noqa: E402

BROTLI_QUALITY = 11
LARGE_GROUP = 1_000_000  # symbols: groups this big get their rows reordered (all three matrix groups here)
LRZIP_COMPRESS = ["lrzip", "-z", "-L", "9", "-T", "-q", "-f"]  # ZPAQ, top level; -T: no LZ4 pre-test
LRZIP_DECOMPRESS = ["lrzip", "-d", "-q", "-f"]
PIPELINE_ROLES = ("attn", "mlp", "embed", "other")


def brotli_compress(data: bytes) -> bytes:
    import brotli
    return brotli.compress(data, quality=BROTLI_QUALITY)


def brotli_decompress(data: bytes) -> bytes:
    import brotli
    return brotli.decompress(data)


# --------------------------------------------------------------------------------------------------
# The simple rows
# --------------------------------------------------------------------------------------------------

def byte_shuffle(data: bytes) -> bytes:
    """Stride-2 transposition: bytes 0, 2, 4, ... then 1, 3, 5, ...; an odd length keeps its last byte at the end."""
    even = len(data) - len(data) % 2
    planes = np.frombuffer(data, np.uint8, even).reshape(-1, 2).T
    return planes.tobytes() + data[even:]


def byte_unshuffle(data: bytes) -> bytes:
    even = len(data) - len(data) % 2
    pairs = np.frombuffer(data, np.uint8, even).reshape(2, -1).T
    return pairs.tobytes() + data[even:]


def simple_rows() -> dict[str, tuple]:
    """Row name → (compress, decompress), each a function of bytes to bytes."""
    return {
        "brotli-11": (brotli_compress, brotli_decompress),
        "brotli-11, byte shuffle": (lambda p: brotli_compress(byte_shuffle(p)),
                                    lambda b: byte_unshuffle(brotli_decompress(b))),
        "lzma-9e": (lambda p: lzma.compress(p, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
        "rANS (train_gpt)": (tg.rans_compress, tg.rans_decompress),
    }


def time_round_trip(payload: bytes, compress, decompress) -> dict:
    start = time.perf_counter()
    blob = compress(payload)
    compress_s = time.perf_counter() - start
    start = time.perf_counter()
    back = decompress(blob)
    decompress_s = time.perf_counter() - start
    if back != payload:
        raise SystemExit("round trip is not exact")
    return {"bytes": len(blob), "compress_s": compress_s, "decompress_s": decompress_s}


# --------------------------------------------------------------------------------------------------
# The published per-group pipeline
# --------------------------------------------------------------------------------------------------

def l1_nearest_neighbour_order(rows: np.ndarray) -> np.ndarray:
    """Greedy walk from row 0, always to the nearest (L1) row not yet visited: neighbours in the new order
    look alike, which a long-range context mixer can exploit. Returns the original index of each new row."""
    as_float = torch.from_numpy(rows.astype(np.float32))
    distances = torch.cdist(as_float, as_float, p=1).numpy()
    visited = np.zeros(len(rows), bool)
    order = np.empty(len(rows), np.int64)
    current = 0
    for step in range(len(rows)):
        order[step], visited[current] = current, True
        if step + 1 < len(rows):
            candidates = np.where(visited, np.inf, distances[current])
            current = int(candidates.argmin())
    return order


def pipeline_matrices(meta: dict) -> list[dict]:
    """The index entries of the matrices the pipeline groups (int6 and int7; gates are int8 and stay out)."""
    return [t for t in meta["tensors"] if t["kind"] == "int" and t["bits"] in (6, 7)]


def role_groups(meta: dict) -> dict[str, list[dict]]:
    groups = {role: [] for role in PIPELINE_ROLES}
    for t in pipeline_matrices(meta):
        groups[tg.tensor_class(t["name"])].append(t)
    return {role: members for role, members in groups.items() if members}


def strip_spans(payload: bytes, q_start: int, spans: list[list[int]]) -> bytes:
    """The payload without the given q-section spans (offset, length), the rest in its own order."""
    pieces, cursor = [], 0
    for offset, length in sorted(spans):
        pieces.append(payload[cursor:q_start + offset])
        cursor = q_start + offset + length
    return b"".join(pieces) + payload[cursor:]


def restore_spans(stripped: bytes, q_start: int, filled: dict[int, bytes]) -> bytes:
    """Inverse of strip_spans: `filled` maps each removed span's offset to its bytes."""
    pieces, stripped_cursor, payload_cursor = [], 0, 0
    for offset in sorted(filled):
        keep = q_start + offset - payload_cursor  # untouched bytes before this span
        pieces += [stripped[stripped_cursor:stripped_cursor + keep], filled[offset]]
        stripped_cursor += keep
        payload_cursor = q_start + offset + len(filled[offset])
    return b"".join(pieces) + stripped[stripped_cursor:]


def run_lrzip(command: list[str], source: str, target: str) -> None:
    subprocess.run(command + ["-o", target, source], check=True, stdout=subprocess.DEVNULL)


def lrzip_bytes(data: bytes, workdir: str, name: str) -> bytes:
    source, target = os.path.join(workdir, name), os.path.join(workdir, name + ".lrz")
    with open(source, "wb") as f:
        f.write(data)
    run_lrzip(LRZIP_COMPRESS, source, target)
    with open(target, "rb") as f:
        return f.read()


def unlrzip_bytes(data: bytes, workdir: str, name: str) -> bytes:
    source, target = os.path.join(workdir, name + ".lrz"), os.path.join(workdir, name + ".out")
    with open(source, "wb") as f:
        f.write(data)
    run_lrzip(LRZIP_DECOMPRESS, source, target)
    with open(target, "rb") as f:
        return f.read()


def reordered(members: list[dict], min_symbols: float) -> bool:
    return sum(t["shape"][0] * t["shape"][1] for t in members) >= min_symbols


def pipeline_compress(payload: bytes, workdir: str, min_symbols: float) -> dict:
    """{"groups": {role: lrzip file bytes}, "rest": brotli bytes}; the rest holds the permutations first
    (u32 length, u16 each), then the payload stripped of the grouped matrices, whose index the decoder reads."""
    meta, starts = tg.payload_index(payload)
    groups, permutations = {}, []
    for role, members in role_groups(meta).items():
        reorder = reordered(members, min_symbols)
        parts = []
        for t in members:
            offset, length = t["q"]
            rows = np.frombuffer(payload, np.int8, length, starts["q"] + offset).reshape(t["shape"])
            if reorder:
                order = l1_nearest_neighbour_order(rows)
                permutations.append(order.astype("<u2").tobytes())
                rows = rows[order]
            parts.append(rows.tobytes())
        groups[role] = lrzip_bytes(b"".join(parts), workdir, role)
    perm_bytes = b"".join(permutations)
    stripped = strip_spans(payload, starts["q"], [t["q"] for t in pipeline_matrices(meta)])
    rest = brotli_compress(struct.pack("<I", len(perm_bytes)) + perm_bytes + stripped)
    return {"groups": groups, "rest": rest}


def pipeline_decompress(blob: dict, workdir: str, min_symbols: float) -> bytes:
    rest = brotli_decompress(blob["rest"])
    (perm_len,) = struct.unpack_from("<I", rest)
    permutations = np.frombuffer(rest, "<u2", perm_len // 2, 4).astype(np.int64)
    stripped = rest[4 + perm_len:]
    meta, starts = tg.payload_index(stripped)
    filled, perm_cursor = {}, 0
    for role, members in role_groups(meta).items():
        reorder = reordered(members, min_symbols)
        data, cursor = unlrzip_bytes(blob["groups"][role], workdir, role), 0
        for t in members:
            rows = np.frombuffer(data, np.int8, t["q"][1], cursor).reshape(t["shape"])
            cursor += t["q"][1]
            if reorder:
                order = permutations[perm_cursor:perm_cursor + len(rows)]
                perm_cursor += len(rows)
                restored = np.empty_like(rows)
                restored[order] = rows
                rows = restored
            filled[t["q"][0]] = rows.tobytes()
    return restore_spans(stripped, starts["q"], filled)


def pipeline_row(payload: bytes, min_symbols: float = LARGE_GROUP) -> dict:
    """min_symbols: the smallest group whose rows are reordered (math.inf: none)."""
    workdir = tempfile.mkdtemp(prefix="compress_bench_")
    try:
        start = time.perf_counter()
        blob = pipeline_compress(payload, workdir, min_symbols)
        compress_s = time.perf_counter() - start
        start = time.perf_counter()
        back = pipeline_decompress(blob, workdir, min_symbols)
        decompress_s = time.perf_counter() - start
    finally:
        shutil.rmtree(workdir)
    if back != payload:
        raise SystemExit("pipeline round trip is not exact")
    parts = {role: len(data) for role, data in blob["groups"].items()} | {"rest (brotli-11)": len(blob["rest"])}
    return {"bytes": sum(parts.values()), "compress_s": compress_s, "decompress_s": decompress_s, "parts": parts}


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------

def print_table(payload_len: int, rows: dict[str, dict]) -> None:
    reference = rows.get("brotli-11", {}).get("bytes")  # absent when --rows leaves out the simple rows

    def versus(n: int) -> str:
        return f"{n / reference:.4f} ({n - reference:+,})" if reference else "–"

    print(f"payload: {payload_len:,} bytes")
    print("| method | bytes | vs brotli-11 | compress s | decompress s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['bytes']:,} | {versus(r['bytes'])} | {r['compress_s']:.1f} | {r['decompress_s']:.1f} |")
    for name, r in rows.items():
        if "parts" in r:
            print(f"{name} parts: " + ", ".join(f"{k} {v:,}" for k, v in r["parts"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--rows", default="simple,pipeline",
                        help="comma-separated: simple (brotli, lzma, rANS), pipeline, pipeline-unsorted")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    wanted = set(args.rows.split(","))
    with open(args.artifact, "rb") as f:
        payload = tg.decompress_artifact(f.read())
    rows = {}
    for name, (compress, decompress) in simple_rows().items() if "simple" in wanted else ():
        rows[name] = time_round_trip(payload, compress, decompress)
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    if wanted & {"pipeline", "pipeline-unsorted"} and shutil.which("lrzip") is None:
        raise SystemExit("lrzip not found: apt-get install lrzip, or --rows simple")
    if "pipeline" in wanted:
        rows["pipeline: role groups, L1 NN rows, lrzip -z -L 9 -T + brotli-11"] = pipeline_row(payload)
    if "pipeline-unsorted" in wanted:
        rows["pipeline, rows unsorted"] = pipeline_row(payload, math.inf)
    print_table(len(payload), rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"artifact": args.artifact, "payload_bytes": len(payload), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
