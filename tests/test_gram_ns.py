"""Gram Newton–Schulz (MUON_BACKEND=gram) and Muon's weight decay per role (MUON_WEIGHT_DECAY_MLP / _ATTN).

Inputs are built from a known SVD, X = U·diag(s)·Vᵀ, so the float64 polar factor U·Vᵀ is exact and no test pays
for an SVD of a 512×2048 matrix. Two spectra: "flat" (singular values in [1/3, 1], like a random matrix) and
"decaying" (three decades, closer to real momentum, where bfloat16 errors of the Gram form show)."""
import copy
import functools
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch

import train_gpt as tg
from conftest import ARCH_OFF, BENCH_TOOLS

SHAPES = {  # the model's Muon shapes (wide, tall, square) and a rank's share of the k/v bucket, batched
    "mlp_down_512x2048": (512, 2048),
    "mlp_up_2048x512": (2048, 512),
    "attn_q_512x512": (512, 512),
    "attn_kv_3x256x512": (3, 256, 512),
}
FLAT_LOW = 1 / 3  # "flat": singular values uniform in [FLAT_LOW, 1]
DECAYING_DECADES = 3  # "decaying": from 1 down to 10^-3
FLOAT64_MATCH = 1e-10  # gram against polar_express, both in float64: rounding only
BAND_SLACK = 0.03  # gram's singular values may leave polar_express's band (same dtype) by this much
FROBENIUS_SLACK = 0.01  # and its relative distance to U·Vᵀ may exceed polar_express's by this much
DEVIATION_FACTOR = 2.0  # its rounding error (against float64 polar_express) at most this × polar_express's own
# Polar Express's band after 5 steps is [0.86, 1.14] on singular values above its design bound; 4 steps of the
# same coefficients leave [0.42, 1.58] (the greedy schedule only closes the band on its last step).
FIVE_STEP_BAND = (0.7, 1.2)


