"""Muon's step with its update compiled (MUON_COMPILE_MODE): the same parameters and momentum as the code it replaced,
one graph per bucket whatever the schedule does, a state roll-back that still replays the same steps, and the
setting's checks. The compiled paths run under torch.compile on the CPU: traced and run as captured (no compiler
needed), and through inductor's C++ backend where a C++ compiler is installed."""
import copy
import math
import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import train_gpt as tg
from conftest import ARCH_OFF

SMALL_MODEL = dict(vocab_size=97, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, **ARCH_OFF)
# group 0: two 24×16 and a wide 16×40; group 1: a tall 40×16 and one more 24×16 (a bucket of its own: groups never mix)
SHAPES = [(24, 16), (24, 16), (16, 40), (40, 16), (24, 16)]
STEPS = 3
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="inductor's CPU backend needs a C++ compiler")


def case(seed: int = 0):
    """The matrices and STEPS steps of their gradients."""
    g = torch.Generator().manual_seed(seed)
    matrices = [torch.randn(*s, generator=g) for s in SHAPES]
    grads = [[torch.randn(*s, generator=g) for s in SHAPES] for _ in range(STEPS)]
    return matrices, grads


def schedule(step: int) -> list[tuple[float, float]]:
    """(lr, momentum) of each param group at a step: both change every step, as warm-down and momentum warm-up do."""
    return [(0.05 / (step + 1), 0.9 + 0.02 * step), (0.03 / (step + 1), 0.85 + 0.01 * step)]


def new_muon(matrices, backend: str, update_fn=tg.orthogonal_update) -> tg.Muon:
    """Muon over copies of `matrices` in the two groups, each with its own decay (and, by schedule, momentum)."""
    params = [torch.nn.Parameter(m.clone()) for m in matrices]
    groups = [dict(params=params[:3], weight_decay=0.1), dict(params=params[3:], weight_decay=0.2)]
    return tg.Muon(groups, lr=0.05, momentum=0.9, weight_decay=0.1, ns_steps=5, ns_dtype=torch.float32, backend=backend,
                   update_fn=update_fn)


def take_steps(muon: tg.Muon, grads) -> None:
    params = [p for group in muon.param_groups for p in group["params"]]
    for step, step_grads in enumerate(grads):
        for group, (lr, momentum) in zip(muon.param_groups, schedule(step)):
            group["lr"], group["momentum"] = lr, momentum
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        muon.step()


def previous_muon_steps(matrices, grads, backend: str) -> tuple[list, dict]:
    """Muon's step as it was before MUON_COMPILE_MODE, on one process: bucket by bucket, momentum and Nesterov in
    place on the stacked gradients, MuonEq-R, orthogonalise, then decay and the shape-scaled step. Returns the
    matrices and each bucket's momentum buffer, keyed by (group, shape)."""
    params = [m.clone() for m in matrices]
    groups = [list(range(3)), list(range(3, len(SHAPES)))]
    buffers = {}
    for step, step_grads in enumerate(grads):
        for index, (members, (lr, momentum)) in enumerate(zip(groups, schedule(step))):
            decay = 1.0 - lr * (0.1, 0.2)[index]
            for shape in dict.fromkeys(SHAPES[i] for i in members):
                bucket = [i for i in members if SHAPES[i] == shape]
                stacked = torch.stack([step_grads[i] for i in bucket])
                buf = buffers.setdefault((index, shape), torch.zeros_like(stacked))
                buf.mul_(momentum).add_(stacked)
                update = stacked.add_(buf, alpha=momentum)
                update = update / (update.norm(dim=-1, keepdim=True) + tg.NORM_EPS)
                update = tg.orthogonalise(update, 5, torch.float32, backend)
                scale = math.sqrt(max(1.0, shape[0] / shape[1]))
                for i, u in zip(bucket, update):
                    params[i].mul_(decay).add_(u, alpha=-lr * scale)
    return params, buffers


def buffers_of(muon: tg.Muon) -> dict:
    out = {}
    for params, index in zip(muon.buckets, muon.bucket_groups):
        out[(index, tuple(params[0].shape))] = muon.state[params[0]]["momentum_buffer"]
    return out


def params_of(muon: tg.Muon) -> list:
    return [p.detach() for group in muon.param_groups for p in group["params"]]


