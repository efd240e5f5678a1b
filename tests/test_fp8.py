"""FP8 matmuls (FP8_MATMULS): the forward and both gradients are exact arithmetic on the FP8 values (e4m3 operands,
an e5m2 gradient, per-tensor scales; with FP8_SCALING=row, e4m3 with a scale per row and the weight's gradient
unscaled), within FP8's rounding of the bfloat16 result; an all-zero tensor casts cleanly; the path is taken in
training only, by every block matrix, under torch.compile and with QAT; off (the default), the model is what it
was without it. torch._scaled_mm runs on the CPU, so all of it runs here."""
import copy
import math
import os
import re
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_gpt as tg
from conftest import make_model, perturb, run_script, sample_hparams, tiny_hparams

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# Unit roundoff of each format's normal numbers (3 and 2 mantissa bits), and half the spacing of its subnormals, in
# the scaled units the cast sees
E4M3_UNIT, E4M3_SUBNORMAL_HALF_STEP = 2.0 ** -4, 2.0 ** -10
BF16_UNIT = 2.0 ** -8
FLOAT32_SUMS = 1e-5  # float32 accumulation over 64 products, relative to the sum of their magnitudes


def spread(rows: int, cols: int, seed: int, low: float = -4.0, high: float = 1.0) -> torch.Tensor:
    """Gaussian values whose columns span several decades: the smallest land among the format's subnormals."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.logspace(low, high, cols)[torch.randperm(cols, generator=g)]


def dequantized(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values the FP8 matmul multiplies: t's cast times the inverse of its scale, in float64."""
    t8, inverse = tg.to_fp8(t, dtype)
    return t8.double() * inverse.double()


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> None:
    excess = (got.double() - want).abs() - bound
    assert excess.max() <= 0, f"exceeds the bound by {excess.max().item():.3g}"


def test_the_forward_is_exact_arithmetic_on_the_e4m3_values():
    x, w = spread(64, 64, 0).view(2, 32, 64), spread(48, 64, 1)
    xd, wd = dequantized(x.reshape(-1, 64), E4M3), dequantized(w, E4M3)
    reference, magnitude = xd @ wd.T, xd.abs() @ wd.abs().T
    y = tg.fp8_linear(x, w)
    assert y.dtype == torch.float32 and y.shape == (2, 32, 48)
    assert_within(y.reshape(-1, 48), reference, FLOAT32_SUMS * magnitude)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in training on CUDA: the output in autocast's dtype
        y = tg.fp8_linear(x, w)
    assert y.dtype == torch.bfloat16
    assert_within(y.reshape(-1, 48), reference, BF16_UNIT * reference.abs() + FLOAT32_SUMS * magnitude)


