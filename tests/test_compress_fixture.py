"""train_gpt's rANS coder on real quantized symbols: a slice of a proxy artifact, cut by
tools/bench/make_compress_fixture.py, rebuilt into a payload with serialize_quantized. The round trip must be
exact and rANS smaller than brotli-11 on it; the ratio is printed (pytest -s) to follow it across changes."""
import brotli
import pytest
import torch

import train_gpt as tg
from make_compress_fixture import DEFAULT_OUT, load_fixture


@pytest.fixture(scope="module")
def fixture_payload():
    quantized, source = load_fixture(DEFAULT_OUT)
    return tg.serialize_quantized(quantized), source


def test_fixture_is_the_documented_slice(fixture_payload):
    """The slice holds every kind the artifact stores: int6, int7, int8 gates, LQER int4 codes, float16."""
    payload, source = fixture_payload
    quantized = tg.deserialize_quantized(payload)
    bits = {e["bits"] for e in quantized.values() if e["kind"] == "int"}
    assert bits == {6, 7, 8}
    assert any("lqer" in e for e in quantized.values())
    assert any(e["kind"] == "float16" for e in quantized.values())
    assert source["sha256"] and source["artifact"]  # which artifact it was cut from


def test_rans_round_trip_on_real_symbols_is_exact(fixture_payload):
    payload, _ = fixture_payload
    assert tg.rans_decompress(tg.rans_compress(payload)) == payload
    blob = tg.compress_artifact(payload, "rans")
    assert tg.decompress_artifact(blob) == payload
    quantized = tg.deserialize_quantized(payload)
    again = tg.deserialize_quantized(tg.decompress_artifact(blob))
    assert all(torch.equal(e["q"], again[n]["q"]) for n, e in quantized.items() if e["kind"] == "int")


def test_rans_beats_brotli_on_real_symbols(fixture_payload):
    payload, source = fixture_payload
    rans_bytes = len(tg.rans_compress(payload))
    brotli_bytes = len(brotli.compress(payload, quality=11))
    print(f"\nfixture from {source['artifact']}: payload {len(payload):,} B, rANS {rans_bytes:,} B, "
          f"brotli-11 {brotli_bytes:,} B, rANS / brotli-11 = {rans_bytes / brotli_bytes:.4f}")
    assert rans_bytes < brotli_bytes
