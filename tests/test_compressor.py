"""The artifact's rANS coder (COMPRESSOR=rans) and LQER (LQER_ENABLED): exact round trips, sizes against
brotli-11 and lzma, refusal of damaged or old artifacts, LQER's error reduction and its int4 groups."""
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import ARCH_OFF, REPO, SAMPLE_TOKENIZER

SCRIPT = os.path.join(REPO, "train_gpt.py")


# --------------------------------------------------------------------------------------------------
# The coder itself
# --------------------------------------------------------------------------------------------------

def symbols(kind: str, n: int, rng) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(0, 256, n)
    if kind == "gaussian":  # SDClip-like: int6 values around 128 with a spread of ~2.5 steps
        return np.clip(np.round(rng.normal(0, 2.5, n)), -31, 31).astype(np.int64) + 128
    return np.full(n, 77)  # a single symbol: its table has one entry of frequency 2^15, each symbol costs 0 bits


@pytest.mark.parametrize("n", [0, 1, 7, 1023, 1025, 200_003])
@pytest.mark.parametrize("kind", ["uniform", "gaussian", "single"])
def test_rans_round_trip_is_exact(n, kind):
    """Lengths that are and are not multiples of the lane count (n // 4096 lanes), empty, one symbol."""
    rng = np.random.default_rng(n)
    sym = symbols(kind, n, rng)
    ctx = rng.integers(0, 3, n)  # three tables, each fitted to its own symbols; a symbol may be rare in one
    freqs = tg.rans_freqs(np.stack([np.bincount(sym[ctx == t], minlength=256) for t in range(3)]))
    assert np.all(freqs.sum(1) == 1 << tg.RANS_PROB_BITS)
    states, words = tg.rans_encode(sym.astype(np.uint8), ctx, freqs)
    assert states.size == tg.rans_lanes(n) and states.dtype == np.dtype("<u4") and words.dtype == np.dtype("<u2")
    assert np.array_equal(tg.rans_decode(states, words, ctx, freqs), sym)
    if kind == "single":
        assert words.size == 0  # probability 1: no bits at all
    if kind == "gaussian" and n > 1000:  # within 1% (+ the lanes' states) of the empirical entropy
        p = np.bincount(sym, minlength=256) / n
        entropy_bytes = -n * (p[p > 0] * np.log2(p[p > 0])).sum() / 8
        assert 2 * words.size < 1.01 * entropy_bytes + 8 + 4 * states.size


def test_rans_freqs_keep_every_seen_symbol_and_sum_exactly():
    counts = np.zeros((3, 256), np.int64)
    counts[0, [0, 5, 255]] = [10 ** 9, 1, 1]  # tiny next to huge: still at least 1
    counts[1, :] = 1  # every symbol once: 2^15 / 256 each
    counts[2, 40] = 7
    freqs = tg.rans_freqs(counts)
    assert np.all(freqs.sum(1) == 1 << tg.RANS_PROB_BITS)
    assert np.array_equal(freqs > 0, counts > 0)
    assert np.all(freqs[1] == 128) and freqs[2, 40] == 1 << tg.RANS_PROB_BITS


