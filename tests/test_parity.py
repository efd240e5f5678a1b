"""The model and schedule are the published record's (the spec's "Model (top stack)" and "Optimizer and
schedule"), and so are the defaults. Each published difference is pinned here by shapes, initial values or an
identity at init."""
import pytest
import torch

import train_gpt as tg
from conftest import PROXY
from conftest import make_model, perturb, tiny_hparams, tokens_with_bos

DIM = 64  # tiny_hparams' width


# ---------------------------------------------------------------------------------------------------- blocks

def test_block_parameters_start_as_published():
    block = tg.Block(tiny_hparams(), 0)
    assert block.resid_mix.shape == (2, DIM)
    assert torch.equal(block.resid_mix[0], torch.ones(DIM)) and torch.equal(block.resid_mix[1], torch.zeros(DIM))
    assert torch.equal(block.attn_scale, torch.ones(DIM)) and torch.equal(block.mlp_scale, torch.ones(DIM))
    assert all(p.dtype == torch.float32 for p in (block.resid_mix, block.attn_scale, block.mlp_scale))


@pytest.mark.parametrize("parallel", [False, True])
def test_at_init_the_block_reads_the_stream_alone(parallel):
    """resid_mix (1, 0) and scales 1: the block is x + attn(n(x)) + mlp(n(·)) whatever x0 holds."""
    torch.manual_seed(0)
    block = tg.Block(tiny_hparams(parallel_residual_start=0 if parallel else -1), 3)
    with torch.no_grad():  # nonzero output projections, so the sublayers do contribute
        block.attn.proj.weight.normal_(std=0.1)
        block.mlp.down.weight.normal_(std=0.1)
    x, x0 = torch.randn(2, 9, DIM), torch.randn(2, 9, DIM)
    n = tg.rms_norm(x) * 0.5
    with torch.no_grad():
        if parallel:
            expected = x + block.attn(n) + block.mlp(n)
        else:
            mid = x + block.attn(n)
            expected = mid + block.mlp(tg.rms_norm(mid) * 0.5)
        assert torch.allclose(block(x, x0), expected, atol=1e-6)
        assert torch.equal(block(x, x0), block(x, torch.zeros_like(x0)))


def test_resid_mix_and_scales_act_per_channel():
    torch.manual_seed(0)
    block = tg.Block(tiny_hparams(), 0)
    perturb(block)
    x, x0 = torch.randn(2, 9, DIM), torch.randn(2, 9, DIM)
    with torch.no_grad():
        read = block.resid_mix[0] * x + block.resid_mix[1] * x0
        mid = read + block.attn_scale * block.attn(tg.rms_norm(read))
        expected = mid + block.mlp_scale * block.mlp(tg.rms_norm(mid))
        assert torch.allclose(block(x, x0), expected, atol=1e-5)


def test_model_feeds_every_block_the_normed_embedding_as_x0():
    model = make_model(smear_gate_enabled=True)
    perturb(model)
    idx = tokens_with_bos()
    seen = []
    handles = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[1])) for b in model.blocks]
    with torch.no_grad():
        model.logits(idx)
        x = model.tok_emb(idx)
        x0 = tg.rms_norm(tg.smear(x, idx, model.smear_strength(x)))  # after smear and RMSNorm
    for handle in handles:
        handle.remove()
    assert len(seen) == 5 and all(torch.equal(s, x0) for s in seen)


# ---------------------------------------------------------------------------------------------------- skips

def test_skip_join_at_init_is_half_the_stream_and_half_the_skip():
    model = make_model()
    assert torch.equal(model.skip_weights, torch.ones(2, DIM)) and torch.equal(model.skip_gates, torch.zeros(2, DIM))
    x, skip = torch.randn(2, 5, DIM), torch.randn(2, 5, DIM)
    joined = tg.join_skip(x, skip, model.skip_weights[0], model.skip_gates[0])
    assert torch.allclose(joined, 0.5 * x + 0.5 * skip, atol=1e-7)