def test_the_forward_is_within_fp8_rounding_of_the_bf16_matmul():
    x, w = spread(64, 64, 2), spread(48, 64, 3)
    exact = x.double() @ w.double().T
    y8, y16 = tg.fp8_linear(x, w), F.linear(x.bfloat16(), w.bfloat16())  # y16: the matmul of training today

    def rounding(t: torch.Tensor) -> torch.Tensor:  # the most an e4m3 cast with t's scale moves each value
        return torch.maximum(E4M3_UNIT * t.abs(), E4M3_SUBNORMAL_HALF_STEP * tg.to_fp8(t, E4M3)[1]).double()

    ex, ew, ax, aw = rounding(x), rounding(w), x.abs().double(), w.abs().double()
    fp8_bound = ex @ aw.T + ax @ ew.T + ex @ ew.T + FLOAT32_SUMS * (ax + ex) @ (aw + ew).T
    bf16_bound = (2 * BF16_UNIT + BF16_UNIT ** 2 + FLOAT32_SUMS) * (ax @ aw.T) + BF16_UNIT * exact.abs()
    assert_within(y8, exact, fp8_bound)
    assert_within(y16, exact, bf16_bound)
    assert_within(y8, y16.double(), fp8_bound + bf16_bound)
    # and it really ran in FP8: its error is an order of magnitude above bfloat16's
    assert (y8 - exact).abs().max() > 8 * (y16 - exact).abs().max()


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_the_gradients_are_exact_arithmetic_on_the_e5m2_gradient_and_the_e4m3_operands(x_dtype):
    x = spread(64, 64, 4).to(x_dtype).view(2, 32, 64).requires_grad_()
    w = spread(48, 64, 5).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=x_dtype == torch.bfloat16):
        y = tg.fp8_linear(x, w)
    grad_out = spread(64, 48, 6, low=-6.0, high=0.0).to(y.dtype)  # gradients span more decades than activations
    y.backward(grad_out.view_as(y))
    gd = dequantized(grad_out, E5M2)
    xd, wd = dequantized(x.detach().reshape(-1, 64), E4M3), dequantized(w.detach(), E4M3)
    assert x.grad.dtype == x_dtype and w.grad.dtype == torch.float32
    out_rounding = BF16_UNIT if x_dtype == torch.bfloat16 else 0.0
    want_x = gd @ wd
    assert_within(x.grad.reshape(-1, 64), want_x, out_rounding * want_x.abs() + FLOAT32_SUMS * (gd.abs() @ wd.abs()))
    assert_within(w.grad, gd.T @ xd, FLOAT32_SUMS * (gd.abs().T @ xd.abs()))


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_the_largest_magnitude_lands_on_the_formats_largest_value(dtype):
    for seed in range(20):
        t = spread(16, 64, seed) * 10.0 ** (seed - 10)
        t8 = tg.to_fp8(t, dtype)[0].float()
        assert t8.abs().max() == torch.finfo(dtype).max and torch.isfinite(t8).all()


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_a_bfloat16_tensor_is_rounded_to_fp8_once(dtype):
    t = spread(64, 64, 12).bfloat16()
    scale = torch.finfo(dtype).max / t.abs().max().float()
    assert torch.equal(tg.to_fp8(t, dtype)[0].float(), (t.double() * scale.double()).to(dtype).float())


def test_an_all_zero_tensor_casts_to_zeros_with_a_finite_scale():
    for dtype in (E4M3, E5M2):
        t8, inverse = tg.to_fp8(torch.zeros(32, 16), dtype)
        assert torch.isfinite(inverse) and inverse > 0 and not t8.float().any()
    # the output projections start at zero: their first steps multiply an all-zero weight, and get zero gradients
    # from the layers above them (as does everything under a zero projection)
    linear = tg.QuantAwareLinear(64, 48)
    nn.init.zeros_(linear.weight)
    linear.fp8 = True
    x = spread(32, 64, 7).requires_grad_()
    y = linear(x)
    assert torch.equal(y, torch.zeros_like(y))
    grad_out = spread(32, 48, 8)
    y.backward(grad_out)
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.isfinite(linear.weight.grad).all() and linear.weight.grad.abs().max() > 0
    linear.weight.grad = x.grad = None
    linear(x).backward(torch.zeros(32, 48))
    assert torch.equal(linear.weight.grad, torch.zeros_like(linear.weight)) and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("tokens,features_in,features_out", [(5, 64, 48), (32, 40, 48), (32, 64, 12)])
def test_shapes_off_multiples_of_16_take_the_plain_matmul(monkeypatch, tokens, features_in, features_out):
    monkeypatch.setattr(tg.FP8Linear, "apply", lambda *a: pytest.fail("FP8Linear took a shape _scaled_mm refuses"))
    linear = tg.QuantAwareLinear(features_in, features_out)
    linear.fp8 = True
    x = torch.randn(tokens, features_in)
    assert torch.equal(linear(x), F.linear(x, linear.weight))


def row_dequantized(t: torch.Tensor) -> torch.Tensor:
    """What FP8_SCALING=row multiplies: t's e4m3 cast with a scale per row, times the inverses, in float64."""
    t8, inverse = tg.to_fp8(t, E4M3, rows=True)
    assert inverse.shape == (t.size(0), 1)
    return t8.double() * inverse.double()