def test_rans_decode_refuses_a_stream_that_is_cut_or_altered():
    rng = np.random.default_rng(0)
    sym = symbols("gaussian", 100_000, rng)
    ctx = np.zeros(sym.size, np.int64)
    freqs = tg.rans_freqs(np.bincount(sym, minlength=256))
    states, words = tg.rans_encode(sym.astype(np.uint8), ctx, freqs)
    with pytest.raises(tg.ArtifactError):
        tg.rans_decode(states, words[:-1], ctx, freqs)
    altered = words.copy()
    altered[words.size // 2] ^= 0x0100
    with pytest.raises(tg.ArtifactError):
        tg.rans_decode(states, altered, ctx, freqs)


# --------------------------------------------------------------------------------------------------
# The compressor on quantized models
# --------------------------------------------------------------------------------------------------

def sdclip_state(seed: int = 0) -> tuple[tg.Hyperparameters, dict[str, torch.Tensor]]:
    """Realistic shapes and statistics: a 2048×512 Gaussian and a 256×1024 Laplacian matrix whose columns (input
    channels) differ in spread (log-normal), an embedding with 64 near-copy rows (tokens never trained), and
    small float tensors."""
    g = torch.Generator().manual_seed(seed)
    spread = lambda cols: torch.exp(0.3 * torch.randn(1, cols, generator=g))
    gauss = torch.randn(2048, 512, generator=g) * spread(512)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((256, 1024)) * spread(1024)
    embed = torch.randn(256, 512, generator=g)
    embed[:64] = torch.randn(1, 512, generator=g) + 0.02 * torch.randn(64, 512, generator=g)
    state = {"tok_emb.weight": 0.005 * embed, "blocks.0.mlp.up.weight": 0.02 * gauss,
             "blocks.0.mlp.down.weight": 0.01 * laplace, "skip_gates": torch.randn(2, 512, generator=g)}
    return tg.Hyperparameters(), state


@pytest.fixture(scope="module")
def sdclip_payload() -> bytes:
    h, state = sdclip_state()
    return tg.serialize_quantized(tg.quantize_state_dict(state, h))


def test_rans_is_exact_and_smaller_than_brotli_11_and_lzma(sdclip_payload):
    blobs = {c: tg.compress_artifact(sdclip_payload, c, quality=11) for c in tg.COMPRESSORS}
    for compressor, blob in blobs.items():  # all three go through the same header and checks
        assert blob[8] == tg.COMPRESSORS.index(compressor) and tg.decompress_artifact(blob) == sdclip_payload
    sizes = {c: len(b) for c, b in blobs.items()}
    assert sizes["rans"] < 0.99 * sizes["brotli"] and sizes["rans"] < 0.97 * sizes["lzma"], sizes


def test_near_copy_rows_are_coded_against_a_prototype(sdclip_payload):
    meta, starts = tg.payload_index(sdclip_payload)
    rows, cols, _ = tg.payload_int_arrays(meta)[0]  # the embedding
    block = (np.frombuffer(sdclip_payload, np.uint8, rows * cols, starts["q"]) ^ 0x80).reshape(rows, cols)
    proto, near = tg.row_prototype(block)
    assert np.array_equal(np.nonzero(near)[0], np.arange(64))
    assert np.abs(block[:64].astype(np.int16) - 128 - proto).max() <= 1
    gauss = np.frombuffer(sdclip_payload, np.uint8, 2048 * 512, starts["q"] + rows * cols) ^ 0x80
    _, none = tg.row_prototype(gauss.reshape(2048, 512))
    assert not none.any()  # independent rows: no prototype


def test_degenerate_payloads_round_trip():
    """No tensors, only float tensors, a matrix of identical rows (all coded against the prototype: no symbol
    left for the column tables), a zero matrix, a matrix of one row."""
    row = torch.randn(1, 64)
    for max_numel, state in ((10 ** 9, {}), (10 ** 9, {"a": torch.randn(3, 5), "b": torch.randn(7)}),
                             (10, {"w": row.repeat(40, 1)}), (10, {"w": torch.zeros(40, 64), "v": row})):
        payload = tg.serialize_quantized(tg.quantize_state_dict(state, tg.Hyperparameters(float_max_numel=max_numel)))
        assert tg.decompress_artifact(tg.compress_artifact(payload)) == payload


def rans_regions(blob: bytes, payload: bytes) -> dict[str, int]:
    """A byte offset inside each region of a rANS artifact."""
    body = tg.ARTIFACT_HEADER.size
    side_len = struct.unpack_from("<I", blob, body)[0]
    states = body + 4 + side_len
    words = states + 4 * tg.rans_lanes(tg.payload_index(payload)[0]["sizes"]["q"])
    return {"magic": 0, "compressor": 8, "length": 9, "crc": 17, "side length": body, "side data (lzma)": body + 4 + side_len // 2,
            "lane states": states + 1, "words": (words + len(blob)) // 2, "last word": len(blob) - 1}


def test_damaged_artifacts_are_refused(sdclip_payload):
    blob = tg.compress_artifact(sdclip_payload, "rans")
    regions = rans_regions(blob, sdclip_payload)
    assert len(set(regions.values())) == len(regions)
    for region, offset in regions.items():
        damaged = bytearray(blob)
        damaged[offset] ^= 0x10
        with pytest.raises(tg.ArtifactError):
            tg.decompress_artifact(bytes(damaged))
    for cut in (5, tg.ARTIFACT_HEADER.size + 2, regions["side data (lzma)"], regions["lane states"], regions["words"], len(blob) - 1):
        with pytest.raises(tg.ArtifactError):
            tg.decompress_artifact(blob[:cut])
    with pytest.raises(tg.ArtifactError):
        tg.decompress_artifact(blob + b"\0\0")


def test_old_and_foreign_artifacts_are_refused_with_a_clear_message():
    import brotli
    h, state = lqer_state()
    payload = tg.serialize_quantized(tg.quantize_state_dict(state, h))
    v1 = struct.pack("<8sQI", b"PGOLF-A1", len(payload), zlib.crc32(payload)) + brotli.compress(payload, quality=1)
    with pytest.raises(tg.ArtifactError, match="another version of train_gpt.py"):
        tg.decompress_artifact(v1)
    with pytest.raises(tg.ArtifactError, match="not a model written by train_gpt.py"):
        tg.decompress_artifact(b"PK\3\4" + v1[4:])
    blob = bytearray(tg.compress_artifact(payload, "lzma"))
    blob[8] = len(tg.COMPRESSORS)
    with pytest.raises(tg.ArtifactError, match="compressor"):
        tg.decompress_artifact(bytes(blob))
    old_payload = payload.replace(b'"version":2', b'"version":1', 1)
    assert len(old_payload) == len(payload)
    with pytest.raises(tg.ArtifactError, match="version 1"):
        tg.deserialize_quantized(old_payload)


# --------------------------------------------------------------------------------------------------
# LQER
# --------------------------------------------------------------------------------------------------

def test_int4_groups_round_trip_within_one_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 200, generator=g) * torch.tensor([[1e-3], [1.0], [30.0], [0.0]])  # 200 = 3 groups + 8
    x[3, 64:128] = 0.25  # constant groups: step 0, stored exactly as the zero point
    packed = tg.quantize_int4_groups(x)
    assert packed["q"].dtype == torch.int8 and packed["q"].shape == (4, 200)
    assert packed["q"].min() >= 0 and packed["q"].max() <= 15 and packed["q"].max() == 15
    assert packed["scale"].shape == packed["zero"].shape == (4, 4) and packed["scale"].dtype == torch.float16
    step = packed["scale"].float().repeat_interleave(tg.LQER_GROUP, 1)[:, :200]
    error = (tg.dequantize_int4_groups(packed) - x).abs()
    assert torch.all(error <= step + 1e-6 * x.abs())
    assert error.mean() < 0.3 * step[:3].mean()  # mostly within half a step: rounding, not truncation
    assert torch.equal(tg.dequantize_int4_groups(packed)[3, 64:128], x[3, 64:128])


def lqer_state(seed: int = 0):
    """Three matrices whose quantization errors differ in size, an embedding, and a small float tensor."""
    g = torch.Generator().manual_seed(seed)
    state = {"tok_emb.weight": 0.02 * torch.randn(300, 64, generator=g),
             "blocks.0.attn.q.weight": 0.02 * torch.randn(64, 64, generator=g),
             "blocks.0.mlp.up.weight": torch.distributions.StudentT(2.0).sample((256, 64)) * 0.02,
             "blocks.0.mlp.down.weight": 0.02 * torch.randn(64, 256, generator=g),
             "skip_gates": torch.randn(2, 64, generator=g)}
    return tg.Hyperparameters(float_max_numel=1000, lqer_enabled=True, lqer_top_k=2, lqer_rank=4), state


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_lqer_corrects_the_top_k_matrices_and_round_trips_exactly(method):
    h, state = lqer_state()
    hessians = None
    if method == "gptq":
        hessians = {}
        for name, w in state.items():
            if w.ndim == 2 and w.numel() > h.float_max_numel:
                x = torch.randn(512, w.size(1)) @ torch.randn(w.size(1), w.size(1)) / w.size(1) ** 0.5
                hessians[name] = x.T @ x
    plain = tg.quantize_state_dict(state, tg.Hyperparameters(float_max_numel=1000, lqer_enabled=False), hessians)
    quantized = tg.quantize_state_dict(state, h, hessians)
    errors = {n: (state[n] - tg.dequantize_entry(e)).norm().item() for n, e in plain.items() if e["kind"] == "int"}
    top = sorted(errors, key=errors.get, reverse=True)[:2]
    assert {n for n, e in quantized.items() if "lqer" in e} == set(top)
    dequantized = tg.dequantize_state_dict(quantized)
    for name in top:
        e = quantized[name]
        assert torch.equal(e["q"], plain[name]["q"]) and torch.equal(e["scale"], plain[name]["scale"])
        a, b = e["lqer"]["a"], e["lqer"]["b"]
        assert a["q"].shape == (4, state[name].size(0)) and b["q"].shape == (4, state[name].size(1))
        corrected = (state[name] - dequantized[name]).norm().item()
        assert corrected < 0.97 * errors[name], (name, corrected, errors[name])
        # the correction is the int4 factors' product, and close to the best rank-4 fit of the error
        residual = state[name] - tg.dequantize_entry(plain[name])
        s = torch.linalg.svdvals(residual)
        best = (s[4:] ** 2).sum().sqrt().item()
        assert corrected < best + 0.5 * (errors[name] - best)
    payload = tg.serialize_quantized(quantized)
    restored = tg.deserialize_quantized(tg.decompress_artifact(tg.compress_artifact(payload)))
    assert tg.serialize_quantized(restored) == payload
    for name, e in quantized.items():
        r = restored[name]
        if e["kind"] == "int":
            assert torch.equal(r["q"], e["q"]) and torch.equal(r["scale"], e["scale"]) and r["bits"] == e["bits"]
            assert ("lqer" in r) == ("lqer" in e)
            for factor in e.get("lqer", {}):
                for part in ("q", "scale", "zero"):
                    assert torch.equal(r["lqer"][factor][part], e["lqer"][factor][part]), (name, factor, part)
        else:
            assert torch.equal(r["data"], e["data"])
        assert torch.equal(tg.dequantize_entry(r), dequantized[name])


# --------------------------------------------------------------------------------------------------
# The script end to end (2 steps: the 100-step smoke runs of test_end_to_end and test_gptq check the artifact of a
# trained model): LQER on, the block matrices quantized too, and an artifact limit it exceeds
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("smoke_lqer")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"PRESET": "smoke", "OUTPUT_DIR": str(out_dir), "CUDA_VISIBLE_DEVICES": "", "RUN_ID": "lqer",
                "ITERATIONS": "2", "VAL_TOKENS_LIMIT": "1024", "FLOAT_MAX_NUMEL": "4096", "LQER_ENABLED": "1", "QUANT_METHOD": "rtn",
                "ARTIFACT_LIMIT_BYTES": "100000"})
    proc = subprocess.run([sys.executable, SCRIPT], cwd=str(out_dir), env=env, capture_output=True, text=True, timeout=600)
    return proc, out_dir


