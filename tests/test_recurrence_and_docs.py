"""Depth recurrence, document-bounded attention and two-lane parallel residuals: each off is the baseline exactly;
on, the looped model runs the spec's block order, no output ever depends on an earlier document of its row, and
the two lanes do what their definition says."""
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import REPO, run_script
from conftest import baseline_keys, baseline_logits, make_model, perturb, tiny_hparams, tokens_with_bos
from conftest import documents_of, reference_varlen, sample_hparams

SPEC_ENCODER = [0, 1, 2, 3, 4, 5, 3, 4]
SPEC_DECODER = [5, 3, 4, 5, 6, 7, 8, 9, 10]
# 5 layers, layers 1–2 looped once: order [0, 1, 2, 1, 2, 3, 4]; two lanes from layer 3 (decoder half in both layouts)
ALL_ON = dict(num_loops=1, loop_start=1, loop_end=2, doc_attention=True, parallel_residual_start=3,
              parallel_residual_lanes=2, xsa_enabled=True, smear_gate_enabled=True, attn_gate_enabled=True)


def spec_model(**overrides) -> tg.GPT:
    torch.manual_seed(0)
    h = tiny_hparams(num_layers=11, model_dim=32, num_loops=2, **overrides)
    model = tg.GPT(h).eval()
    perturb(model)
    return model