@functools.lru_cache(maxsize=None)
def case(shape: tuple, spectrum: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, its polar factor U·Vᵀ), float64, with a seed of their own."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, spectrum)).encode()))
    *batch, rows, cols = shape
    k = min(rows, cols)
    left = torch.linalg.qr(torch.randn(*batch, rows, k, generator=g, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(*batch, cols, k, generator=g, dtype=torch.float64)).Q
    if spectrum == "flat":
        s = FLAT_LOW + (1 - FLAT_LOW) * torch.rand(*batch, k, generator=g, dtype=torch.float64)
    else:
        s = torch.logspace(0, -DECAYING_DECADES, k, dtype=torch.float64).expand(*batch, k)
    return (left * s.unsqueeze(-2)) @ right.mT, left @ right.mT


@functools.lru_cache(maxsize=None)
def polar_express_float64(shape: tuple, spectrum: str, steps: int) -> torch.Tensor:
    return tg.polar_express(case(shape, spectrum)[0], steps, torch.float64)


def singular_band(y: torch.Tensor) -> tuple[float, float]:
    """(smallest, largest) singular value over the batch, from the eigenvalues of the small Gram matrix."""
    y = y.double()
    wide = y if y.size(-2) <= y.size(-1) else y.mT
    s = torch.linalg.eigvalsh(wide @ wide.mT).clamp(min=0).sqrt()
    return s.min().item(), s.max().item()


def relative_distance(y: torch.Tensor, target: torch.Tensor) -> float:
    return ((y.double() - target).norm() / target.norm()).item()


# ---- the algebra: gram is Polar Express --------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("restart_every", [0, tg.GRAM_RESTART_EVERY])
def test_gram_equals_polar_express_in_float64(name, restart_every):
    """Q ← (aI + bA + cA²)·Q with A = Q·R·Qᵀ, then X = Q·X₀, is the plain iteration rewritten: in float64 the two
    agree to rounding, with or without restarts (which are algebraic no-ops)."""
    shape = SHAPES[name]
    x, _ = case(shape, "flat")
    gram = tg.gram_newton_schulz(x, 5, torch.float64, restart_every)
    assert gram.shape == x.shape
    assert (gram - polar_express_float64(shape, "flat", 5)).abs().max().item() < FLOAT64_MATCH


QUALITY_CASES = ([(name, "flat", torch.bfloat16, 5) for name in SHAPES if name != "attn_q_512x512"]  # the GPU path
                 # (square: orthogonalise runs polar_express itself, test_orthogonalise_picks_gram_only_…)
                 + [("mlp_down_512x2048", "flat", torch.float32, 5), ("attn_kv_3x256x512", "flat", torch.float32, 5),
                    ("mlp_down_512x2048", "decaying", torch.bfloat16, 5),
                    ("attn_kv_3x256x512", "decaying", torch.bfloat16, 5),
                    ("mlp_up_2048x512", "decaying", torch.bfloat16, 4)])  # PR #1809's step count


@pytest.mark.parametrize("name,spectrum,dtype,steps", QUALITY_CASES)
def test_gram_is_as_close_to_the_polar_factor_as_polar_express(name, spectrum, dtype, steps):
    """Muon's path (orthogonalise, backend gram) in the training dtypes (bfloat16 on GPUs, float32 on CPUs):
    its singular values land in polar_express's band, it is as close to U·Vᵀ, and its rounding error against
    float64 Polar Express is of polar_express's own size."""
    shape = SHAPES[name]
    x, polar = case(shape, spectrum)
    exact = polar_express_float64(shape, spectrum, steps)
    gram = tg.orthogonalise(x, steps, dtype, "gram").double()
    plain = tg.polar_express(x, steps, dtype).double()
    (gram_low, gram_high), (plain_low, plain_high) = singular_band(gram), singular_band(plain)
    assert plain_low - BAND_SLACK <= gram_low and gram_high <= plain_high + BAND_SLACK
    if steps == 5 and spectrum == "flat":
        assert FIVE_STEP_BAND[0] <= gram_low and gram_high <= FIVE_STEP_BAND[1]
    assert relative_distance(gram, polar) <= relative_distance(plain, polar) + FROBENIUS_SLACK
    assert (gram - exact).abs().max() <= DEVIATION_FACTOR * (plain - exact).abs().max() + FLOAT64_MATCH


def test_restarts_keep_bfloat16_errors_bounded():
    """Without restarts the Gram form's bfloat16 errors grow with Q (eigenvalues ≈ 1/s) on a decaying spectrum:
    the top singular value leaves the band by far. With them it stays where polar_express's is."""
    x, _ = case(SHAPES["mlp_down_512x2048"], "decaying")
    plain_high = singular_band(tg.polar_express(x, 5, torch.bfloat16))[1]
    assert singular_band(tg.gram_newton_schulz(x, 5, torch.bfloat16, restart_every=0))[1] > plain_high + 0.3
    assert singular_band(tg.gram_newton_schulz(x, 5, torch.bfloat16))[1] <= plain_high + BAND_SLACK


# ---- the switch ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,min_aspect,expect_gram", [
    ((64, 64), 1.5, False), ((64, 90), 1.5, False), ((90, 64), 1.5, False),  # square and near-square: plain
    ((64, 96), 1.5, True), ((96, 64), 1.5, True), ((2, 32, 128), 1.5, True),  # from the aspect ratio on: gram
    ((32, 128), 5.0, False),  # the threshold is a setting
])
def test_orthogonalise_picks_gram_only_for_oblong_matrices(shape, min_aspect, expect_gram):
    x = torch.randn(*shape)
    plain = tg.polar_express(x, 5, torch.float32)
    assert torch.equal(tg.orthogonalise(x, 5, torch.float32, "polar", min_aspect), plain)
    chosen = tg.orthogonalise(x, 5, torch.float32, "gram", min_aspect)
    if expect_gram:
        assert torch.equal(chosen, tg.gram_newton_schulz(x, 5, torch.float32))
        assert not torch.equal(chosen, plain)  # a different computation, equal only up to rounding
        assert torch.allclose(chosen, plain, atol=1e-4)
    else:
        assert torch.equal(chosen, plain)


def tiny_hparams(**overrides) -> tg.Hyperparameters:
    """Two layers at width 64: q and proj 64×64 (plain), k and v 32×64 and the MLP 256×64, 64×256 (gram)."""
    h = tg.Hyperparameters(vocab_size=97, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8,
                           **ARCH_OFF)
    for k, v in overrides.items():
        setattr(h, k, v)
    return h


