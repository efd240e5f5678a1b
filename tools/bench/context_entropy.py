#!/usr/bin/env python3
"""Which contexts pay for the quantized matrices: adaptive code lengths under context models.

  nice -n 10 python3 tools/bench/context_entropy.py final_model.artifact [--no-reorder]

For each role group of int6/int7 matrices (attention, MLP, embedding) and each context model, the bytes an
adaptive coder would spend: every context keeps counts that start at `alpha` per symbol of the matrix's
alphabet (2^bits − 1 values) and a symbol costs −log2 p under the counts so far. That total does not depend
on the order of the symbols within a context (Dirichlet-multinomial), so it is computed in closed form with
log-gamma, and it includes the cost of learning each table (no tables are sent). The best alpha of a few is
taken per model. Models that need side information (a class per column, a permutation of the rows) add
its cost, stated with each. Each model is counted twice: with its count tables per matrix, and with one set
of tables shared by the whole group (the same context value means the same table in every matrix), which
learns each table once; contexts that only mean something inside one matrix (a column index) are per matrix.

Reference rows: rANS as train_gpt codes each group alone (its tables and column classes included; row
scales zeroed so that they cost nothing), and the static order-0 entropy per matrix (tables free).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train_gpt as tg  # noqa: E402
from compress_bench import l1_nearest_neighbour_order  # noqa: E402

ALPHAS = (0.01, 0.05, 0.2, 0.5)  # Dirichlet prior per symbol; sparse contexts want it small
MAGNITUDE_EDGES = np.array([0.75, 1.25, 1.75, 2.25, 2.75, 3.25, 4.0, 5.0, 6.5])  # mean |v| buckets (10)
COLUMN_CLASSES = 16  # side-information model: columns bucketed by their mean |v| (4 bits a column sent)
ROW_WINDOW = 8  # previous symbols in the row whose mean |v| forms the row-local context


def log_gamma(x: np.ndarray) -> np.ndarray:
    return torch.special.gammaln(torch.from_numpy(np.asarray(x, np.float64))).numpy()


def adaptive_bits(context: np.ndarray, values: np.ndarray, alphabet: int) -> float:
    """Bits to code `values` (small ints) adaptively, one count table per distinct `context`, best of ALPHAS.

    Per context with counts n_s (total N): log2 Γ(N + aK)/Γ(aK) − Σ_s log2 Γ(n_s + a)/Γ(a)."""
    key = context.astype(np.int64) * alphabet + (values.astype(np.int64) + alphabet // 2)
    pairs, pair_counts = np.unique(key, return_counts=True)
    totals = np.bincount(np.unique(pairs // alphabet, return_inverse=True)[1], pair_counts)
    best = math.inf
    for a in ALPHAS:
        nats = (log_gamma(totals + a * alphabet) - log_gamma(a * alphabet)).sum() \
            - (log_gamma(pair_counts + a) - log_gamma(a)).sum()
        best = min(best, nats / math.log(2))
    return best


def static_entropy_bits(values: np.ndarray) -> float:
    counts = np.unique(values, return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def magnitude_bucket(mean_abs: np.ndarray) -> np.ndarray:
    return np.searchsorted(MAGNITUDE_EDGES, mean_abs)


def row_local_magnitude(q: np.ndarray) -> np.ndarray:
    """Mean |v| of the ROW_WINDOW symbols before each one in its row (bucketed); the first symbol gets its own
    bucket. The decoder knows these symbols already: no side information."""
    run = np.cumsum(np.abs(q), axis=1, dtype=np.int64)
    run = np.concatenate([np.zeros((len(q), 1), np.int64), run], axis=1)
    cols = np.arange(q.shape[1])
    start = np.maximum(cols - ROW_WINDOW, 0)
    window_sum = run[:, cols] - run[:, start]
    counts = np.maximum(cols - start, 1)
    bucket = magnitude_bucket(window_sum / counts) + 1
    bucket[:, 0] = 0
    return bucket


def column_history_magnitude(q: np.ndarray) -> np.ndarray:
    """Mean |v| of each column over the rows above (bucketed); the first row gets its own bucket. Also free."""
    run = np.cumsum(np.abs(q), axis=0, dtype=np.int64) - np.abs(q)
    rows = np.arange(len(q))[:, None]
    bucket = magnitude_bucket(run / np.maximum(rows, 1)) + 1
    bucket[0] = 0
    return bucket


def column_classes(q: np.ndarray) -> np.ndarray:
    """Each column's class: quantile of its mean |v| among the matrix's columns (sent as side information)."""
    spread = np.abs(q).mean(0)
    rank = np.argsort(np.argsort(spread, kind="stable"), kind="stable")
    return rank * COLUMN_CLASSES // q.shape[1]


def scale_buckets(scale: np.ndarray, buckets: int = 8) -> np.ndarray:
    """Each row's scale as a quantile bucket within the matrix (the scales are sent anyway)."""
    rank = np.argsort(np.argsort(scale, kind="stable"), kind="stable")
    return rank * buckets // len(scale)


def previous_in_row(q: np.ndarray, clip: int = 6) -> np.ndarray:
    prev = np.clip(q[:, :-1], -clip, clip) + clip + 1
    return np.concatenate([np.zeros((len(q), 1), np.int64), prev], axis=1)