def record_block_order(model: tg.GPT, run) -> list[int]:
    calls = []
    handles = [b.register_forward_pre_hook(lambda _m, _a, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


# ---------------------------------------------------------------------------------------------------- switches off

def test_defaults_are_the_published_ones_and_read_from_the_environment(monkeypatch):
    h = tg.Hyperparameters()
    assert (h.num_loops, h.doc_attention, h.parallel_residual_lanes, h.parallel_residual_start) == (2, True, 2, 8)
    assert (h.loop_start, h.loop_end, h.loop_enable_frac) == (3, 5, 0.35)
    for name, value in dict(NUM_LOOPS="1", LOOP_START="2", LOOP_END="4", LOOP_ENABLE_FRAC="0.5", DOC_ATTENTION="0",
                            DOC_SEGMENT_TOKENS="64", PARALLEL_RESIDUAL_LANES="1").items():  # none the default
        monkeypatch.setenv(name, value)
    h = tg.Hyperparameters.from_env()
    assert (h.num_loops, h.loop_start, h.loop_end, h.loop_enable_frac) == (1, 2, 4, 0.5)
    assert (h.doc_attention, h.doc_segment_tokens, h.parallel_residual_lanes) == (False, 64, 1)


ON = {"loops": dict(num_loops=1, loop_start=1, loop_end=2), "docs": dict(doc_attention=True),
      "lanes": dict(parallel_residual_start=3, parallel_residual_lanes=2)}
OFF = {"loops": dict(num_loops=0), "docs": dict(doc_attention=False),
       "lanes": dict(parallel_residual_start=-1, parallel_residual_lanes=2)}  # two lanes but no parallel layer


@pytest.mark.parametrize("feature", sorted(ON))
def test_each_switch_off_is_the_baseline_and_on_changes_the_model(feature):
    base, off, on = make_model(), make_model(**OFF[feature]), make_model(**ON[feature])
    assert set(off.state_dict()) == set(base.state_dict()) == baseline_keys(5)
    for name, tensor in base.state_dict().items():
        assert torch.equal(off.state_dict()[name], tensor)
        if on.state_dict()[name].shape == tensor.shape:  # new parameters use no RNG: the shared ones start equal
            assert torch.equal(on.state_dict()[name], tensor)
    extra = set(on.state_dict()) - baseline_keys(5)
    lanes = {f"blocks.{i}.{n}" for i in (3, 4) for n in ("lane_residual", "lane_post")}
    assert extra == {"lanes": lanes}.get(feature, set())
    perturb(base)
    perturb(off)
    shared = base.state_dict()
    with torch.no_grad():
        for name, p in on.named_parameters():
            same = name in shared and shared[name].shape == p.shape
            p.copy_(shared[name] if same else 0.3 * torch.randn_like(p))
    idx = tokens_with_bos()
    with torch.no_grad():
        a, b, c = base.logits(idx), off.logits(idx), on.logits(idx)
    assert torch.equal(a, b)
    assert torch.allclose(a, baseline_logits(base, idx), atol=1e-5, rtol=0)
    assert (a - c).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------- recurrence

def test_layer_order_gives_the_spec_layouts():
    assert tg.layer_order(11, 3, 5, 2) == (SPEC_ENCODER, SPEC_DECODER)
    assert tg.layer_order(11, 3, 5, 0) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    encoder, decoder = tg.layer_order(6, 0, 5, 1)  # the whole stack twice
    assert encoder + decoder == list(range(6)) * 2 and len(encoder) == 6


def test_looped_model_runs_the_spec_order_in_eval_and_after_the_switch():
    model = spec_model()
    idx = tokens_with_bos()
    assert record_block_order(model, lambda: model.logits(idx)) == SPEC_ENCODER + SPEC_DECODER
    model.train()
    model.looping = False
    assert record_block_order(model, lambda: model(idx, idx)) == list(range(11))
    model.looping = True
    assert record_block_order(model, lambda: model(idx, idx)) == SPEC_ENCODER + SPEC_DECODER


def test_looped_forward_equals_a_handwritten_one():
    model = spec_model()
    idx = tokens_with_bos()
    rows = [4, 3, 2, 1, 0, 5, 6, 7]  # gate row of each encoder output (position in SPEC_ENCODER)
    with torch.no_grad():
        x0 = x = tg.rms_norm(model.tok_emb(idx))
        skips = []
        for i in SPEC_ENCODER:
            x = model.blocks[i](x, x0)
            skips.append(x)
        for j, i in enumerate(SPEC_DECODER):
            if j < 8:  # decoder position j reads encoder position 7 − j
                row = rows[7 - j]
                x = torch.lerp(model.skip_weights[row] * skips[7 - j], x, torch.sigmoid(model.skip_gates[row]))
            x = model.blocks[i](x, x0)
        logits = tg.rms_norm(x) @ model.tok_emb.weight.T
        expected = 30 * torch.tanh(logits / 30)
        assert torch.allclose(model.logits(idx), expected, atol=1e-6, rtol=0)


def test_skip_gates_join_the_same_layers_in_both_layouts():
    model = spec_model()
    assert model.skip_gates.shape == (8, 32) and model.blocks[3].norm_scale == 0.5  # physical index, every pass

    def joined(layout):  # gate row → (encoder block, decoder block) it joins
        encoder, decoder = layout
        return {model.skip_rows[e]: (encoder[e], decoder[len(encoder) - 1 - e]) for e in range(len(encoder))}

    plain, looped = joined(model.plain_layout), joined(model.looped_layout)
    assert plain == {r: (4 - r, 5 + r) for r in range(5)}
    assert all(looped[r] == plain[r] for r in range(5))
    assert sorted(looped) == list(range(8))


@pytest.mark.parametrize("bad", [dict(loop_end=11), dict(loop_start=4, loop_end=3), dict(num_loops=-1)])
def test_bad_loops_are_refused(bad):
    with pytest.raises(SystemExit, match="NUM_LOOPS"):
        tg.GPT(tiny_hparams(**{"num_layers": 11, "num_loops": 2, **bad}))


# ---------------------------------------------------------------------------------------------------- two lanes

def test_two_lane_block_follows_its_definition():
    """Attention reads mix(lane 0, x0), the MLP lane 1; lane_i ← r_i·lane_i + p_i,attn·attn_out + p_i,mlp·mlp_out."""
    torch.manual_seed(0)
    block = tg.Block(tiny_hparams(parallel_residual_start=0, parallel_residual_lanes=2), 2)
    assert torch.equal(block.lane_residual, torch.full((2,), 1.1)) and torch.equal(block.lane_post, torch.ones(2, 2))
    perturb(block)
    a, m, x0 = torch.randn(2, 7, 64), torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    r, p = block.lane_residual, block.lane_post
    with torch.no_grad():
        for lane0, lane1, given in ((a, m, (a, m)), (a, a, a)):  # a single stream: the first layer splits it
            attn_out = block.attn_scale * block.attn(tg.rms_norm(block.resid_mix[0] * lane0 + block.resid_mix[1] * x0)
                                                     / math.sqrt(3))
            mlp_out = block.mlp_scale * block.mlp(tg.rms_norm(lane1) / math.sqrt(3))
            out0, out1 = block(given, x0)
            assert torch.allclose(out0, r[0] * lane0 + p[0, 0] * attn_out + p[0, 1] * mlp_out, atol=1e-5)
            assert torch.allclose(out1, r[1] * lane1 + p[1, 0] * attn_out + p[1, 1] * mlp_out, atol=1e-5)


def test_two_lane_model_equals_a_handwritten_one():
    model = make_model(parallel_residual_start=3, parallel_residual_lanes=2)
    perturb(model)
    idx = tokens_with_bos()
    b = model.blocks

    def join(x, skip, row):
        g = torch.sigmoid(model.skip_gates[row])
        return g * x + (1 - g) * model.skip_weights[row] * skip

    with torch.no_grad():
        x0 = tg.rms_norm(model.tok_emb(idx))
        s0 = b[0](x0, x0)
        s1 = b[1](s0, x0)
        x = b[2](join(s1, s1, 0), x0)
        lanes = (join(x, s0, 1), join(x, s0, 1))  # the skip reaches both lanes
        for i in (3, 4):
            lanes = b[i](lanes, x0)
        logits = tg.rms_norm((lanes[0] + lanes[1]) / 2) @ model.tok_emb.weight.T  # the output: the lanes' mean
        assert torch.allclose(model.logits(idx), 30 * torch.tanh(logits / 30), atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", [dict(parallel_residual_start=1),  # layer 1 is in the encoder half
                                       dict(num_layers=11, num_loops=2, parallel_residual_start=5)])  # 5 loops back
def test_two_lanes_must_run_last_in_the_decoder(overrides):
    with pytest.raises(SystemExit, match="PARALLEL_RESIDUAL_LANES=2"):
        tg.GPT(tiny_hparams(parallel_residual_lanes=2, **overrides))
    tg.GPT(tiny_hparams(num_layers=11, num_loops=2, parallel_residual_start=8, parallel_residual_lanes=2))  # the spec


def test_lane_lambdas_go_to_adam_and_stay_float16():
    model = make_model(**ALL_ON)
    matrices, _, scalars = tg.split_parameters(model)
    assert len(matrices) == 5 * 6
    names = {id(p): n for n, p in model.named_parameters()}
    lanes = {f"blocks.{i}.{n}" for i in (3, 4) for n in ("lane_residual", "lane_post")}
    assert lanes <= {names[id(p)] for p in scalars}
    quantized = tg.quantize_state_dict(model.state_dict(), tiny_hparams(float_max_numel=1000))
    restored = tg.dequantize_state_dict(tg.deserialize_quantized(tg.serialize_quantized(quantized)))
    assert all(quantized[n]["kind"] == "float16" for n in lanes)
    assert torch.equal(restored["blocks.4.lane_post"], model.blocks[4].lane_post)
    assert torch.allclose(restored["blocks.4.lane_residual"], model.blocks[4].lane_residual, atol=1e-3)


# ---------------------------------------------------------------------------------------------------- documents

SEGMENT_CASES = {  # rows of tokens (0 = any non-BOS token), BOS cuts allowed inside rows
    "no BOS": ([[0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], 2),
    "BOS at 0 and inside": ([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0]], 2),
    "consecutive BOS": ([[1, 1, 1, 0, 0], [0, 0, 1, 1, 0]], 6),
    "exactly full": ([[1, 0, 1, 0, 0], [1, 1, 0, 0, 0]], 2),
    "overflow": ([[1, 0, 1, 0, 1], [0, 1, 1, 0, 0]], 2),
    "overflow, no cut allowed": ([[0, 0, 0, 1, 0], [1, 0, 0, 0, 0]], 0),
}


@pytest.mark.parametrize("case", sorted(SEGMENT_CASES))
def test_document_segments_against_brute_force(case):
    rows, max_cuts = SEGMENT_CASES[case]
    idx = torch.tensor(rows) + 2 * (torch.tensor(rows) == 0)  # non-BOS tokens become id 2
    flat = idx.reshape(-1).tolist()
    cuts = [p for p in range(len(flat)) if p % 5 and flat[p] == tg.BOS_ID]  # BOS inside a row
    cu, overflow_start = tg.document_segments(tg.document_starts(idx), max_cuts)
    assert cu.dtype == torch.int32 and cu.shape == (2 + max_cuts + 1,)
    kept = sorted([0, 5] + cuts[:max_cuts])  # every row start, then as many BOS as allowed
    assert cu.tolist() == kept + [len(flat)] * (len(cu) - len(kept))
    assert int(overflow_start) == (cuts[max_cuts] if len(cuts) > max_cuts else len(flat))
    assert case.startswith("overflow") == (len(cuts) > max_cuts)
    assert max(b - a for a, b in zip(cu.tolist(), cu.tolist()[1:])) <= 5  # no segment spans two rows


def test_document_mask_against_brute_force():
    idx = tokens_with_bos()
    mask = tg.document_mask(tg.document_starts(idx))
    assert mask.shape == (2, 1, 24, 24)
    for b in range(2):
        doc = {t: d for d, (s, e) in enumerate(documents_of(idx[b])) for t in range(s, e)}
        expected = torch.tensor([[s <= t and doc[s] == doc[t] for s in range(24)] for t in range(24)])
        assert torch.equal(mask[b, 0], expected)


@pytest.mark.parametrize("path", ["mask", "packed"])
def test_bounded_attention_equals_attention_on_each_document(path, request):
    if path == "packed":
        request.getfixturevalue("packed_path")
    idx = tokens_with_bos()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 24, heads, 16, generator=g) for heads in (8, 2, 2))
    starts = tg.document_starts(idx)
    docs = tg.document_mask(starts) if path == "mask" else tg.document_segments(starts, 4)
    out = tg.causal_attention(q, k, v, docs)
    for b in range(2):
        for s, e in documents_of(idx[b]):
            alone = tg.causal_attention(q[b:b + 1, s:e], k[b:b + 1, s:e], v[b:b + 1, s:e])
            assert torch.allclose(out[b, s:e], alone[0], atol=1e-6)