@pytest.mark.parametrize("field,value", [("muon_backend", "newton"), ("muon_backend", "Gram"),
                                         ("muon_backend", ""), ("muon_gram_min_aspect", 0.5),
                                         ("muon_gram_min_aspect", math.nan)])
def test_unknown_backends_and_bad_aspect_ratios_are_refused(field, value):
    h = tiny_hparams(**{field: value})
    with pytest.raises(SystemExit, match=field.upper()):
        tg.build_optimizers(tg.GPT(h), h, tg.Runtime())
    with pytest.raises(ValueError, match=field.upper()):
        tg.Muon([torch.nn.Parameter(torch.zeros(4, 8))], lr=0.1, momentum=0.9, weight_decay=0.0, ns_steps=5,
                ns_dtype=torch.float32, **{field.removeprefix("muon_"): value})


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MUON_BACKEND", "gram")
    monkeypatch.setenv("MUON_GRAM_MIN_ASPECT", "3")
    monkeypatch.setenv("MUON_WEIGHT_DECAY_MLP", "0.115")
    h = tg.Hyperparameters.from_env()
    assert (h.muon_backend, h.muon_gram_min_aspect, h.muon_weight_decay_mlp) == ("gram", 3.0, 0.115)
    assert tg.Hyperparameters().muon_backend == "polar"  # the default until a GPU measurement says otherwise


def one_muon_step(h: tg.Hyperparameters, model: tg.GPT) -> tg.GPT:
    """A copy of `model` after one Muon step on the gradients it carries."""
    stepped = copy.deepcopy(model)
    for p, source in zip(stepped.parameters(), model.parameters()):
        p.grad = None if source.grad is None else source.grad.clone()  # deepcopy leaves the gradients behind
    tg.build_optimizers(stepped, h, tg.Runtime())[0].step()
    return stepped


def test_muon_step_with_gram_matches_polar_on_a_tiny_model(monkeypatch):
    torch.manual_seed(0)
    h = tiny_hparams()
    model = tg.GPT(h)
    tokens = torch.randint(0, h.vocab_size, (2, 33))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    gram_shapes = []
    real_gram = tg.gram_newton_schulz
    monkeypatch.setattr(tg, "gram_newton_schulz", lambda x, *a, **k: gram_shapes.append(tuple(x.shape[-2:]))
                        or real_gram(x, *a, **k))
    plain = one_muon_step(tiny_hparams(muon_backend="polar"), model)
    assert gram_shapes == []
    gram = one_muon_step(tiny_hparams(muon_backend="gram"), model)
    assert sorted(set(gram_shapes)) == [(32, 64), (64, 256), (256, 64)]  # k/v and the MLP; not q, proj
    for (name, before), after_plain, after_gram in zip(model.named_parameters(), plain.parameters(),
                                                       gram.parameters()):
        step = (after_plain - before).abs().max()
        if name.endswith((".k.weight", ".v.weight", ".up.weight", ".down.weight")):
            assert step > 0
        assert (after_gram - after_plain).abs().max() <= 1e-4 * step + 1e-9, name


# ---- weight decay per role ----------------------------------------------------------------------------------------

ROLE_OF_SUFFIX = {".q.weight": "attn", ".k.weight": "attn", ".v.weight": "attn", ".proj.weight": "attn",
                  ".up.weight": "mlp", ".down.weight": "mlp"}