def test_over_the_limit_run_is_scored_then_fails(smoke_run):
    proc, out_dir = smoke_run
    assert proc.returncode != 0 and "artifact too large" in proc.stderr
    out = proc.stdout
    model_bytes = int(re.search(r"^Serialized model int6\+rans: (\d+) bytes$", out, re.M).group(1))
    total = int(re.search(r"^Total submission size int6\+rans: (\d+) bytes$", out, re.M).group(1))
    assert model_bytes == os.path.getsize(out_dir / tg.ARTIFACT_NAME) and 100_000 < total
    assert re.search(rf"^ERROR: total {total} bytes exceeds the 100000-byte limit by {total - 100_000} bytes", out, re.M)
    assert re.match(r"^final_int6_rans_roundtrip_exact val_loss:[\d.]+ val_bpb:[\d.]+$", out.strip().splitlines()[-1])


def test_the_run_wrote_its_model_with_lqer_factors(smoke_run):
    _, out_dir = smoke_run
    state = torch.load(out_dir / "final_model.pt")
    h = tg.Hyperparameters(float_max_numel=4096, lqer_enabled=True)
    payload = tg.serialize_quantized(tg.quantize_state_dict(state, h))
    with open(out_dir / tg.ARTIFACT_NAME, "rb") as f:
        assert tg.decompress_artifact(f.read()) == payload  # exactly this, through the same path
    restored = tg.deserialize_quantized(payload)
    assert sum("lqer" in e for e in restored.values()) == h.lqer_top_k