def isolated_model(**overrides) -> tg.GPT:
    model = make_model(**{**ALL_ON, **overrides})
    perturb(model, scale=0.2)
    return model


def assert_later_documents_unchanged(model: tg.GPT, idx: torch.Tensor, change_bos: bool = True) -> None:
    """Changing any token of a row's document N (its BOS included, unless not change_bos) changes no logit, nor the
    training loss, of the row's documents N+1 and later, their BOS included, nor anything of the other rows; it
    does change the document's own later logits."""
    changed_somewhere = False
    with torch.no_grad():
        before = model.eval().logits(idx)
        for b in range(idx.size(0)):
            docs = documents_of(idx[b])
            for n, (s, e) in enumerate(docs[:-1]):
                later = docs[n + 1][0]
                targets = torch.full_like(idx, tg.CE_IGNORE_INDEX)
                targets[b, later:] = idx[b, later:]  # the training loss of the later documents alone
                loss_before = model.train()(idx, targets)
                for t in range(s, e) if change_bos else range(s + int(idx[b, s] == tg.BOS_ID), e):
                    changed = idx.clone()
                    changed[b, t] = 2 + (int(idx[b, t]) + 5) % 90  # never BOS: no document starts or ends here
                    after = model.eval().logits(changed)
                    assert torch.equal(before[b, later:], after[b, later:]), (b, n, t)
                    assert torch.equal(before[1 - b], after[1 - b])  # nor anything of the other row
                    assert torch.equal(loss_before, model.train()(changed, targets)), (b, n, t)
                    changed_somewhere |= t + 1 < e and (before[b, t + 1:e] - after[b, t + 1:e]).abs().max() > 1e-4
    assert changed_somewhere


