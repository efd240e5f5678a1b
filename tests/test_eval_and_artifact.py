"""val_bpb byte counting and scoring, quantization, serialization, compression and code packing."""
import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import PROXY

DOCUMENTS = [
    "Cynic, n. A blackguard whose faulty vision sees things as they are.",
    "  leading spaces, café, naïve — and 漢字 with an emoji 🎉 at the end",
    "x",
    "Numbers 1234567 and\ttabs\nnew lines\n\nand   runs   of spaces.",
    "ÆØÅ æøå ÿ ẞ ß ﬁ",
]


def test_byte_counts_equal_a_brute_force_decode(sample_tokenizer):
    """Per-token byte counts, summed over each document, equal the UTF-8 length of the decoded document."""
    stream, doc_spans = [], []
    for text in DOCUMENTS:
        ids = sample_tokenizer.encode(text)
        doc_spans.append((len(stream) + 1, len(stream) + 1 + len(ids)))
        stream += [tg.BOS_ID] + ids
    tokens = np.array(stream, dtype=np.uint16)
    per_target = tg.target_byte_counts(tokens, tg.token_byte_tables(sample_tokenizer))
    assert any(sample_tokenizer.is_byte(int(t)) for t in tokens)  # the byte-fallback path is exercised
    for (start, end), text in zip(doc_spans, DOCUMENTS):
        decoded = sample_tokenizer.decode(tokens[start:end].tolist())
        # target i is tokens[i + 1], so document tokens start..end-1 are targets start-1..end-2
        assert per_target[start - 1:end - 1].sum() == len(decoded.encode("utf-8")), text
    assert per_target[[s - 2 for s, _ in doc_spans[1:]]].sum() == 0  # BOS targets count no bytes


def test_evaluate_bpb_matches_a_direct_computation(sample_tokenizer):
    """Sliding-window scoring of a model equals scoring every target once with its whole window as context,
    and the bits-per-byte conversion uses the decoded byte total."""
    torch.manual_seed(0)
    vocab = sample_tokenizer.get_piece_size()
    h = tg.Hyperparameters(vocab_size=vocab, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=4,
                           eval_seq_len=16, eval_stride=5, eval_batch_seqs=3, **PROXY)
    model = tg.GPT(h).eval()
    stream = []
    for text in DOCUMENTS:
        stream += [tg.BOS_ID] + sample_tokenizer.encode(text)
    tokens = np.array(stream, dtype=np.uint16)
    target_bytes = tg.target_byte_counts(tokens, tg.token_byte_tables(sample_tokenizer))
    assert len(tg.sliding_windows(len(tokens) - 1, 16, 5)) % 3  # the last batch is a padded partial one
    loss, bpb = tg.evaluate_bpb(model.token_losses, tg.ValidationData(tokens, target_bytes), h, tg.Runtime())

    t = torch.from_numpy(tokens.astype(np.int64))
    total = 0.0
    with torch.no_grad():
        for start, first, end in tg.sliding_windows(len(tokens) - 1, 16, 5):
            losses = model.token_losses(t[None, start:end], t[None, start + 1:end + 1])[0].double()
            total += losses[first - start:].sum().item()
    assert loss == pytest.approx(total / (len(tokens) - 1), rel=1e-9)
    decoded_bytes = sum(len(sample_tokenizer.decode(sample_tokenizer.encode(text)).encode("utf-8")) for text in DOCUMENTS)
    assert bpb == pytest.approx(total / math.log(2) / decoded_bytes, rel=1e-9)


# (7, 16, 12): a validation set shorter than the stride is one window
@pytest.mark.parametrize("n,seq_len,stride", [(10, 4, 2), (1000, 128, 64), (7, 16, 3), (100, 10, 10), (5, 5, 1),
                                              (7, 16, 12)])
def test_sliding_windows_score_every_target_once(n, seq_len, stride):
    covered = []
    windows = tg.eval_windows(n, tg.Hyperparameters(eval_seq_len=seq_len, eval_stride=stride))
    for start, first, end in windows:
        assert end - start == min(seq_len, n) and start <= first < end
        if first > 0:
            assert first - start >= min(seq_len, n) - stride  # context kept for every later window
        covered += range(first, end)
    assert covered == list(range(n))