def symbol_above(q: np.ndarray, clip: int = 6) -> np.ndarray:
    above = np.clip(q[:-1], -clip, clip) + clip + 1
    return np.concatenate([np.zeros((1, q.shape[1]), np.int64), above], axis=0)


def models(q: np.ndarray, scale: np.ndarray, order: np.ndarray | None) -> dict[str, tuple[np.ndarray, float]]:
    """Model name → (context of each symbol, side-information bits). `order`: the L1 NN row order, if computed."""
    rows, cols = q.shape
    zeros = np.zeros(q.shape, np.int64)
    col = np.broadcast_to(np.arange(cols), q.shape)
    classes = np.broadcast_to(column_classes(q), q.shape)
    class_bits = cols * math.log2(COLUMN_CLASSES)
    row_local, col_hist = row_local_magnitude(q), column_history_magnitude(q)
    out = {
        "order-0 per matrix": (zeros, 0.0),
        "row scale bucket (8)": (np.broadcast_to(scale_buckets(scale)[:, None], q.shape), 0.0),
        "column (each its own table)": (col, 0.0),
        "column class (16, sent)": (classes, class_bits),
        "previous symbol in row": (previous_in_row(q), 0.0),
        "symbol above (payload row order)": (symbol_above(q), 0.0),
        f"row-local mean|v| (last {ROW_WINDOW})": (row_local, 0.0),
        "column history mean|v| (rows above)": (col_hist, 0.0),
        "row-local × column history": (row_local * 16 + col_hist, 0.0),
        "row-local × column class (sent)": (row_local * COLUMN_CLASSES + classes, class_bits),
        "row-local × column": (row_local * cols + col, 0.0),
        "column class (sent) × column history": (classes * 16 + col_hist, class_bits),
    }
    if order is not None:
        permutation_bits = rows * math.log2(rows)
        reordered = q[order]
        out["symbol above after L1 NN row order"] = (symbol_above(reordered)[np.argsort(order)], permutation_bits)
    return out


PER_MATRIX_ONLY = ("column (each its own table)", "row-local × column")


def group_matrices(payload: bytes) -> dict[str, list[tuple[str, np.ndarray, np.ndarray, int]]]:
    """Role → [(name, int values, row scales, bits)] for the int6/int7 matrices (the bulk of the payload)."""
    quantized = tg.deserialize_quantized(payload)
    groups: dict[str, list] = {}
    for name, e in quantized.items():
        if e["kind"] == "int" and e["bits"] in (6, 7):
            groups.setdefault(tg.tensor_class(name), []).append((name, e["q"].numpy().astype(np.int64),
                                                                 e["scale"].float().numpy(), e["bits"]))
    return groups


def rans_group_bytes(members: list) -> int:
    """train_gpt's rANS on a payload of this group's matrices alone, with zero scales (side data ~ tables)."""
    quantized = {name: {"kind": "int", "bits": bits, "q": torch.from_numpy(q.astype(np.int8)),
                        "scale": torch.zeros(len(q), dtype=torch.float16)} for name, q, _, bits in members}
    return len(tg.rans_compress(tg.serialize_quantized(quantized)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--no-reorder", action="store_true", help="skip the L1 NN row order (slow on the embedding)")
    args = parser.parse_args()
    with open(args.artifact, "rb") as f:
        groups = group_matrices(tg.decompress_artifact(f.read()))
    table: dict[str, dict[str, float]] = {}
    for role, members in groups.items():
        start = time.perf_counter()
        table.setdefault("rANS alone (train_gpt)", {})[role] = rans_group_bytes(members)
        table.setdefault("static order-0 per matrix, tables free", {})[role] = sum(static_entropy_bits(q) for _, q, _, _ in members) / 8
        table.setdefault("static order-0 of the group, tables free", {})[role] = static_entropy_bits(
            np.concatenate([q.ravel() for _, q, _, _ in members])) / 8
        shared: dict[str, list] = {}
        for name, q, scale, bits in members:
            order = None if args.no_reorder else l1_nearest_neighbour_order(q.astype(np.int8))
            for model, (context, side_bits) in models(q, scale, order).items():
                context = np.ascontiguousarray(context).ravel()
                cost = (adaptive_bits(context, q.ravel(), 2 ** bits - 1) + side_bits) / 8
                table.setdefault(model + ", per matrix", {}).setdefault(role, 0.0)
                table[model + ", per matrix"][role] += cost
                if model not in PER_MATRIX_ONLY:
                    shared.setdefault(model, []).append((context, q.ravel(), side_bits))
        for model, parts in shared.items():
            contexts, values = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
            bits = adaptive_bits(contexts, values, 2 ** members[0][3] - 1) + sum(p[2] for p in parts)
            table.setdefault(model + ", shared in group", {})[role] = bits / 8
        print(f"{role}: {len(members)} matrices, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    roles = list(groups)
    print("| model | " + " | ".join(roles) + " | total | vs rANS |")
    print("|---|" + "---:|" * (len(roles) + 2))
    rans_total = sum(table["rANS alone (train_gpt)"].values())
    for model, by_role in table.items():
        total = sum(by_role.values())
        print(f"| {model} | " + " | ".join(f"{by_role[r]:,.0f}" for r in roles) + f" | {total:,.0f} | {total - rans_total:+,.0f} |")


if __name__ == "__main__":
    main()