def three_cut_tokens() -> torch.Tensor:
    idx = tokens_with_bos()
    idx[0, 10] = tg.BOS_ID  # a one-token document: BOS right after BOS (BOS inside rows at 9, 10 and 14)
    return idx


def test_no_output_depends_on_an_earlier_document():
    assert_later_documents_unchanged(isolated_model(), three_cut_tokens())


@pytest.mark.parametrize("segment_tokens", [1, 17])  # BOS cuts allowed: 48 (ample), then 2: row 1's is left out
def test_no_output_depends_on_an_earlier_document_on_the_packed_path(packed_path, segment_tokens):
    model = isolated_model(doc_segment_tokens=segment_tokens)
    # Past the capacity, which tokens fall back to attending to themselves depends on how many BOS come earlier in
    # the batch: turning a BOS into a word moves that point (the batch's structure, never a token's content).
    assert_later_documents_unchanged(model, three_cut_tokens(), change_bos=segment_tokens == 1)
    assert int(model.doc_overflows) == 0 if segment_tokens == 1 else int(model.doc_overflows) > 0


def test_only_the_training_loops_batches_take_the_coarser_varlen_capacity(packed_path, monkeypatch):
    monkeypatch.setattr(tg, "FINE_DOC_SEGMENT_TOKENS", 1)  # 48 cuts outside the training loop, 2 in it
    model = isolated_model(doc_segment_tokens=17)
    idx = three_cut_tokens()  # 3 BOS inside rows
    with torch.no_grad():
        model.eval().logits(idx)
        model.train().logits(idx)  # training mode alone (TTT's SGD steps) keeps the fine capacity
        assert int(model.doc_overflows) == 0
        model.set_training_batches(True)
        model.train().logits(idx)
        assert int(model.doc_overflows) == 1
        model.eval().logits(idx)  # evaluation inside the training loop (VAL_LOSS_EVERY)
        assert int(model.doc_overflows) == 1
        monkeypatch.setattr(tg, "FINE_DOC_SEGMENT_TOKENS", 24)  # coarser than DOC_SEGMENT_TOKENS: that one holds
        model.eval().logits(idx)
        assert int(model.doc_overflows) == 2