def test_vocab_mismatch_is_refused(tmp_path):
    from conftest import SAMPLE_TOKENIZER
    with pytest.raises(SystemExit, match="VOCAB_SIZE=8192"):
        tg.load_tokenizer(SAMPLE_TOKENIZER, 8192)
    with pytest.raises(SystemExit, match="token id 2000"):
        tg.check_token_range(np.array([1, 5, 2000], dtype=np.uint16), 1024, "val")
    with pytest.raises(SystemExit, match="not found"):
        tg.load_tokenizer(str(tmp_path / "missing.model"), 1024)


def trained_like_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small model's state with heavy-tailed weights, as training leaves them."""
    torch.manual_seed(seed)
    h = tg.Hyperparameters(vocab_size=300, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2, rope_dims=8,
                           float_max_numel=4096, embed_bits=7, lqer_enabled=False, **PROXY)
    state = tg.GPT(h).state_dict()
    for name, t in state.items():
        t.copy_(torch.distributions.StudentT(4.0).sample(t.shape) * 0.02)
    state["blocks.0.mlp.down.weight"][3].zero_()  # a dead row must survive quantization as zeros
    return h, state


def test_quantize_serialize_compress_round_trip_is_exact():
    h, state = trained_like_state()
    quantized = tg.quantize_state_dict(state, h)
    kinds = {name: e["kind"] for name, e in quantized.items()}
    assert kinds["tok_emb.weight"] == "int" and quantized["tok_emb.weight"]["bits"] == h.embed_bits
    assert kinds["blocks.0.mlp.up.weight"] == "int" and quantized["blocks.0.mlp.up.weight"]["bits"] == 6
    assert kinds["skip_gates"] == "float16"
    blob = tg.compress_artifact(tg.serialize_quantized(quantized), quality=5)
    restored = tg.deserialize_quantized(tg.decompress_artifact(blob))
    assert list(restored) == list(quantized)
    for name, e in quantized.items():
        r = restored[name]
        if e["kind"] == "int":
            assert torch.equal(r["q"], e["q"]) and torch.equal(r["scale"], e["scale"]) and r["bits"] == e["bits"]
            qmax = 2 ** (e["bits"] - 1) - 1
            assert e["q"].abs().max() <= qmax
        else:
            assert torch.equal(r["data"], e["data"])
    dequantized = tg.dequantize_state_dict(restored)
    assert torch.all(dequantized["blocks.0.mlp.down.weight"][3] == 0)
    w, deq = state["blocks.0.attn.q.weight"], dequantized["blocks.0.attn.q.weight"]
    scale = quantized["blocks.0.attn.q.weight"]["scale"].float()[:, None]
    inside = w.abs() < 31 * scale  # not clipped: round to nearest is off by at most half a step
    assert torch.all((w - deq).abs()[inside] <= scale.expand_as(w)[inside] / 2 + 1e-7)


def test_corrupt_or_foreign_artifacts_are_refused():
    h, state = trained_like_state()
    blob = tg.compress_artifact(tg.serialize_quantized(tg.quantize_state_dict(state, h)), quality=5)
    with pytest.raises(tg.ArtifactError, match="shorter"):
        tg.decompress_artifact(blob[:10])
    with pytest.raises(tg.ArtifactError, match="decompress|corrupt"):
        tg.decompress_artifact(blob[:len(blob) // 2])
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    with pytest.raises(tg.ArtifactError):
        tg.decompress_artifact(bytes(flipped))
    with pytest.raises(tg.ArtifactError, match="magic"):
        tg.decompress_artifact(b"NOTOURS!" + blob[8:])
    payload = tg.serialize_quantized(tg.quantize_state_dict(state, h))
    with pytest.raises(tg.ArtifactError, match="bytes"):
        tg.deserialize_quantized(payload[:-3])