def decay_step(h: tg.Hyperparameters) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Muon's block matrices (name → before, after) for one step on zero gradients: the update orthogonalises to
    zero, so what changes is the decay alone, p ← p·(1 − lr·decay)."""
    torch.manual_seed(0)
    model = tg.GPT(h)
    muon = tg.build_optimizers(model, h, tg.Runtime())[0]
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = [p for params in muon.buckets for p in params]
    before = {names[id(p)]: p.detach().clone() for p in matrices}
    for p in matrices:
        p.grad = torch.zeros_like(p)
    muon.step()
    return {names[id(p)]: (before[names[id(p)]], p.detach()) for p in matrices}


def role(name: str) -> str:
    return next(r for suffix, r in ROLE_OF_SUFFIX.items() if name.endswith(suffix))


def test_weight_decay_per_role_is_the_configured_one():
    h = tiny_hparams(matrix_lr=0.5, muon_weight_decay=0.01, muon_weight_decay_mlp=0.115,
                     muon_weight_decay_attn=0.095)  # PR #1812's values
    steps = decay_step(h)
    assert len(steps) == 2 * len(ROLE_OF_SUFFIX)
    for name, (before, after) in steps.items():
        decay = {"mlp": 0.115, "attn": 0.095}[role(name)]
        assert torch.allclose(after, before * (1 - 0.5 * decay), rtol=1e-6, atol=0), name


def test_role_decays_default_to_muon_weight_decay():
    h = tiny_hparams(muon_weight_decay=0.2, muon_weight_decay_attn=0.05)
    muon = tg.build_optimizers(tg.GPT(h), h, tg.Runtime())[0]
    assert {g["role"]: g["weight_decay"] for g in muon.param_groups} == {"attn": 0.05, "mlp": 0.2}
    default = tiny_hparams()
    muon = tg.build_optimizers(tg.GPT(default), default, tg.Runtime())[0]
    assert {g["weight_decay"] for g in muon.param_groups} == {default.muon_weight_decay}
    assert all({tuple(p.shape) for p in params} == {tuple(params[0].shape)} for params in muon.buckets)


def test_role_groups_follow_a_state_roll_back():
    """warm_up_compile restores the optimizer with load_state_dict, which replaces the param group dicts: the
    schedule then sets the new ones, and the step must read those (an LR of 0 leaves the weights alone)."""
    h = tiny_hparams(matrix_lr=0.5, muon_weight_decay_mlp=0.115, muon_weight_decay_attn=0.095)
    model = tg.GPT(h)
    muon = tg.build_optimizers(model, h, tg.Runtime())[0]
    muon.load_state_dict(muon.state_dict())
    for group in muon.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    for params in muon.buckets:
        for p in params:
            p.grad = torch.zeros_like(p)
    muon.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


# ---- the benchmark -------------------------------------------------------------------------------------------------

def test_ns_bench_cpu_smoke_runs():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, os.path.join(BENCH_TOOLS, "ns_bench.py"), "--cpu-smoke", "--reps", "1",
                           "--warmup", "0", "--world-sizes", "8", "--spectra", "decaying", "--steps", "5"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip().startswith("backend:")]
    assert sorted((r[0], r[1]) for r in rows) == sorted((f"backend:{b}", "steps:5") for b in tg.MUON_BACKENDS)
    for r in rows:
        fields = dict(item.split(":", 1) for item in r)
        assert float(fields["ms_per_step"]) > 0
        assert 0 <= float(fields["max_dev_fp64_polar_express"]) < 0.5


# ---- both, sharded over ranks ---------------------------------------------------------------------------------------

def sharded_hparams() -> tg.Hyperparameters:
    return tiny_hparams(muon_backend="gram", matrix_lr=0.05, muon_weight_decay_mlp=0.115, muon_weight_decay_attn=0.5)


def rank_gradients(model: tg.GPT, rank: int, world_size: int) -> None:
    """Set gradients that differ per rank (world_size 1: their mean over 2 ranks), the same in every process."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        per_rank = [torch.randn(p.shape, generator=g) for _ in range(2)]
        p.grad = per_rank[rank] if world_size == 2 else (per_rank[0] + per_rank[1]) / 2


def two_steps(rank: int, world_size: int) -> list[torch.Tensor]:
    h = sharded_hparams()
    torch.manual_seed(0)
    model = tg.GPT(h)
    optimizers = tg.build_optimizers(model, h, tg.Runtime(rank, world_size))
    for _ in range(2):
        rank_gradients(model, rank, world_size)
        tg.optimizer_step(model, optimizers, 0.0, world_size)
    return [p.detach().clone() for p in model.parameters()]


def _sharded_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.save(two_steps(rank, 2), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_gram_and_role_decays_on_two_ranks_equal_one_process(tmp_path):
    """Role groups split the buckets (attention 64×64 and 32×64, MLP 256×64 and 64×256, 2 layers each): the
    reduce-scatter, the per-rank gram orthogonalisation and the all-gather give what one process computes."""
    torch.multiprocessing.spawn(_sharded_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = two_steps(0, 1)
    for rank in range(2):
        for e, got in zip(expected, torch.load(tmp_path / f"rank{rank}.pt")):
            assert torch.allclose(e, got, atol=1e-5), (e - got).abs().max()
