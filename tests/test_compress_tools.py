"""tools/bench/compress_bench.py and tools/bench/context_entropy.py on small synthetic payloads: the
reproduced lrzip pipeline gives the payload back exactly (when lrzip is installed), the byte shuffle and
the span bookkeeping are inverses, and the closed-form adaptive code length equals coding symbol by symbol."""
import math
import shutil

import numpy as np
import pytest
import torch

import train_gpt as tg
import compress_bench as cb
import context_entropy as ce


def small_payload() -> bytes:
    """A payload with every role the pipeline groups (attention, MLP, int7 embedding), a gate and a float16 tensor."""
    g = torch.Generator().manual_seed(0)

    def ints(rows: int, cols: int, qmax: int) -> torch.Tensor:
        return torch.randint(-qmax, qmax + 1, (rows, cols), generator=g, dtype=torch.int8)

    quantized = {
        "smear_gate": {"kind": "int", "bits": 8, "q": ints(1, 12, 127), "scale": torch.ones(1, dtype=torch.float16)},
        "tok_emb.weight": {"kind": "int", "bits": 7, "q": ints(96, 32, 63), "scale": torch.rand(96, generator=g).half()},
        "blocks.0.resid_mix": {"kind": "float16", "data": torch.randn(2, 32, generator=g).half()},
        "blocks.0.attn.q.weight": {"kind": "int", "bits": 6, "q": ints(32, 32, 31), "scale": torch.rand(32, generator=g).half()},
        "blocks.0.mlp.up.weight": {"kind": "int", "bits": 6, "q": ints(64, 32, 31), "scale": torch.rand(64, generator=g).half()},
    }
    return tg.serialize_quantized(quantized)


@pytest.mark.parametrize("length", [0, 1, 2, 7, 1000])
def test_byte_shuffle_round_trip(length):
    data = bytes(np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8))
    assert cb.byte_unshuffle(cb.byte_shuffle(data)) == data


def test_strip_and_restore_spans_are_inverses():
    payload = small_payload()
    meta, starts = tg.payload_index(payload)
    matrices = cb.pipeline_matrices(meta)
    stripped = cb.strip_spans(payload, starts["q"], [t["q"] for t in matrices])
    assert len(stripped) == len(payload) - sum(t["q"][1] for t in matrices)
    filled = {t["q"][0]: payload[starts["q"] + t["q"][0]:starts["q"] + sum(t["q"])] for t in matrices}
    assert cb.restore_spans(stripped, starts["q"], filled) == payload


def test_nearest_neighbour_order_is_a_permutation_that_walks_to_the_nearest():
    rows = np.random.default_rng(1).integers(-5, 6, (40, 16)).astype(np.int8)
    order = cb.l1_nearest_neighbour_order(rows)
    assert sorted(order) == list(range(40)) and order[0] == 0
    wide = rows.astype(int)
    for i in range(len(order) - 1):  # every step goes to the nearest row not yet visited (brute force)
        unvisited = order[i + 1:]
        distance = np.abs(wide[order[i]] - wide[unvisited]).sum(1)
        assert distance[0] == distance.min(), i


@pytest.mark.skipif(shutil.which("lrzip") is None, reason="lrzip not installed (apt-get install lrzip)")
@pytest.mark.parametrize("min_symbols", [0, math.inf])  # every group sorted, none sorted
def test_pipeline_round_trip_is_exact(min_symbols, tmp_path, monkeypatch):
    payload = small_payload()
    blob = cb.pipeline_compress(payload, str(tmp_path), min_symbols)
    assert cb.pipeline_decompress(blob, str(tmp_path), min_symbols) == payload
    assert set(cb.pipeline_row(payload, min_symbols)["parts"]) == {"attn", "mlp", "embed", "rest (brotli-11)"}
    decompress = cb.pipeline_decompress  # a decoder that loses a byte is refused, not reported
    monkeypatch.setattr(cb, "pipeline_decompress", lambda *args: decompress(*args)[:-1])
    with pytest.raises(SystemExit, match="not exact"):
        cb.pipeline_row(payload, min_symbols)


def test_adaptive_bits_equals_sequential_coding(monkeypatch):
    """The closed form (Dirichlet-multinomial) is the cost of coding one symbol at a time with counts + alpha."""
    rng = np.random.default_rng(2)
    values = np.clip(np.round(rng.normal(0, 2.5, 3000)), -31, 31).astype(np.int64)
    context = rng.integers(0, 3, values.size)
    alpha = 0.2
    counts, bits = np.zeros((3, 63)), 0.0
    for c, v in zip(context, values):
        bits -= math.log2((counts[c, v + 31] + alpha) / (counts[c].sum() + 63 * alpha))
        counts[c, v + 31] += 1
    monkeypatch.setattr(ce, "ALPHAS", (alpha,))
    assert ce.adaptive_bits(context, values, 63) == pytest.approx(bits, rel=1e-9)
