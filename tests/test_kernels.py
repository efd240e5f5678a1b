"""The fused softcapped cross-entropy kernel against a float64 reference: values and gradients.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest)."""
import pytest
import torch

import train_gpt as tg
from conftest import PROXY

pytestmark = pytest.mark.skipif(tg.triton is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(logits: torch.Tensor, targets: torch.Tensor, cap: float):
    """Loss and d(sum of weighted losses)/d(logits) in float64 through autograd."""
    z = logits.double().detach().requires_grad_(True)
    capped = cap * torch.tanh(z / cap)
    losses = torch.nn.functional.cross_entropy(capped, targets, reduction="none", ignore_index=tg.CE_IGNORE_INDEX)
    return losses, z


@pytest.mark.parametrize("rows,vocab,dtype", [(7, 1000, torch.float32), (5, 1037, torch.bfloat16),
                                              (3, 2048, torch.float32), (4, 1, torch.float32)])
def test_fused_softcap_ce_matches_float64(rows, vocab, dtype):
    g = torch.Generator().manual_seed(rows * vocab)
    logits = (torch.randn(rows, vocab, generator=g) * 20).to(dtype)
    logits[0, : min(vocab, 5)] = torch.tensor([300.0, -300.0, 0.0, 1e4, -1e4])[: min(vocab, 5)].to(dtype)  # saturation
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[1] = tg.CE_IGNORE_INDEX  # a masked row
    weights = torch.rand(rows, generator=g) + 0.5
    ref_loss, z = reference(logits, targets, 30.0)
    (ref_loss * weights.double()).sum().backward()

    x = logits.to(DEVICE).requires_grad_(True)
    loss = tg.softcap_cross_entropy(x, targets.to(DEVICE), 30.0, fused=True)
    assert loss.dtype == torch.float32 and loss.shape == (rows,)
    (loss * weights.to(DEVICE)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert loss[1].item() == 0.0 and torch.all(x.grad[1] == 0)
    assert torch.allclose(loss.double().cpu(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 gradients are rounded on the way out
    err = (x.grad.double().cpu() - z.grad).norm() / z.grad.norm().clamp_min(1e-30)
    assert err < tol


def test_fused_and_plain_paths_agree_inside_the_model():
    torch.manual_seed(0)
    h = tg.Hyperparameters(vocab_size=300, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, rope_dims=8, **PROXY)
    model = tg.GPT(h).to(DEVICE)
    idx = torch.randint(0, 300, (2, 16), device=DEVICE)
    targets = torch.randint(0, 300, (2, 16), device=DEVICE)
    model.fused_ce = True
    fused = model(idx, targets)
    fused.backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.fused_ce = False
    plain = model(idx, targets)
    plain.backward()
    assert torch.allclose(fused, plain, rtol=1e-5)
    for a, p in zip(fused_grads, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rows,dim,hidden", [(37, 32, 64), (16, 48, 80)])
def test_fused_mlp_matches_float64(rows, dim, hidden):
    """FUSED_MLP against down(LeakyReLU(up(x), 0.5)²) in float64: output and all three gradients, odd sizes
    (rows, and hidden or dim not multiples of the tile) included."""
    g = torch.Generator().manual_seed(rows + dim)
    x = torch.randn(rows, dim, generator=g).to(torch.bfloat16)
    w_up = (torch.randn(hidden, dim, generator=g) / dim ** 0.5).to(torch.bfloat16)
    w_down = (torch.randn(dim, hidden, generator=g) / hidden ** 0.5).to(torch.bfloat16)
    grad_out = torch.randn(rows, dim, generator=g)
    ref = [t.double().requires_grad_(True) for t in (x, w_up, w_down)]
    out_ref = torch.nn.functional.leaky_relu(ref[0] @ ref[1].T, 0.5).square() @ ref[2].T
    out_ref.backward(grad_out.double())

    ins = [t.to(DEVICE).requires_grad_(True) for t in (x, w_up, w_down)]
    out = tg.fused_leaky_relu_square_mlp(*ins)
    out.backward(grad_out.to(DEVICE, torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (rows, dim)

    def rel(a, b):
        return ((a.double().cpu() - b).norm() / b.norm()).item()

    assert rel(out, out_ref.detach()) < 2e-2  # bf16 storage of h, a and the output
    for got, want in zip(ins, ref):
        assert rel(got.grad, want.grad) < 3e-2


def test_fused_mlp_is_used_only_in_training_without_hooks(monkeypatch):
    """The model takes the Triton MLP in training; evaluation and GPTQ's hooked forward take the plain modules."""
    h = tg.Hyperparameters(vocab_size=64, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=4)
    mlp = tg.MLP(h)
    mlp.fused = True
    calls = []
    monkeypatch.setattr(tg, "fused_leaky_relu_square_mlp", lambda *a: calls.append(1) or torch.zeros(2, 32))
    x = torch.randn(2, 32)
    mlp.train()(x)
    assert calls == [1]
    mlp.eval()(x)
    handle = mlp.up.register_forward_hook(lambda *_: None)
    mlp.train()(x)
    handle.remove()
    assert calls == [1]


def test_mlp_tiles_bench_checks_every_configuration(monkeypatch, capsys):
    """tools/bench/mlp_tiles_bench.py: whole tiles (the unmasked EVEN path) and partial ones both give correct results,
    a configuration that computes wrong values is reported as incorrect and not timed, and bad tiles are refused."""
    import mlp_tiles_bench
    device = torch.device(DEVICE)  # the interpreter on a CPU
    result = mlp_tiles_bench.bench([(16, 16, 16, 1, 1), (32, 32, 16, 1, 1)], 48, 32, 48, 1, device)
    assert [r["ok"] for r in result["rows"]] == [True, True], result["rows"]
    assert all(r["max_rel_error"] < 1e-2 and r["forward_ms"] > 0 for r in result["rows"])
    real = tg._mlp_matmul_launch

    def broken(a, b, h, out, backward, tiles=None):
        real(a, b, h, out, backward, tiles)
        out.mul_(1.1)  # 10% off

    monkeypatch.setattr(tg, "_mlp_matmul_launch", broken)
    row = mlp_tiles_bench.bench([(16, 16, 16, 1, 1)], 48, 32, 48, 1, device)["rows"][0]
    assert not row["ok"] and "forward_ms" not in row
    with pytest.raises(SystemExit, match="five positive integers"):
        mlp_tiles_bench.parse_tiles("128,128,64")
    monkeypatch.setattr(tg, "_mlp_matmul_launch", real)
    assert mlp_tiles_bench.main(["--tiles", "16,16,16,1,1", "--tokens", "32", "--dim", "16", "--hidden", "16",
                                 "--reps", "1"]) == 0
    assert "| 16,16,16,1,1 | yes |" in capsys.readouterr().out