@pytest.mark.parametrize("backend", tg.MUON_BACKENDS)
def test_muon_step_equals_the_previous_code_bit_for_bit(backend):
    """Eager (MUON_COMPILE_MODE=eager, and every CPU run): the same bits as before, over steps whose LR and momentum
    change, in two groups with different momenta (two rounds of the foreach calls)."""
    matrices, grads = case()
    expected, expected_buffers = previous_muon_steps(matrices, grads, backend)
    muon = new_muon(matrices, backend)
    take_steps(muon, grads)
    assert all(torch.equal(p, e) for p, e in zip(params_of(muon), expected))
    buffers = buffers_of(muon)
    assert buffers.keys() == expected_buffers.keys()
    assert all(torch.equal(buffers[k], expected_buffers[k]) for k in buffers)


@pytest.mark.parametrize("backend", tg.MUON_BACKENDS)
def test_the_compiled_update_is_one_whole_graph_per_bucket(backend):
    """Traced as build_optimizers compiles it (static shapes), whole (fullgraph: no break splits its launches): one
    graph per bucket, none more as the LR and momentum change (they stay outside it), and the eager bits."""
    torch._dynamo.reset()  # graphs of other tests would count against the per-function limit
    counter = CompileCounter()
    compiled = torch.compile(tg.orthogonal_update, backend=counter, dynamic=False, fullgraph=True)
    matrices, grads = case()
    eager, traced = new_muon(matrices, backend), new_muon(matrices, backend, compiled)
    take_steps(eager, grads)
    take_steps(traced, grads)
    # one per stacked shape: the two groups' (24, 16) buckets hold 2 and 1 matrices, so they are two
    assert counter.frame_count == len({(len(params), *params[0].shape) for params in traced.buckets}) == 4
    assert all(torch.equal(p, q) for p, q in zip(params_of(eager), params_of(traced)))


