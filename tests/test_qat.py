"""QAT (QAT_START_FRAC): the fake-quantized weight is the exporter's round trip to the bit, on the same grid per
matrix; gradients pass straight through to the latent weight; the switch comes at its fraction of training, is
guarded on by the compiled graph, is built by the compile warm-up and is off again for evaluation and export;
off (the default), training is nn.Linear's to the bit."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_gpt as tg
from conftest import make_model, perturb, sample_hparams, tiny_hparams

# every block matrix of the tiny model stored as integers, each role on its own clip, so a wrong grid shows
INT_MATRICES = dict(float_max_numel=1000, matrix_bits=5, clip_sigmas_mlp=3.0, clip_sigmas_attn=5.0)


def spread_rows(rows: int = 12, cols: int = 40, seed: int = 0) -> torch.Tensor:
    """Rows of very different scales, outliers that the clip cuts, and a constant row (a zero step)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows)[:, None]
    w[0, :3] = 40.0
    w[1] = 0.25
    return w


@pytest.mark.parametrize("bits,clip_sigmas,grid", [(6, 11.5, "sdclip"), (5, 3.0, "sdclip"), (8, 0.0, "absmax"),
                                                   (3, 2.0, "sdclip")])
def test_the_fake_quantized_weight_is_the_exporters_round_trip_to_the_bit(bits, clip_sigmas, grid):
    w = spread_rows()
    fake = tg.fake_quantize(w, bits, clip_sigmas, grid)
    assert torch.equal(fake, tg.dequantize_per_row(*tg.quantize_per_row(w, bits, clip_sigmas, grid)))
    assert not torch.equal(fake, w)


def test_every_block_matrix_trains_on_the_grid_its_artifact_entry_uses():
    """With QAT on, each Linear computes with exactly what quantize_state_dict stores for it by round to nearest
    (its role's clip sigmas, MATRIX_BITS); a matrix the artifact keeps as float16 is left alone."""
    h = tiny_hparams(**INT_MATRICES, quant_method="rtn", lqer_enabled=False)
    model = make_model(**INT_MATRICES)
    perturb(model)
    stored = tg.quantize_state_dict(model.state_dict(), h)
    linears = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, tg.QuantAwareLinear)}
    assert model.set_qat(True) == len(linears) == 30 and model.qat
    for name, module in linears.items():
        assert stored[name]["kind"] == "int" and stored[name]["bits"] == 5
        assert torch.equal(module.effective_weight(), tg.dequantize_entry(stored[name])), name
    # the default size limit keeps the tiny model's matrices float16: QAT then has nothing to round
    plain = make_model()
    assert plain.set_qat(True) == 0
    linears = [m for m in plain.modules() if isinstance(m, tg.QuantAwareLinear)]
    assert linears and all(torch.equal(m.effective_weight(), m.weight) for m in linears)


def test_gradients_pass_straight_through():
    w = spread_rows().requires_grad_()
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    (tg.fake_quantize(w, 6, 11.5, "sdclip") * g).sum().backward()
    assert torch.equal(w.grad, g)

    linear = tg.QuantAwareLinear(40, 12)
    with torch.no_grad():
        linear.weight.copy_(spread_rows())
    linear.grid, linear.fake_quant = (6, 4.0, "sdclip"), True
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))
    grad_out = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    linear(x).backward(grad_out)
    on_grid = tg.dequantize_per_row(*tg.quantize_per_row(linear.weight, 6, 4.0)).requires_grad_()
    F.linear(x, on_grid).backward(grad_out)  # the gradient at the rounded weight, handed to the latent one
    assert torch.equal(linear.weight.grad, on_grid.grad)


def test_off_is_nn_linear_to_the_bit():
    linear, plain = tg.QuantAwareLinear(40, 12), nn.Linear(40, 12, bias=False)
    with torch.no_grad():
        plain.weight.copy_(linear.weight)
    linear.grid = (6, 11.5, "sdclip")  # a grid, but the switch off
    x = torch.randn(5, 40, requires_grad=True)
    a, b = linear(x), plain(x)
    assert torch.equal(a, b)
    g = torch.randn_like(a)
    assert torch.equal(torch.autograd.grad(a, linear.weight, g)[0], torch.autograd.grad(b, plain.weight, g)[0])