def test_row_scales_put_each_rows_largest_magnitude_on_the_formats_largest_value():
    t = spread(16, 64, 13) * torch.logspace(-6, 6, 16)[:, None]  # rows twelve decades apart
    t[3] = 0.0
    t8, inverse = tg.to_fp8(t, E4M3, rows=True)
    peaks = t8.float().abs().amax(dim=1)
    assert torch.isfinite(inverse).all() and (inverse > 0).all()
    assert not t8[3].float().any() and (peaks[torch.arange(16) != 3] == torch.finfo(E4M3).max).all()
    # one scale for the whole tensor would have flushed the smallest rows to zero
    assert not tg.to_fp8(t, E4M3)[0][0].float().any() and t8[0].float().abs().min() > 0


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_row_scaling_is_exact_arithmetic_on_the_rows_casts_and_keeps_the_weight_gradient_unscaled(x_dtype):
    x = spread(64, 64, 14).to(x_dtype).view(2, 32, 64).requires_grad_()
    w = spread(48, 64, 15).requires_grad_()
    y = tg.fp8_linear(x, w, rows=True)  # bfloat16 out for a bfloat16 x (under CPU autocast _scaled_mm rounds otherwise)
    assert y.dtype == x_dtype and y.shape == (2, 32, 48)
    grad_out = spread(64, 48, 16, low=-6.0, high=0.0).to(y.dtype)
    y.backward(grad_out.view_as(y))
    out_rounding = BF16_UNIT if x_dtype == torch.bfloat16 else 0.0
    xd, wd = row_dequantized(x.detach().reshape(-1, 64)), row_dequantized(w.detach())
    want_y = xd @ wd.T
    assert_within(y.reshape(-1, 48), want_y, out_rounding * want_y.abs() + FLOAT32_SUMS * (xd.abs() @ wd.abs().T))
    gd, wtd = row_dequantized(grad_out), row_dequantized(w.detach().T)  # W per input column: rows of Wᵀ
    want_x = gd @ wtd.T
    assert x.grad.dtype == x_dtype and w.grad.dtype == torch.float32
    assert_within(x.grad.reshape(-1, 64), want_x, out_rounding * want_x.abs() + FLOAT32_SUMS * (gd.abs() @ wtd.abs().T))
    g, xs = grad_out.double(), x.detach().reshape(-1, 64).double()  # dL/dW from the tensors themselves
    want_w = g.T @ xs
    assert_within(w.grad, want_w, out_rounding * want_w.abs() + FLOAT32_SUMS * (g.abs().T @ xs.abs()))


