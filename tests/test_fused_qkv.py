"""FUSED_QKV: in training, q, k and v as one product of the attention input with their stacked weights. It computes
what the three modules compute (the loss and every gradient, with QAT's fake-quantized weights too, eager and
compiled), and gives way to the modules in evaluation and under hooks (GPTQ's calibration, TTT's adapters). The
FP8 case is in test_fp8.py."""
import copy

import pytest
import torch

import train_gpt as tg
from conftest import make_model, perturb, tiny_hparams

QKV = ("attn.q", "attn.k", "attn.v")


def counting_linears(monkeypatch) -> list:
    """The QuantAwareLinear modules whose own forward runs, in order."""
    calls, forward = [], tg.QuantAwareLinear.forward

    def counted(self, x):
        calls.append(self)
        return forward(self, x)

    monkeypatch.setattr(tg.QuantAwareLinear, "forward", counted)
    return calls


def fused_and_plain(qat: bool, num_layers: int = 5) -> tuple[tg.GPT, tg.GPT]:
    fused = make_model(fused_qkv=True, xsa_enabled=True, attn_gate_enabled=True, num_layers=num_layers)
    perturb(fused)
    plain = copy.deepcopy(fused)
    for m in plain.modules():
        if isinstance(m, tg.Attention):
            m.fused_qkv = False
    for model in (fused, plain):
        if qat:
            for m in model.modules():
                if isinstance(m, tg.QuantAwareLinear):
                    m.grid = (6, 4.0, "sdclip")
            assert model.set_qat(True) == 6 * num_layers
        model.train()
    return fused, plain


@pytest.mark.parametrize("qat", [False, True])
def test_the_stacked_product_computes_what_the_three_projections_do(monkeypatch, qat):
    """With QAT, the plain model's q, k and v compute with 6-bit fake-quantized weights, far outside the tolerance
    from their latent ones: the losses agree only if the stacked weight is made of the fake-quantized three."""
    fused, plain = fused_and_plain(qat)
    names = {id(m): name for name, m in fused.named_modules()} | {id(m): name for name, m in plain.named_modules()}
    calls = counting_linears(monkeypatch)
    idx = torch.randint(2, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    loss = fused(idx, idx)
    loss.backward()
    fused_calls = [names[id(m)] for m in calls]
    calls.clear()
    plain_loss = plain(idx, idx)
    plain_loss.backward()
    assert not any(n.endswith(QKV) for n in fused_calls) and len(fused_calls) == 15  # proj, up, down × 5 layers
    assert sum(names[id(m)].endswith(QKV) for m in calls) == 15
    assert torch.allclose(loss, plain_loss, rtol=1e-6, atol=0)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name


def test_the_compiled_training_graph_takes_the_stacked_product_whole():
    fused, _ = fused_and_plain(qat=False, num_layers=2)  # two layers: the compilation is what takes the time
    idx = torch.randint(2, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)(idx, idx)  # a graph break is an error
    grads = torch.autograd.grad(compiled, list(fused.parameters()))
    eager = fused(idx, idx)
    assert torch.allclose(compiled, eager, rtol=1e-6, atol=0)
    for a, b in zip(grads, torch.autograd.grad(eager, list(fused.parameters()))):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_evaluation_and_hooked_forwards_take_the_modules(monkeypatch):
    assert tg.Hyperparameters().fused_qkv is False  # off until measured faster on the device
    torch.manual_seed(0)
    attn = tg.Attention(tiny_hparams(fused_qkv=True))
    calls = counting_linears(monkeypatch)
    x = torch.randn(2, 16, 64)
    attn.train()(x)
    assert calls == [attn.proj]
    calls.clear()
    attn.eval()(x)
    assert calls == [attn.q, attn.k, attn.v, attn.proj]
    calls.clear()
    handle = attn.k.register_forward_hook(lambda *_: None)
    attn.train()(x)
    handle.remove()
    assert calls == [attn.q, attn.k, attn.v, attn.proj]