def test_the_warm_up_and_training_steps_are_the_training_loops_batches(monkeypatch):
    h = sample_hparams(**ALL_ON, compile_warmup_steps=1, quant_method="gptq", iterations=2, train_log_every=0)
    torch.manual_seed(0)
    model = tg.GPT(h)
    optimizers = tg.build_optimizers(model, h, tg.Runtime())
    seen, documents = [], tg.GPT.documents
    monkeypatch.setattr(tg.GPT, "documents", lambda m, idx: seen.append(m.training and m.training_batches)
                        or documents(m, idx))
    torch.enable_grad()(tg.warm_up_compile)(model, model, optimizers, h, 1, tg.Runtime(), lambda _: None)
    assert seen == [True, True, False, False] and not model.training_batches  # two layouts, then calibration's two
    seen.clear()
    torch.enable_grad()(tg.train)(model, model, optimizers, tg.EMA(model, h.ema_decay), h, 1, tg.Runtime(),
                                  lambda _: None, None)
    assert seen == [True, True] and not model.training_batches


def test_model_on_packed_documents_equals_the_model_on_each_document(packed_path):
    idx = tokens_with_bos()
    model = isolated_model(doc_segment_tokens=1)
    for looping in (False, True):
        model.train()
        model.looping = looping
        with torch.no_grad():
            packed = model.hidden(idx)
            for b in range(2):
                for s, e in documents_of(idx[b]):
                    assert torch.allclose(packed[b, s:e], model.hidden(idx[b:b + 1, s:e])[0], atol=1e-5)