def run_training(h, as_plain_linears: bool = False):
    """train() on the bundled sample from a fixed initialisation; (model, EMA, log lines, QAT flag at every
    forward of the first MLP's up-projection)."""
    torch.manual_seed(0)
    model = tg.GPT(h)
    if as_plain_linears:
        for m in model.modules():
            if isinstance(m, tg.QuantAwareLinear):
                m.__class__ = nn.Linear
    optimizers = tg.build_optimizers(model, h, tg.Runtime())
    ema, lines, flags = tg.EMA(model, h.ema_decay), [], []
    model.blocks[0].mlp.up.register_forward_pre_hook(lambda m, _x: flags.append(getattr(m, "fake_quant", None)))
    torch.enable_grad()(tg.train)(model, model, optimizers, ema, h, 1, tg.Runtime(), lines.append, None)
    return model, ema, lines, flags


def test_training_with_qat_off_is_training_with_plain_linears_to_the_bit():
    h = sample_hparams(**INT_MATRICES, iterations=4, train_log_every=0)
    assert h.qat_start_frac == 1.0  # the default: off
    model, ema, lines, flags = run_training(h)
    plain, plain_ema, _, _ = run_training(h, as_plain_linears=True)
    assert not any(line.startswith("qat:") for line in lines) and flags == [False] * 4
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(ema.params, plain_ema.params))


def test_training_turns_qat_on_at_its_fraction_and_off_at_the_end():
    h = sample_hparams(**INT_MATRICES, iterations=10, train_log_every=0, qat_start_frac=0.5)
    model, ema, lines, flags = run_training(h)
    assert "qat:on step:5 matrices:30" in lines
    assert flags == [False] * 5 + [True] * 5
    assert not model.qat and not any(getattr(m, "fake_quant", False) for m in model.modules())
    off, _, _, _ = run_training(sample_hparams(**INT_MATRICES, iterations=10, train_log_every=0))
    assert not torch.equal(model.blocks[0].mlp.up.weight, off.blocks[0].mlp.up.weight)
    # the EMA averages the latent weights, which are not on the grid; the exporter rounds that average
    ema.copy_to(model)
    w = model.blocks[0].mlp.up.weight.detach()
    assert not torch.equal(w, tg.fake_quantize(w, *model.blocks[0].mlp.up.grid))


def test_the_compiled_graph_follows_the_switch():
    model = make_model(**INT_MATRICES)
    perturb(model)
    idx = torch.randint(2, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    step = torch.compile(model, backend="eager", fullgraph=True)
    losses = {}
    for on in (False, True, False):
        model.set_qat(on)
        with torch.no_grad():
            compiled, eager = step(idx, idx), model(idx, idx)
        assert torch.equal(compiled, eager), on
        losses.setdefault(on, compiled)
    assert not torch.equal(losses[False], losses[True])


@pytest.mark.parametrize("loops,qat,graphs", [(0, 1.0, [(False, False)]), (1, 1.0, [(False, False), (True, False)]),
                                              (0, 0.8, [(False, False), (False, True)]),
                                              (1, 0.8, [(False, False), (False, True), (True, False), (True, True)])])
def test_the_compile_warm_up_builds_every_training_graph_and_restores_the_state(loops, qat, graphs):
    h = sample_hparams(**INT_MATRICES, num_loops=loops, loop_start=1, loop_end=2, qat_start_frac=qat,
                       compile_warmup_steps=1)
    assert tg.training_graphs(h) == graphs
    torch.manual_seed(0)
    model = tg.GPT(h)
    optimizers = tg.build_optimizers(model, h, tg.Runtime())
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    seen, lines = [], []
    model.register_forward_pre_hook(lambda m, _x: seen.append((m.looping, m.qat)))
    torch.enable_grad()(tg.warm_up_compile)(model, model, optimizers, h, 1, tg.Runtime(), lines.append)
    assert seen == graphs and lines[0].startswith(f"compile_warmup_steps:{len(graphs)} ")
    assert not model.qat and all(torch.equal(t, initial[k]) for k, t in model.state_dict().items())


def test_qat_settings_are_read_and_range_checked():
    assert tg.Hyperparameters.from_env({"QAT_START_FRAC": "0.85"}).qat_start_frac == 0.85
    with pytest.raises(SystemExit, match="QAT_START_FRAC=1.5 is out of range: it must be between 0 and 1"):
        tg.Hyperparameters(qat_start_frac=1.5).validate(world_size=8)
    assert not tg.qat_due(tg.Hyperparameters(), 1.0)  # 1 is off, even at the end of training
    assert tg.qat_due(tg.Hyperparameters(qat_start_frac=0.0), 0.0)
