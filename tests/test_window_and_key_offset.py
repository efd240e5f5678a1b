"""Sliding-window attention (ATTN_WINDOW on the ATTN_WINDOW_LAYERS) and the partial key offset (KEY_OFFSET_DIMS):
each against a float64 reference with explicit masks and shifts, no reach past the window, no key carried across a
document boundary, one window for training and evaluation, and bad settings refused naming the variable. Their TTT
windows are checked in test_ttt.py (the replay and LR-0 tests run with both on)."""
import math

import pytest
import torch

import train_gpt as tg
from conftest import documents_of, make_model, perturb, tiny_hparams, tokens_with_bos


def reference_attention(q, k, v, allowed) -> torch.Tensor:
    """float64 softmax(q·k/√d)·v, query by query, over the keys s with allowed(b, t, s); query head h reads kv head
    h // group."""
    q, k, v = q.double(), k.double(), v.double()
    batch, seq_len, heads, head_dim = q.shape
    group = heads // k.size(2)
    out = torch.zeros(batch, seq_len, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for t in range(seq_len):
            keys = [s for s in range(seq_len) if allowed(b, t, s)]
            for h in range(heads):
                scores = torch.stack([q[b, t, h] @ k[b, s, h // group] for s in keys]) / math.sqrt(head_dim)
                weights = torch.softmax(scores, 0)
                out[b, t, h] = sum(w * v[b, s, h // group] for w, s in zip(weights, keys))
    return out


def document_ids(idx: torch.Tensor) -> list[dict[int, int]]:
    return [{t: d for d, (s, e) in enumerate(documents_of(row)) for t in range(s, e)} for row in idx]


def random_qkv(seed: int = 0, seq_len: int = 24):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, seq_len, heads, 8, generator=g) for heads in (4, 2, 2))


# ---------------------------------------------------------------------------------------------------- the window

@pytest.mark.parametrize("window", [1, 5, 22, 60])  # 22: the band reaches the row's start from its last query
@pytest.mark.parametrize("bounds", ["none", "mask", "packed"])
def test_windowed_attention_equals_a_float64_band_reference(window, bounds, request):
    idx = tokens_with_bos()
    q, k, v = random_qkv()
    starts, doc = tg.document_starts(idx), document_ids(idx)
    if bounds == "packed":
        request.getfixturevalue("packed_path")  # the reference varlen kernel, which must receive the window
    docs = {"none": None, "mask": tg.document_mask(starts), "packed": tg.document_segments(starts, 4)}[bounds]
    out = tg.causal_attention(q, k, v, docs, window)

    def in_band(b, t, s):
        return 0 <= t - s <= window and (bounds == "none" or doc[b][t] == doc[b][s])

    ref = reference_attention(q, k, v, in_band)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_window_zero_is_the_plain_causal_attention_to_the_bit():
    q, k, v = random_qkv()
    assert torch.equal(tg.causal_attention(q, k, v, None, 0), tg.causal_attention(q, k, v))


@pytest.mark.parametrize("key_offset_dims,reach", [(0, 3), (4, 4)])  # the offset key at s holds token s − 1's part
def test_a_token_further_back_than_the_window_does_not_reach_a_windowed_layer(key_offset_dims, reach):
    model = make_model(attn_window=3, attn_window_layers="0", key_offset_dims=key_offset_dims)
    perturb(model)
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(0))
    t = 10
    for block, layer_reach in ((model.blocks[0], reach), (model.blocks[1], t)):  # layer 1: the whole context
        with torch.no_grad():
            before = block.attn(x)[0, t]
            for s in range(t + 1):
                changed = x.clone()
                changed[0, s] += 1.0
                moved = not torch.equal(block.attn(changed)[0, t], before)
                assert moved == (t - s <= layer_reach), (s, layer_reach)


def test_a_model_of_windowed_layers_sees_no_further_than_layers_times_window():
    model = make_model(attn_window=2)  # every one of the 5 layers: the logits at t see tokens t − 10..t
    perturb(model)
    idx = torch.randint(2, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    t = 16
    with torch.no_grad():
        before = model.logits(idx)[0, t]
        for s in range(t + 1):
            changed = idx.clone()
            changed[0, s] = 2 + (int(idx[0, s]) + 7) % 95
            assert torch.equal(model.logits(changed)[0, t], before) == (t - s > 10), s


def test_looped_layers_keep_their_physical_window():
    model = make_model(attn_window=6, attn_window_layers="1,3-4", num_loops=1, loop_start=1, loop_end=2)
    assert [block.attn.window for block in model.blocks] == [0, 6, 0, 6, 6]
    assert model.layout() == ([0, 1, 2], [1, 2, 3, 4])  # layer 1's second pass is the same module, window and all


def test_training_and_evaluation_score_with_the_same_window():
    """The training loss is the mean of the evaluation's per-token losses: one model, one window, in both modes."""
    model = make_model(attn_window=4, attn_window_layers="0-2", key_offset_dims=5, doc_attention=True)
    perturb(model)
    idx = tokens_with_bos()
    targets = torch.roll(idx, -1, 1)
    with torch.no_grad():
        train_loss = model.train()(idx, targets)
        eval_losses = model.eval().token_losses(idx, targets)
    assert torch.allclose(train_loss, eval_losses.mean(), rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_gpu_kernels_take_the_window_of_the_band_mask():
    """FlashAttention-3 (or SDPA's band mask) on dense rows, and the varlen kernel on packed documents, against the
    float32 mask path on the CPU."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 512, heads, 64, generator=g) for heads in (8, 4, 4))
    idx = torch.randint(2, 97, (2, 512), generator=g)
    idx[0, 100] = idx[1, 300] = tg.BOS_ID
    starts = tg.document_starts(idx)
    for docs_cpu, docs_gpu in ((None, None), (tg.document_mask(starts), tg.document_segments(starts.cuda(), 8))):
        if docs_gpu is not None and not (tg.VARLEN_DEVICES and tg.VARLEN_WINDOWS):
            continue
        want = tg.causal_attention(q, k, v, docs_cpu, 37)
        got = tg.causal_attention(*(t.cuda().bfloat16() for t in (q, k, v)), docs_gpu, 37).float().cpu()
        assert ((got - want).norm() / want.norm()).item() < 1e-2


# ---------------------------------------------------------------------------------------------------- the key offset

@pytest.mark.parametrize("with_starts", [True, False])
def test_offset_keys_equals_a_shift_written_out(with_starts):
    idx = tokens_with_bos()
    starts = tg.document_starts(idx)
    k = torch.randn(2, 24, 2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = tg.offset_keys(k, starts if with_starts else None, 5)
    want = k.clone()
    for b in range(2):
        for t in range(24):
            first = t == 0 or (with_starts and bool(starts[b, t]))
            want[b, t, :, 11:] = 0.0 if first else k[b, t - 1, :, 11:]
    assert torch.equal(out, want)


def test_attention_with_window_and_key_offset_equals_a_handwritten_layer():
    """The whole layer in float64: projections, q/k RMSNorm and RoPE, the offset key channels, a band mask inside
    documents, softmax, output projection."""
    h = tiny_hparams(attn_window=4, key_offset_dims=6)
    torch.manual_seed(0)
    attn = tg.Attention(h, window=4).double()
    x = torch.randn(2, 24, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    idx = tokens_with_bos()
    starts, doc = tg.document_starts(idx), document_ids(idx)
    with torch.no_grad():
        out = attn(x, tg.document_mask(starts), starts)
        q = (x @ attn.q.weight.T).view(2, 24, 4, 16)
        k = (x @ attn.k.weight.T).view(2, 24, 2, 16)
        v = (x @ attn.v.weight.T).view(2, 24, 2, 16)
        q = attn.rotary(tg.rms_norm(q)) * attn.q_gain
        k = attn.rotary(tg.rms_norm(k))
        shifted = k.clone()
        for b in range(2):
            for t in range(24):
                shifted[b, t, :, 10:] = 0.0 if starts[b, t] else k[b, t - 1, :, 10:]
        y = reference_attention(q, shifted, v, lambda b, t, s: 0 <= t - s <= 4 and doc[b][t] == doc[b][s])
        want = y.reshape(2, 24, 64) @ attn.proj.weight.T
    assert (out - want).abs().max().item() < 1e-10


def test_the_key_offset_never_carries_a_token_into_the_next_document():
    """Changing the last token before a BOS changes nothing from that BOS on (the BOS's offset channels are zero),
    with document attention; it does change the BOS's key, and so the next position, when the offset ignores BOS."""
    model = make_model(key_offset_dims=6, doc_attention=True)
    perturb(model)
    idx = tokens_with_bos()  # BOS inside the rows: row 0 at 9, row 1 at 14
    for b, bos in ((0, 9), (1, 14)):
        changed = idx.clone()
        changed[b, bos - 1] = 2 + (int(idx[b, bos - 1]) + 11) % 95
        with torch.no_grad():
            before, after = model.logits(idx), model.logits(changed)
            assert torch.equal(before[b, bos:], after[b, bos:])
            assert not torch.equal(before[b, :bos], after[b, :bos])
            model.key_offset = False  # no starts reach the layers: only row starts zero the offset channels
            try:
                leaked = not torch.equal(model.logits(idx)[b, bos:], model.logits(changed)[b, bos:])
            finally:
                model.key_offset = True
        assert leaked


# ---------------------------------------------------------------------------------------------------- settings

@pytest.mark.parametrize("overrides,message,model_refuses", [
    (dict(attn_window=-1), "ATTN_WINDOW=-1 is out of range: it must be at least 0", False),
    (dict(attn_window=8, attn_window_layers="0-x"),
     r"ATTN_WINDOW_LAYERS='0-x' is not a list of layers: set it to layers and ranges of 0\.\.4 \(NUM_LAYERS=5\)", True),
    (dict(attn_window=8, attn_window_layers="0-7"), r"ATTN_WINDOW_LAYERS='0-7' names '0-7', not layers of this model",
     True),
    (dict(attn_window=8, attn_window_layers="3-1"), r"ATTN_WINDOW_LAYERS='3-1' names '3-1'", True),
    (dict(attn_window=8, attn_window_layers="1,,2"), r"ATTN_WINDOW_LAYERS='1,,2' is not a list of layers", True),
    (dict(key_offset_dims=-1), "KEY_OFFSET_DIMS=-1 is out of range: it must be at least 0", False),
    (dict(key_offset_dims=9), r"KEY_OFFSET_DIMS=9 must be at most the 8 channels of a head without RoPE", True),
])
def test_bad_windows_and_offsets_are_refused_naming_the_variable(overrides, message, model_refuses):
    h = tiny_hparams(**overrides)
    with pytest.raises(SystemExit, match=message):
        h.validate(world_size=1)
    if model_refuses:  # what no model could be built from; a range is validate()'s alone
        with pytest.raises(SystemExit, match=message):
            tg.GPT(h)


def test_window_settings_are_read_from_the_environment():
    h = tg.Hyperparameters.from_env({"ATTN_WINDOW": "256", "ATTN_WINDOW_LAYERS": "0-7", "KEY_OFFSET_DIMS": "16"})
    assert (h.attn_window, h.attn_window_layers, h.key_offset_dims) == (256, "0-7", 16)
    assert tg.windowed_layers(h) == set(range(8))
    assert [tg.layer_window(h, i) for i in range(11)] == [256] * 8 + [0] * 3
    h.validate(world_size=8)
    defaults = tg.Hyperparameters()
    assert (defaults.attn_window, defaults.key_offset_dims) == (0, 0) and tg.windowed_layers(defaults) == set(range(11))
    assert [tg.layer_window(defaults, i) for i in range(11)] == [0] * 11