def test_fp8_scaling_row_sends_every_block_matrix_through_the_row_kernel(monkeypatch):
    rows = []
    apply = tg.FP8RowLinear.apply
    monkeypatch.setattr(tg.FP8RowLinear, "apply", lambda *a: rows.append(a[1].shape) or apply(*a))
    calls = counting_fp8(monkeypatch)
    model = make_model().train()
    perturb(model)
    idx = torch.randint(2, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    model.set_fp8(True)
    model(idx, idx).backward()
    assert len(calls) == 30 and rows == []
    assert model.set_fp8(True, "row") == 30
    model(idx, idx).backward()
    assert len(rows) == 30 and len(calls) == 30


def counting_fp8(monkeypatch) -> list:
    calls, apply = [], tg.FP8Linear.apply
    monkeypatch.setattr(tg.FP8Linear, "apply", lambda *a: calls.append(a[1].shape) or apply(*a))
    return calls


def test_on_every_block_matrix_runs_in_fp8_in_training_and_none_in_evaluation(monkeypatch):
    calls = counting_fp8(monkeypatch)
    model = make_model()
    perturb(model)
    idx = torch.randint(2, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    assert model.set_fp8(True) == 30  # 5 layers × (q, k, v, proj, up, down)
    model.train()
    model(idx, idx).backward()
    assert len(calls) == 30 and all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        model.token_losses(idx, idx)
    assert len(calls) == 30
    assert model.set_fp8(False) == 0 and not any(getattr(m, "fp8", False) for m in model.modules())
    # where _scaled_mm does not run (an older build, a GPU without FP8 tensor cores), nothing is switched on
    monkeypatch.setattr(tg, "scaled_mm_runs", lambda device: False)
    assert model.set_fp8(True) == 0 and not any(getattr(m, "fp8", False) for m in model.modules())


def test_off_the_model_computes_as_it_did_without_fp8_to_the_bit(monkeypatch):
    assert tg.Hyperparameters().fp8_matmuls is False
    monkeypatch.setattr(tg.FP8Linear, "apply", lambda *a: pytest.fail("FP8Linear ran with FP8_MATMULS off"))
    model = make_model().train()
    perturb(model)
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, tg.QuantAwareLinear):
            m.__class__ = nn.Linear  # what the block matrices were before QAT and FP8
    idx = torch.randint(2, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    assert not any(getattr(m, "fp8", False) for m in model.modules())  # as built: off until training sets it
    loss, plain_loss = model(idx, idx), plain(idx, idx)
    loss.backward()
    plain_loss.backward()
    assert torch.equal(loss, plain_loss)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_the_fused_triton_mlp_gives_way_to_two_fp8_linears(monkeypatch):
    fused = []

    def fake_fused(x, w_up, w_down):
        fused.append(1)
        return F.linear(F.leaky_relu(F.linear(x, w_up), 0.5).square(), w_down)

    monkeypatch.setattr(tg, "fused_leaky_relu_square_mlp", fake_fused)
    calls = counting_fp8(monkeypatch)
    mlp = tg.MLP(tiny_hparams())
    mlp.fused = True
    x = torch.randn(32, 64)
    mlp(x)
    assert fused == [1] and calls == []
    mlp.up.fp8 = mlp.down.fp8 = True
    y = mlp(x)
    assert fused == [1] and calls == [mlp.up.weight.shape, mlp.down.weight.shape]
    assert torch.equal(y, tg.fp8_linear(F.leaky_relu(tg.fp8_linear(x, mlp.up.weight), 0.5).square(), mlp.down.weight))


def test_qat_hands_fp8_its_fake_quantized_weight():
    linear = tg.QuantAwareLinear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(spread(48, 64, 9))
    linear.grid, linear.fake_quant, linear.fp8 = (6, 4.0, "sdclip"), True, True
    x, grad_out = spread(32, 64, 10), spread(32, 48, 11)
    y = linear(x)
    y.backward(grad_out)
    on_grid = tg.fake_quantize(linear.weight, *linear.grid).detach().requires_grad_()
    want = tg.fp8_linear(x, on_grid)
    want.backward(grad_out)
    assert torch.equal(y, want) and torch.equal(linear.weight.grad, on_grid.grad)  # straight through
    assert not torch.equal(y, tg.fp8_linear(x, linear.weight))


def test_the_compiled_training_graph_takes_fp8_whole_and_follows_the_switch():
    model = make_model(num_layers=2).train()  # two layers: the compilations are what take the time
    perturb(model)
    idx = torch.randint(2, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    step = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    losses = {}
    for scaling in ("tensor", "", "row", "tensor"):
        model.set_fp8(bool(scaling), scaling or "tensor")
        eager = model(idx, idx)
        eager_grads = torch.autograd.grad(eager, list(model.parameters()))
        compiled = step(idx, idx)
        compiled_grads = torch.autograd.grad(compiled, list(model.parameters()))
        assert torch.allclose(compiled, eager, rtol=1e-6, atol=0), scaling
        for a, b in zip(compiled_grads, eager_grads):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), scaling
        losses.setdefault(scaling, compiled.detach())
    assert len({loss.item() for loss in losses.values()}) == 3  # three computations


def test_training_switches_fp8_on_and_leaves_calibration_and_evaluation_bf16(tmp_path):
    h = sample_hparams(iterations=2, train_log_every=0, fp8_matmuls=True, output_dir=str(tmp_path),
                       gptq_calibration_batches=1)
    torch.manual_seed(0)
    model = tg.GPT(h)
    seen, lines = [], []
    model.blocks[0].mlp.up.register_forward_pre_hook(lambda m, _x: seen.append((m.training, m.fp8)))
    torch.enable_grad()(tg.train_and_export)(model, model, lambda: (0.0, 0.0), h, tg.Runtime(), lines.append)
    assert "fp8_matmuls:30" in lines
    assert seen[:2] == [(True, "tensor")] * 2  # the two training steps, with FP8_SCALING's default
    assert len(seen) > 2 and not any(fp8 for _, fp8 in seen[2:])  # GPTQ's calibration
    assert not any(getattr(m, "fp8", False) for m in model.modules())  # what evaluation and TTT get


SMOKE_FP8 = {"NUM_LAYERS": "2", "MODEL_DIM": "64", "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "64",
             "TRAIN_BATCH_TOKENS": "256", "ITERATIONS": "20", "TRAIN_LOG_EVERY": "1", "VAL_TOKENS_LIMIT": "1024"}
TRAIN_LOSS = re.compile(r"^step:\d+/\d+ train_loss:([\d.]+) ", re.M)
PRE_QUANT = re.compile(r"^pre_quant_ema step:\d+ val_loss:([\d.]+) ", re.M)


def test_a_smoke_run_trains_in_fp8_and_its_loss_falls_as_without_it(tmp_path):
    """PRESET=smoke, smaller still: _scaled_mm's CPU kernel is a plain loop, ~70× slower than the float32 one."""
    script = os.path.join(tg.HERE, "train_gpt.py")
    (tmp_path / "fp8").mkdir()
    (tmp_path / "plain").mkdir()
    fp8 = run_script([sys.executable, script], {**SMOKE_FP8, "FP8_MATMULS": "1"}, str(tmp_path / "fp8"))
    plain = run_script([sys.executable, script], SMOKE_FP8, str(tmp_path / "plain"))
    assert "fp8_matmuls:12" in fp8.splitlines() and "fp8_matmuls:" not in plain
    losses = [float(v) for v in TRAIN_LOSS.findall(fp8)]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < losses[0] - 0.3
    assert float(PRE_QUANT.search(fp8).group(1)) < math.log(1024) - 0.3  # the EMA model learned too
    assert losses != [float(v) for v in TRAIN_LOSS.findall(plain)]  # another computation ...
    assert abs(float(PRE_QUANT.search(fp8).group(1)) - float(PRE_QUANT.search(plain).group(1))) < 0.05  # ... as good


def test_the_step_bench_counts_fp8_gemms_as_matmuls_and_the_casts_apart():
    import bench_step
    for gemm in ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x64", "nvjet_qqtst_128x256_64x4_1x2_h_bz_NTN",
                 "triton_tem_fused__scaled_mm_0"):
        assert bench_step.classify(gemm) == "matmul", gemm
    for cast in ("triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_min_mul_0", "triton_poi_fused__to_copy_clone_t_1"):
        assert bench_step.classify(cast) == "other", cast


def test_the_fp8_mlp_bench_runs_every_scaling_against_bf16_and_refuses_unknown_modes():
    import fp8_mlp_bench
    reported = []
    results = fp8_mlp_bench.bench(["row", "tensor"], 64, 64, 4, 1, torch.device("cpu"),
                                  lambda mode, r: reported.append(mode))
    assert reported == ["row", "tensor"] and list(results) == ["row", "tensor"]  # bf16 runs as the reference
    for mode, r in results.items():
        assert r["ms"] is None and len(r["errors"]) == 4  # a CPU run checks, it does not time
        assert all(0 < e < 0.15 for e in r["errors"]), (mode, r["errors"])  # FP8's rounding, not another function
    with pytest.raises(SystemExit, match="use some of fused, bf16, tensor, row"):
        fp8_mlp_bench.main(["--modes", "bf16 int4"])