# --------------------------------------------------------------------------------------------------
# tools/bench/quant_bench.py on a tiny model (CPU)
# --------------------------------------------------------------------------------------------------

TINY_BENCH = {"data_path": os.path.join(REPO, "data", "sample"), "tokenizer_path": SAMPLE_TOKENIZER, "vocab_size": 1024,
              "num_layers": 2, "model_dim": 64, "num_heads": 2, "num_kv_heads": 1, "rope_dims": 8, "float_max_numel": 1000,
              "eval_seq_len": 128, "eval_stride": 128, "val_tokens_limit": 1024, "train_batch_tokens": 1024,
              "train_seq_len": 128, "gptq_calibration_batches": 1, "lqer_top_k": 2, **ARCH_OFF}


def test_quant_bench_scores_and_sizes_each_configuration(tmp_path, monkeypatch, capsys):
    import dataclasses
    import quant_bench
    h = tg.Hyperparameters(**TINY_BENCH)
    torch.manual_seed(0)
    model = tg.GPT(h)
    matrices, embeddings, _ = tg.split_parameters(model)
    with torch.no_grad():  # matrices trained-like: heavy tails, no zero projections; the gains, mixes and scales
        for p in matrices + embeddings:  # (float16 in the artifact) keep their init, so the network stays sane
            p.copy_(torch.distributions.StudentT(4.0).sample(p.shape) * 0.05)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "final_model.pt")
    cpu = torch.device("cpu")
    names = ["rtn-e6", "rtn-e7", "gptq-e7", "gptq+lqer-e7", "gptq-absmax-e7"]
    result = quant_bench.bench(str(tmp_path / "final_model.pt"), h, names, "first", cpu, log=lambda _: None)
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == names
    val = tg.load_validation(h, tg.load_tokenizer(h.tokenizer_path, h.vocab_size))
    model.eval()
    assert result["float_bpb"] == tg.evaluate_bpb(model.token_losses, val, h, tg.Runtime())[1]
    hessians = tg.collect_hessians(model, tg.calibration_batches(h, tg.Runtime()), cpu)
    for name in ("rtn-e6", "gptq+lqer-e7"):  # each row is what the script would write and score
        hc = dataclasses.replace(h, **quant_bench.CONFIGS[name])
        quantized = tg.quantize_state_dict(state, hc, hessians if hc.quant_method == "gptq" else None)
        assert len(tg.compress_artifact(tg.serialize_quantized(quantized))) == rows[name]["rans_bytes"]
        model.load_state_dict(tg.dequantize_state_dict(quantized))
        bpb = tg.evaluate_bpb(model.token_losses, val, h, tg.Runtime())[1]
        assert rows[name]["val_bpb"] == pytest.approx(bpb, abs=1e-9)
        assert rows[name]["gap"] == pytest.approx(bpb - result["float_bpb"], abs=1e-12)
    assert rows["rtn-e7"]["rans_bytes"] > rows["rtn-e6"]["rans_bytes"] and rows["rtn-e7"]["gap"] < rows["rtn-e6"]["gap"]
    assert len(rows["gptq+lqer-e7"]["lqer_tensors"]) == 2 and rows["gptq+lqer-e7"]["rans_bytes"] > rows["gptq-e7"]["rans_bytes"]
    assert rows["gptq+lqer-e7"]["gap"] < rows["gptq-e7"]["gap"] and not rows["gptq-e7"]["lqer_tensors"]
    assert rows["rtn-e6"]["lzma_bytes"] > rows["rtn-e6"]["rans_bytes"] and "lzma_bytes" not in rows["rtn-e7"]
    assert rows["rtn-e6"]["embed_copy_rows"] == 0  # independent random rows
    assert rows["gptq-absmax-e7"]["rans_bytes"] > rows["gptq-e7"]["rans_bytes"]  # the finer grid costs bytes
    table = quant_bench.markdown(result).splitlines()
    assert len(table) == 4 + len(rows) and all(line.count("|") == 14 for line in table[2:])
    # the command line reads the Hyperparameters from the environment, as a run does
    for key, value in TINY_BENCH.items():
        monkeypatch.setenv(key.upper(), str(value))
    assert quant_bench.main(["--state", str(tmp_path / "final_model.pt"), "--configs", "rtn-e6", "--baselines", "none",
                             "--json", str(tmp_path / "out.json")]) == 0
    assert f"| rtn-e6 | {rows['rtn-e6']['val_bpb']:.5f} |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        quant_bench.main(["--state", "x", "--configs", "rtn-e5"])
