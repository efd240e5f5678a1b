"""The top stack's model features (XSA, SmearGate, attention output gate, parallel residuals): each off is the baseline
exactly, each on does what it says, and all four together stay causal and train end to end."""
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import (REPO, assert_causal, baseline_keys, baseline_logits, make_model, perturb, run_script,
                      tiny_hparams, tokens_with_bos)

FEATURES = {
    "xsa": dict(xsa_enabled=True),
    "smear": dict(smear_gate_enabled=True),
    "attn_gate": dict(attn_gate_enabled=True),
    "parallel": dict(parallel_residual_start=2),
}
OFF = {"xsa": dict(xsa_enabled=False), "smear": dict(smear_gate_enabled=False),
       "attn_gate": dict(attn_gate_enabled=False), "parallel": dict(parallel_residual_start=-1)}
ALL_ON = {k: v for f in FEATURES.values() for k, v in f.items()}


def test_defaults_are_the_published_choice():
    h = tg.Hyperparameters()
    assert (h.xsa_enabled, h.smear_gate_enabled, h.attn_gate_enabled, h.parallel_residual_start) == (True, True, True, 8)


def test_switches_are_read_from_the_environment(monkeypatch):
    for name in ("XSA_ENABLED", "SMEAR_GATE_ENABLED", "ATTN_GATE_ENABLED"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setenv("PARALLEL_RESIDUAL_START", "3")
    read, default = tg.Hyperparameters.from_env(), tg.Hyperparameters()
    switches = lambda h: (h.xsa_enabled, h.smear_gate_enabled, h.attn_gate_enabled, h.parallel_residual_start)
    assert switches(read) == (False, False, False, 3)
    assert all(a != b for a, b in zip(switches(read), switches(default)))  # each differs from its default


def test_all_off_is_the_handwritten_baseline():
    model = make_model()
    perturb(model)
    assert set(model.state_dict()) == baseline_keys(5)
    idx = tokens_with_bos()
    with torch.no_grad():
        assert torch.allclose(model.logits(idx), baseline_logits(model, idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_each_feature_off_equals_the_baseline_and_on_changes_the_model(feature):
    off = make_model(**OFF[feature])
    base = make_model()
    on = make_model(**FEATURES[feature])
    assert set(off.state_dict()) == set(base.state_dict()) == baseline_keys(5)
    for name, tensor in base.state_dict().items():  # same seed, same initial weights: new parameters use no RNG
        assert torch.equal(off.state_dict()[name], tensor) and torch.equal(on.state_dict()[name], tensor)
    extra = set(on.state_dict()) - baseline_keys(5)
    expected_extra = {"smear": {"smear_gate", "smear_lambda"}, "attn_gate": {f"blocks.{i}.attn.gate" for i in range(5)}}
    assert extra == expected_extra.get(feature, set())
    perturb(base)
    perturb(off)
    with torch.no_grad():
        for name, p in on.named_parameters():
            p.copy_(base.state_dict()[name] if name in base.state_dict() else 0.3 * torch.randn_like(p))
    idx = tokens_with_bos()
    with torch.no_grad():
        a, b, c = base.logits(idx), off.logits(idx), on.logits(idx)
    assert torch.equal(a, b)
    assert torch.allclose(a, baseline_logits(base, idx), atol=1e-5, rtol=0)
    assert (a - c).abs().max() > 1e-3  # switched on, the feature does change the model


def test_attention_gate_is_one_half_at_init():
    gated = make_model(attn_gate_enabled=True)
    assert all(torch.equal(b.attn.gate, torch.zeros(4, tg.ATTN_GATE_WIDTH)) for b in gated.blocks)
    h, plain = attention_with_identity_proj()
    _, half = attention_with_identity_proj(attn_gate_enabled=True)  # the same weights, the gate at its zero init
    x = torch.randn(2, 10, h.model_dim)
    with torch.no_grad():
        assert torch.allclose(half(x), 0.5 * plain(x), atol=1e-7, rtol=0)


def attention_with_identity_proj(**overrides):
    torch.manual_seed(5)
    h = tiny_hparams(**overrides)
    attn = tg.Attention(h).eval()
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(h.model_dim))  # the output is the per-head attention output itself
    return h, attn


def test_attention_gate_scales_each_head_by_sigmoid_half_logit():
    h, plain = attention_with_identity_proj()
    _, gated = attention_with_identity_proj(attn_gate_enabled=True)
    gated.load_state_dict({**plain.state_dict(), "gate": torch.randn(4, tg.ATTN_GATE_WIDTH)})
    x = torch.randn(2, 10, h.model_dim)
    with torch.no_grad():
        y0, y1 = plain(x).view(2, 10, 4, 16), gated(x).view(2, 10, 4, 16)
    expected_gate = torch.sigmoid(0.5 * x[..., :12] @ gated.gate.T)  # (2, 10, heads): no factor 2
    assert torch.allclose(y1, y0 * expected_gate.unsqueeze(-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 3)])
def test_xsa_output_is_orthogonal_to_the_heads_own_value(heads, kv_heads):
    g = torch.Generator().manual_seed(heads)
    y = torch.randn(2, 7, heads, 16, generator=g)
    v = 3 * torch.randn(2, 7, kv_heads, 16, generator=g)
    out = tg.exclusive_self_attention(y, v)
    v_hat = F.normalize(v.repeat_interleave(heads // kv_heads, dim=2), dim=-1)  # query head h reads kv head h // group
    assert (out * v_hat).sum(-1).abs().max() < 1e-5
    # only the component along v̂ is removed: y − out is parallel to v̂ with y's coefficient
    assert torch.allclose(y - out, (y * v_hat).sum(-1, keepdim=True) * v_hat, atol=1e-5)


def test_xsa_in_the_attention_module_removes_the_value_component():
    h, attn = attention_with_identity_proj(xsa_enabled=True)
    x = torch.randn(2, 10, h.model_dim)
    with torch.no_grad():
        y = attn(x).view(2, 10, 4, 16)
        v = attn.v(x).view(2, 10, 2, 16).repeat_interleave(2, dim=2)
    assert (y * F.normalize(v, dim=-1)).sum(-1).abs().max() < 1e-5
    assert y.abs().max() > 1e-2
    # position 0 attends only to itself: its output is its own value, so XSA leaves nothing there
    assert y[:, 0].abs().max() < 1e-5


def test_smear_mixes_the_previous_token_except_at_bos_and_position_zero():
    idx = tokens_with_bos()
    x = torch.randn(2, 24, 8)
    gate = torch.rand(8)
    out = tg.smear(x, idx, gate)
    for b in range(2):
        for t in range(24):
            if t == 0 or idx[b, t] == tg.BOS_ID:
                assert torch.equal(out[b, t], x[b, t])
            else:
                assert torch.allclose(out[b, t], x[b, t] + gate * x[b, t - 1], atol=1e-6)


def test_smear_does_not_cross_a_document_boundary():
    idx = tokens_with_bos()
    x = torch.randn(2, 24, 8)
    gate = torch.full((8,), 0.7)
    changed = x.clone()
    changed[0, 8] += 5.0  # the token just before the BOS at position 9
    changed[1, 13] += 5.0  # the token just before the BOS at position 14
    a, b = tg.smear(x, idx, gate), tg.smear(changed, idx, gate)
    assert torch.equal(a[0, 9], b[0, 9]) and torch.equal(a[1, 14], b[1, 14])
    # the same change does reach the next position where there is no boundary
    plain = idx.clone()
    plain[0, 9] = plain[1, 14] = 5
    assert (tg.smear(x, plain, gate)[0, 9] - tg.smear(changed, plain, gate)[0, 9]).abs().max() > 1.0


def test_smear_gate_in_the_model_is_the_published_form():
    """λ·σ(W·x_t[:12]) per token, W (1×12) and λ zero at init, so the model starts without it."""
    model, plain = make_model(smear_gate_enabled=True), make_model()
    assert torch.equal(model.smear_gate, torch.zeros(1, 12)) and torch.equal(model.smear_lambda, torch.zeros(1))
    idx = tokens_with_bos()
    with torch.no_grad():
        assert torch.equal(model.logits(idx), plain.logits(idx))  # the identity at init
        model.smear_gate.copy_(torch.randn(1, 12))
        model.smear_lambda.fill_(0.7)
        x = model.tok_emb(idx)
        expected = 0.7 * torch.sigmoid(x[:, 1:, :12] @ model.smear_gate.T)  # one factor per token
        assert torch.allclose(model.smear_strength(x), expected, atol=1e-7)
        assert torch.allclose(tg.smear(x, idx, expected)[:, 1:][idx[:, 1:] != tg.BOS_ID],
                              (x[:, 1:] + expected * x[:, :-1])[idx[:, 1:] != tg.BOS_ID], atol=1e-6)
    perturb(model)
    idx = tokens_with_bos()
    hidden_inputs = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _m, args: hidden_inputs.append(args[0]))
    changed = idx.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 95 + 2  # the last token of document 1 (BOS at 9)
    with torch.no_grad():
        model.logits(idx), model.logits(changed)
    handle.remove()
    a, b = hidden_inputs
    assert torch.equal(a[0, 9], b[0, 9])  # the BOS position's input to the blocks is untouched
    assert (a[0, 8] - b[0, 8]).abs().max() > 1e-3


def test_parallel_residual_blocks_read_one_input():
    model = make_model(parallel_residual_start=2)
    perturb(model)
    assert [b.parallel for b in model.blocks] == [False, False, True, True, True]
    x, x0 = torch.randn(2, 10, 64), torch.randn(2, 10, 64)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            read = block.resid_mix[0] * x + block.resid_mix[1] * x0
            n = tg.rms_norm(read) * block.norm_scale
            if i >= 2:
                expected = read + block.attn_scale * block.attn(n) + block.mlp_scale * block.mlp(n)
            else:
                x1 = read + block.attn_scale * block.attn(n)
                expected = x1 + block.mlp_scale * block.mlp(tg.rms_norm(x1) * block.norm_scale)
            assert torch.allclose(block(x, x0), expected, atol=1e-6)


def test_causal_with_all_features_on():
    model = make_model(**ALL_ON)
    perturb(model)
    assert_causal(model, tokens_with_bos(), t=11, vocab=97)


def test_new_parameters_go_to_adam_and_gates_are_int8_per_row_in_the_artifact():
    model = make_model(**ALL_ON)
    matrices, embeddings, scalars = tg.split_parameters(model)
    assert len(matrices) == 5 * 6  # the Muon set is the baseline's
    names = {id(p): n for n, p in model.named_parameters()}
    per_block = ("attn.q_gain", "attn.gate", "resid_mix", "attn_scale", "mlp_scale")
    assert {names[id(p)] for p in scalars} == ({"skip_weights", "skip_gates", "smear_gate", "smear_lambda"}
                                               | {f"blocks.{i}.{n}" for i in range(5) for n in per_block})
    perturb(model)
    quantized = tg.quantize_state_dict(model.state_dict(), tiny_hparams(float_max_numel=1000))
    for name in ("blocks.0.attn.gate", "smear_gate"):
        assert quantized[name]["kind"] == "int" and quantized[name]["bits"] == 8 and "lqer" not in quantized[name]
    assert quantized["smear_lambda"]["kind"] == "float16" and quantized["blocks.0.resid_mix"]["kind"] == "float16"
    blob = tg.compress_artifact(tg.serialize_quantized(quantized))
    restored = tg.dequantize_state_dict(tg.deserialize_quantized(tg.decompress_artifact(blob)))
    gate = model.blocks[3].attn.gate
    step = gate.abs().amax(1, keepdim=True) / 127  # the absmax grid: every value within half a step
    assert ((restored["blocks.3.attn.gate"] - gate).abs() <= step / 2 * (1 + 1e-2)).all()


def test_attention_gate_needs_twelve_channels():
    with pytest.raises(SystemExit, match="ATTN_GATE_ENABLED"):
        tg.GPT(tiny_hparams(attn_gate_enabled=True, model_dim=8, num_heads=2, num_kv_heads=1, rope_dims=4))


def test_smoke_run_with_all_features_on(tmp_path):
    env = {"RUN_ID": "arch", "ITERATIONS": "3", "VAL_TOKENS_LIMIT": "2048", "BROTLI_QUALITY": "5",
           "XSA_ENABLED": "1", "SMEAR_GATE_ENABLED": "1", "ATTN_GATE_ENABLED": "1", "PARALLEL_RESIDUAL_START": "2"}
    out = run_script([sys.executable, f"{REPO}/train_gpt.py"], env, str(tmp_path))
    assert "xsa_enabled=True smear_gate_enabled=True attn_gate_enabled=True parallel_residual_start=2" in out
    last = out.strip().splitlines()[-1]
    match = re.match(r"final_int6_rans_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)$", last)
    assert match, last
    assert math.isfinite(float(match.group(2)))