def test_one_document_rows_skip_the_bounds_with_the_same_result():
    """hidden(one_document=True), as TTT calls it: on a row that is one document up to a position, the same hidden
    states there as with document bounds; and it does skip them (a row with a second document differs there)."""
    idx = tokens_with_bos()
    model = isolated_model().eval()
    with torch.no_grad():
        bounded, skipped = model.hidden(idx), model.hidden(idx, one_document=True)
        for b in range(idx.size(0)):
            first, end = documents_of(idx[b])[0]
            assert torch.allclose(bounded[b, :end], skipped[b, :end], atol=1e-6)  # one document up to end
            assert (bounded[b, end:] - skipped[b, end:]).abs().max() > 1e-4  # later documents see the earlier here


def test_packed_path_equals_the_mask_path(monkeypatch):
    idx = tokens_with_bos()
    model = isolated_model(doc_segment_tokens=1)
    with torch.no_grad():
        masked = model.logits(idx)
        monkeypatch.setattr(tg, "VARLEN_DEVICES", ("cpu",))
        monkeypatch.setattr(tg, "varlen_causal_attention", reference_varlen)
        packed = model.logits(idx)
    assert torch.allclose(masked, packed, atol=1e-5) and int(model.doc_overflows) == 0


@pytest.mark.skipif(not torch.cuda.is_available() or not tg.VARLEN_DEVICES, reason="needs a GPU and a varlen kernel")
def test_varlen_kernel_on_the_gpu_matches_the_mask_path_compiled(monkeypatch):
    torch.manual_seed(0)
    h = tiny_hparams(**{**ALL_ON, "vocab_size": 512, "num_layers": 11, "model_dim": 256, "loop_start": 3,
                        "loop_end": 5, "num_loops": 2, "parallel_residual_start": 8})
    model = tg.GPT(h)
    perturb(model)
    model.cuda()
    idx = torch.randint(2, 512, (4, 1024), device="cuda")
    idx[idx % 211 == 0] = tg.BOS_ID  # ≈ 0.4 % of tokens: some 16 documents, within the 32 cuts allowed
    step = torch.compile(model, fullgraph=True)
    grads = []
    for devices in (tg.VARLEN_DEVICES, ()):
        monkeypatch.setattr(tg, "VARLEN_DEVICES", devices)
        torch._dynamo.reset()
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(idx, idx)
        loss.backward()
        grads.append((loss.item(), [p.grad.float().clone() for p in model.parameters()]))
    (varlen_loss, varlen_grads), (mask_loss, mask_grads) = grads
    assert abs(varlen_loss - mask_loss) < 2e-2 * abs(mask_loss)
    for a, b in zip(varlen_grads, mask_grads):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6
    assert int(model.doc_overflows) == 0


# ---------------------------------------------------------------------------------------------------- training loop

@pytest.mark.parametrize("quant_method", ["gptq", "rtn"])
def test_warm_up_runs_both_layouts_and_restores_the_initial_state(quant_method):
    # one step asked for: both layouts still get one
    h = sample_hparams(**ALL_ON, compile_warmup_steps=1, quant_method=quant_method)
    torch.manual_seed(0)
    model = tg.GPT(h)
    optimizers = tg.build_optimizers(model, h, tg.Runtime())
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    initial_optimizers = [opt.state_dict() for opt in optimizers]
    lines = []
    calls = record_block_order(model, lambda: torch.enable_grad()(tg.warm_up_compile)(
        model, model, optimizers, h, 1, tg.Runtime(), lines.append))
    # the plain layout, then the looped one, then GPTQ's two calibration forwards in the final (looped) layout
    assert calls == [0, 1, 2, 3, 4] + [0, 1, 2, 1, 2, 3, 4] * (3 if quant_method == "gptq" else 1)
    assert lines[0].startswith("compile_warmup_steps:2 ")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, initial[name]), name
    assert [opt.state_dict() for opt in optimizers] == initial_optimizers