def test_a_state_roll_back_replays_the_same_steps_without_recompiling():
    """warm_up_compile's pattern: save the weights and the optimizer, take steps (which compile), load both back;
    the timed steps that follow give what a fresh optimizer gives, and compile nothing more."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(tg.orthogonal_update, backend=counter, dynamic=False, fullgraph=True)
    matrices, grads = case()
    fresh = new_muon(matrices, "polar", compiled)
    take_steps(fresh, grads)
    muon = new_muon(matrices, "polar", compiled)
    initial_params = [p.clone() for p in params_of(muon)]
    initial_state = copy.deepcopy(muon.state_dict())
    take_steps(muon, case(seed=1)[1])  # the warm-up's own steps, on other data
    graphs = counter.frame_count
    with torch.no_grad():
        for p, saved in zip(params_of(muon), initial_params):
            p.copy_(saved)
    muon.load_state_dict(initial_state)
    assert muon.state_dict()["state"] == {}  # no momentum before the first step
    take_steps(muon, grads)
    assert counter.frame_count == graphs
    assert all(torch.equal(p, q) for p, q in zip(params_of(fresh), params_of(muon)))
    mid = copy.deepcopy(muon.state_dict())  # and a round trip with momentum in it
    muon.load_state_dict(mid)
    assert all(torch.equal(a, b) for a, b in zip(buffers_of(muon).values(), buffers_of(fresh).values()))


@needs_cxx
@pytest.mark.parametrize("backend", tg.MUON_BACKENDS)
def test_inductor_compiled_update_matches_eager(backend):
    """Compiled for real (inductor's CPU backend): float32 steps agree with eager to rounding, and in bfloat16 (the
    GPU's dtype) the compiled update is as close to float64 as eager's (fusion rounds less often, not more)."""
    torch._dynamo.reset()
    compiled = torch.compile(tg.orthogonal_update, dynamic=False, fullgraph=True)
    matrices, grads = case()
    eager, inductor = new_muon(matrices, backend), new_muon(matrices, backend, compiled)
    take_steps(eager, grads)
    take_steps(inductor, grads)
    for p, q in zip(params_of(eager), params_of(inductor)):
        assert torch.allclose(p, q, atol=1e-5), (p - q).abs().max()
    buffers = buffers_of(inductor)  # the momentum stays eager: the same bits
    assert all(torch.equal(b, buffers[k]) for k, b in buffers_of(eager).items())
    for shape in [(3, 64, 64), (2, 32, 64), (2, 128, 32)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        reference = tg.orthogonal_update(x.double(), 5, torch.float64, backend)
        got = compiled(x, 5, torch.bfloat16, backend)
        assert got.dtype == torch.bfloat16 and got.is_contiguous()  # what the all-gather sends

        def error(y):
            return ((y.double() - reference).norm() / reference.norm()).item()

        assert error(got) <= 1.1 * error(tg.orthogonal_update(x, 5, torch.bfloat16, backend)) < 0.1, shape


@pytest.mark.parametrize("mode", tg.MUON_COMPILE_MODES)
def test_build_optimizers_compiles_the_update_in_the_chosen_mode(monkeypatch, mode):
    calls = []
    monkeypatch.setattr(tg, "compile_on_gpu", lambda fn, h, device, **options: calls.append((fn, options)) or "graph")
    h = tg.Hyperparameters(**SMALL_MODEL, muon_compile_mode=mode)
    muon = tg.build_optimizers(tg.GPT(h), h, tg.Runtime())[0]
    if mode == "eager":
        assert calls == [] and muon.update_fn is tg.orthogonal_update
    else:
        assert calls == [(tg.orthogonal_update, dict(mode=mode, dynamic=False))]
        assert muon.update_fn == "graph"


def test_the_update_runs_eagerly_on_the_cpu():
    h = tg.Hyperparameters(**SMALL_MODEL, muon_compile_mode="default")
    assert tg.build_optimizers(tg.GPT(h), h, tg.Runtime())[0].update_fn is tg.orthogonal_update


@pytest.mark.parametrize("raw", ["reduce-overhead", "max-autotune", "0", "off", "Default", ""])
def test_an_unknown_compile_mode_is_refused(monkeypatch, raw):
    monkeypatch.setenv("MUON_COMPILE_MODE", raw)
    h = tg.Hyperparameters.from_env()
    with pytest.raises(SystemExit, match=f"MUON_COMPILE_MODE={raw!r} is unknown: use one of default, "
                                         "max-autotune-no-cudagraphs, eager"):
        h.validate(world_size=1)


def test_a_known_compile_mode_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("MUON_COMPILE_MODE", "max-autotune-no-cudagraphs")
    h = tg.Hyperparameters.from_env()
    assert h.muon_compile_mode == "max-autotune-no-cudagraphs"
    h.validate(world_size=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_on_a_gpu_the_compiled_step_is_as_close_to_float64_as_eager(mode):
    """As training runs it: the model's bucket shapes, the orthogonalisation in bfloat16, the update compiled as
    build_optimizers compiles it. Three steps' movement of the weights, against Muon in float64: the compiled one
    within about eager's own bfloat16 error (both a few percent)."""
    device = torch.device("cuda")
    h = tg.Hyperparameters(muon_compile_mode=mode)
    g = torch.Generator().manual_seed(0)
    shapes = [shape for count, *shape in [(3, 512, 512), (3, 256, 512), (2, 2048, 512), (2, 512, 2048)]
              for _ in range(count)]
    matrices = [torch.randn(*s, generator=g).to(device) for s in shapes]
    grads = [[torch.randn(*s, generator=g).to(device) for s in shapes] for _ in range(STEPS)]

    def movement(update_fn, dtype):
        params = [torch.nn.Parameter(m.clone()) for m in matrices]
        muon = tg.Muon(params, lr=0.02, momentum=0.95, weight_decay=0.0, ns_steps=5, ns_dtype=dtype,
                       update_fn=update_fn)
        for step_grads in grads:
            for p, grad in zip(params, step_grads):
                p.grad = grad.clone()
            muon.step()
        return torch.cat([(p.detach() - m).flatten() for p, m in zip(params, matrices)]).double()

    torch._dynamo.reset()  # the CPU tests' graphs would count against the per-function limit
    counters.clear()
    compiled = tg.muon_update_fn(h, device)
    assert compiled is not tg.orthogonal_update
    reference = movement(tg.orthogonal_update, torch.float64)
    eager_error = ((movement(tg.orthogonal_update, torch.bfloat16) - reference).norm() / reference.norm()).item()
    compiled_error = ((movement(compiled, torch.bfloat16) - reference).norm() / reference.norm()).item()
    assert counters["stats"]["unique_graphs"] == 4  # one per bucket, built in the first step: none ran eagerly
    assert compiled_error <= 1.25 * eager_error < 0.2, (compiled_error, eager_error)  # eager: ~0.03 on the CPU