def test_skip_join_is_the_lerp_of_the_weighted_skip():
    g = torch.Generator().manual_seed(0)
    x, skip, w, gate = (torch.randn(*shape, generator=g) for shape in ((2, 5, DIM), (2, 5, DIM), (DIM,), (DIM,)))
    a = torch.sigmoid(gate)
    assert torch.allclose(tg.join_skip(x, skip, w, gate), a * x + (1 - a) * w * skip, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- two lanes

def test_two_lane_block_at_init():
    """r = 1.1, p = 1: both lanes become 1.1·lane + attn_out + mlp_out; attention reads lane 0, the MLP lane 1."""
    torch.manual_seed(0)
    block = tg.Block(tiny_hparams(parallel_residual_start=0, parallel_residual_lanes=2), 8)
    assert block.two_lanes and block.lane_residual.shape == (2,) and block.lane_post.shape == (2, 2)
    with torch.no_grad():
        block.attn.proj.weight.normal_(std=0.1)
        block.mlp.down.weight.normal_(std=0.1)
        lane0, lane1, x0 = torch.randn(2, 9, DIM), torch.randn(2, 9, DIM), torch.randn(2, 9, DIM)
        scale = 1 / 3  # 1/√(8 + 1)
        attn_out, mlp_out = block.attn(tg.rms_norm(lane0) * scale), block.mlp(tg.rms_norm(lane1) * scale)
        out0, out1 = block((lane0, lane1), x0)
        assert torch.allclose(out0, 1.1 * lane0 + attn_out + mlp_out, atol=1e-5)
        assert torch.allclose(out1, 1.1 * lane1 + attn_out + mlp_out, atol=1e-5)


def test_two_lane_output_is_the_mean_of_the_lanes():
    model = make_model(parallel_residual_start=3, parallel_residual_lanes=2)
    perturb(model)
    idx = tokens_with_bos()
    lanes = []
    handle = model.blocks[4].register_forward_hook(lambda _m, _a, out: lanes.append(out))
    with torch.no_grad():
        logits = model.logits(idx)
    handle.remove()
    (lane0, lane1), = lanes
    expected = tg.rms_norm((lane0 + lane1) / 2) @ model.tok_emb.weight.T
    assert torch.allclose(logits, 30 * torch.tanh(expected / 30), atol=1e-5)


# ---------------------------------------------------------------------------------------------------- init

def test_q_k_v_and_mlp_up_are_orthogonal_at_init():
    model = tg.GPT(tiny_hparams(num_heads=4, num_kv_heads=2))
    for block in model.blocks:
        for w in (block.attn.q.weight, block.attn.k.weight, block.attn.v.weight, block.mlp.up.weight):
            w = w.detach().double()
            gram = w.T @ w if w.size(0) >= w.size(1) else w @ w.T  # the smaller Gram matrix is the identity
            assert torch.allclose(gram, torch.eye(gram.size(0), dtype=torch.float64), atol=1e-5)
        assert not block.attn.proj.weight.any() and not block.mlp.down.weight.any()  # zero: blocks start as identity
    assert model.blocks[0].attn.k.weight.shape == (32, 64) and model.blocks[0].mlp.up.weight.shape == (256, 64)


# ---------------------------------------------------------------------------------------------------- SmearGate

def test_smear_gate_is_the_identity_at_init_and_masked_at_bos():
    model = make_model(smear_gate_enabled=True)
    assert model.smear_gate.shape == (1, 12) and model.smear_lambda.shape == (1,)
    assert not model.smear_gate.any() and not model.smear_lambda.any()
    idx = tokens_with_bos()
    x = torch.randn(2, 24, DIM)
    assert torch.equal(tg.smear(x, idx, model.smear_strength(x)), x)
    with torch.no_grad():
        model.smear_lambda.fill_(2.0)
        model.smear_gate.normal_()
        out = tg.smear(x, idx, model.smear_strength(x))
    bos = idx == tg.BOS_ID
    assert torch.equal(out[bos], x[bos]) and torch.equal(out[:, 0], x[:, 0])
    factor = 2.0 * torch.sigmoid(x[:, 1:, :12] @ model.smear_gate.detach().T)
    inside = ~bos[:, 1:]
    assert torch.allclose(out[:, 1:][inside], (x[:, 1:] + factor * x[:, :-1])[inside], atol=1e-6)


# ---------------------------------------------------------------------------------------------------- attention

def test_attention_output_gate_is_one_half_at_init_and_has_no_factor_two():
    torch.manual_seed(0)
    attn = tg.Attention(tiny_hparams(attn_gate_enabled=True))
    assert attn.gate.shape == (4, 12) and not attn.gate.any()
    x = torch.randn(2, 6, DIM)
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(DIM))
        gated = attn(x)
        attn.gated = False
        plain = attn(x)
        attn.gate.normal_()  # the logit's scale shows only once the gate is not zero: σ(0.5·W·x[:12]), not σ(W·x[:12])
        attn.gated = True
        scaled = attn(x)
    assert torch.allclose(gated, 0.5 * plain, atol=1e-7)
    factor = torch.sigmoid(0.5 * x[..., :12] @ attn.gate.detach().T)  # (batch, time, heads)
    assert torch.allclose(scaled, (plain.view(2, 6, 4, -1) * factor[..., None]).view_as(plain), atol=1e-6)