def test_training_switches_recurrence_on_at_the_fraction():
    h = sample_hparams(num_loops=1, loop_start=1, loop_end=2, iterations=10, train_log_every=0)
    torch.manual_seed(0)
    model = tg.GPT(h)
    optimizers = tg.build_optimizers(model, h, tg.Runtime())
    lines = []
    calls = record_block_order(model, lambda: torch.enable_grad()(tg.train)(
        model, model, optimizers, tg.EMA(model, h.ema_decay), h, 1, tg.Runtime(), lines.append, None))
    assert "recurrence:on step:4" in lines  # progress 4/10 is the first ≥ 0.35
    assert calls == [0, 1, 2, 3, 4] * 4 + [0, 1, 2, 1, 2, 3, 4] * 6
    assert model.looping


def test_smoke_run_with_recurrence_documents_and_two_lanes(tmp_path):
    """The published configuration at smoke size: the default features, with recurrence and document attention
    (which PRESET=smoke leaves off), loops and lanes placed to fit 4 layers."""
    env = {"RUN_ID": "loops", "ITERATIONS": "2", "VAL_TOKENS_LIMIT": "2048", "BROTLI_QUALITY": "5", "NUM_LOOPS": "1",
           "LOOP_START": "1", "LOOP_END": "2", "LOOP_ENABLE_FRAC": "0.5", "DOC_ATTENTION": "1",
           "PARALLEL_RESIDUAL_START": "3", "PARALLEL_RESIDUAL_LANES": "2", "XSA_ENABLED": "1", "SMEAR_GATE_ENABLED": "1",
           "ATTN_GATE_ENABLED": "1"}
    out = run_script([sys.executable, f"{REPO}/train_gpt.py"], env, str(tmp_path))
    assert "num_loops=1 loop_start=1 loop_end=2 loop_enable_frac=0.5 doc_attention=True" in out
    assert re.search(r"^recurrence:on step:1$", out, re.M)
    pre_quant = float(re.search(r"pre_quant_ema step:2 val_loss:[\d.]+ val_bpb:([\d.]+)", out).group(1))
    last = out.strip().splitlines()[-1]
    match = re.match(r"final_int6_rans_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)$", last)
    assert match, last
    assert math.isfinite(float(match.group(2))) and abs(float(match.group(2)) - pre_quant) < 0.1
    state = torch.load(tmp_path / "final_model.pt")
    assert state["skip_gates"].shape == state["skip_weights"].shape == (3, 128)
    assert F.mse_loss(state["blocks.3.lane_post"], torch.ones(2, 2)) > 0  # the lane lambdas did train


def test_the_attention_bench_lays_out_training_segments_at_each_capacity():
    """attention_bench.py times training's segments at several DOC_SEGMENT_TOKENS: each layout holds every
    document's segments (the batch has room for them at every size here), and a larger size fewer empty ones."""
    import attention_bench
    starts = torch.zeros(4, 2048, dtype=torch.bool)
    starts[:, 0] = True
    starts[0, [300, 900]] = starts[2, 1500] = True  # 7 segments: 4 row starts and 3 BOS
    layouts = attention_bench.train_segment_layouts(tg, starts, [128, 512])
    assert list(layouts) == ["train_segments128", "train_segments"]  # 512 is the model's default
    for tokens, cu in zip((128, 512), layouts.values()):
        assert cu.numel() == 4 + 4 * (2048 // tokens) + 1  # row starts, the capacity's cuts, the end
        assert cu.unique().tolist() == [0, 300, 900, 2048, 4096, 4096 + 1500, 6144, 8192]