def test_partial_rope_is_16_of_64_dims_at_base_10000_without_yarn():
    h = tg.Hyperparameters()
    assert (h.rope_dims, h.rope_base, h.model_dim // h.num_heads) == (16, 10000.0, 64)
    assert not any("yarn" in f.name for f in tg.fields(tg.Hyperparameters))
    rotary = tg.PartialRotary(h.rope_dims, h.rope_base)
    assert torch.allclose(rotary.inv_freq, 10000.0 ** (-torch.arange(0, 16, 2) / 16))  # unscaled frequencies
    x = torch.randn(1, 40, 2, 64)
    y = rotary(x)
    assert torch.equal(y[..., 16:], x[..., 16:])  # 48 channels carry no position
    assert torch.allclose(y[..., :16].norm(dim=-1), x[..., :16].norm(dim=-1), atol=1e-5)  # a rotation
    t = 7  # pair i of position t turned by t·inv_freq[i]
    angle = t * rotary.inv_freq
    assert torch.allclose(y[0, t, 0, :8], x[0, t, 0, :8] * angle.cos() - x[0, t, 0, 8:16] * angle.sin(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------- schedule

def test_lr_multiplier_has_no_warmup_and_reaches_min_lr_at_0915_and_holds():
    h = tg.Hyperparameters()
    assert (h.warmup_steps, h.warmdown_frac, h.min_lr) == (0, 0.85, 0.10)
    assert tg.lr_multiplier(0, 0.0, h) == 1.0  # the first step at the full rate
    assert tg.lr_multiplier(500, 0.15, h) == 1.0
    for frac in (0.2, 0.5, 0.9):
        assert tg.lr_multiplier(500, frac, h) == pytest.approx((1 - frac) / 0.85)
    assert tg.lr_multiplier(500, 0.915, h) == pytest.approx(0.10)
    assert tg.lr_multiplier(500, 0.914, h) > 0.10
    for frac in (0.92, 0.96, 1.0, 1.2):
        assert tg.lr_multiplier(500, frac, h) == pytest.approx(0.10)


def test_ema_decay_is_constant_from_the_first_step():
    model = torch.nn.Linear(3, 2, bias=False)
    ema = tg.EMA(model, 0.9965)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.params[0], 0.9965 * start + 0.0035 * model.weight, atol=1e-7)
    previous = ema.params[0].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.params[0], 0.9965 * previous + 0.0035 * model.weight, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- defaults

def test_defaults_are_the_published_configuration():
    h = tg.Hyperparameters()
    assert (h.num_loops, h.loop_start, h.loop_end, h.loop_enable_frac) == (2, 3, 5, 0.35)
    assert (h.doc_attention, h.parallel_residual_start, h.parallel_residual_lanes) == (True, 8, 2)
    assert (h.smear_gate_enabled, h.attn_gate_enabled, h.xsa_enabled) == (True, True, True)
    assert (h.ema_decay, h.grad_clip_norm, h.matrix_lr, h.scalar_lr, h.embed_lr) == (0.9965, 0.3, 0.026, 0.02, 0.03)
    assert h.compile_warmup_steps == 20 and h.quant_reserve_seconds > 0  # graphs primed; GPTQ inside the 600 s


def test_default_model_is_the_published_one():
    """The default layout at a quarter of the width (the full one's size is test_model_defaults_match_the_spec's)."""
    model = tg.GPT(tg.Hyperparameters(vocab_size=512, model_dim=128, num_heads=2, num_kv_heads=1))
    assert model.looped_layout == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert [b.two_lanes for b in model.blocks] == [False] * 8 + [True] * 3
    assert model.doc_attention and hasattr(model, "smear_gate")
    assert all(b.attn.xsa and b.attn.gate.shape == (2, 12) for b in model.blocks)


def test_proxy_preset_turns_off_the_four_slow_features(monkeypatch):
    monkeypatch.setenv("PRESET", "proxy")
    h = tg.Hyperparameters.from_env()
    assert {k: getattr(h, k) for k in PROXY} == PROXY
    assert {k.lower() for k in tg.PROXY_PRESET} == set(PROXY)
    assert (h.num_layers, h.xsa_enabled, h.attn_gate_enabled, h.parallel_residual_start) == (11, True, True, 8)
    monkeypatch.setenv("NUM_LOOPS", "2")  # the environment still wins over the preset
    assert tg.Hyperparameters.from_env().num_loops == 2


def test_smoke_preset_builds_its_model(monkeypatch):
    monkeypatch.setenv("PRESET", "smoke")
    h = tg.Hyperparameters.from_env()
    assert (h.num_layers, h.num_loops, h.doc_attention, h.smear_gate_enabled) == (4, 0, False, True)
    tg.GPT(h)
