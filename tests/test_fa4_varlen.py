"""Document attention on FlashAttention-4 (flash-attn-4's flash_attn.cute). The kernels need a GPU; on the CPU,
float64 stand-ins for FA4's _flash_attn_fwd and _flash_attn_bwd (their keywords, asserts and return layouts, read
from flash_attn/cute/interface.py of 4.0.0b36) run the whole path around them: the custom ops of define_fa4_ops,
their fake kernels and autograd, grouped queries, windows, training's empty segments and the log-sum-exp handed to
the backward. The results are checked against conftest's reference_varlen, which shares none of that code."""
import inspect
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import train_gpt as tg
from conftest import REPO, perturb, reference_varlen, tiny_hparams

HEADS, KV_HEADS, HEAD_DIM = 8, 4, 16
WINDOW = 5  # shorter than most segments of packed_batch: the window does bound them


def segments(cu: torch.Tensor) -> list[tuple[int, int]]:
    return [(s, e) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s]


def check_packed_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """What FA4's varlen path asserts of its inputs (and what it needs of max_seqlen: host ints that bound every
    segment, as they size its scheduling and its backward's accumulators)."""
    assert q.dim() == 3 and k.shape == v.shape == (q.size(0), k.size(1), q.size(2)) and q.size(1) % k.size(1) == 0
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.bfloat16, torch.float16, torch.float64)
    assert all(t.is_contiguous() for t in (q, k, v))
    assert cu_seqlens_q is cu_seqlens_k and cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.dim() == 1
    assert cu_seqlens_q[0] == 0 and cu_seqlens_q[-1] == q.size(0)
    assert type(max_seqlen_q) is int and max_seqlen_q == max_seqlen_k
    assert max_seqlen_q >= int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())


def segment_scores(q, k, s, e, scale, causal, window_size_left, window_size_right):
    """(heads, n, n) float64 scores of one segment, −inf where FA4 masks: causal forces window_size_right to 0;
    query i sees keys i − left..i + right (None: unbounded). Query head h reads kv head h // group."""
    keys = k[s:e].double().repeat_interleave(q.size(1) // k.size(1), 1)
    scores = torch.einsum("shd,thd->hst", q[s:e].double(), keys) * scale
    back = torch.arange(e - s)[:, None] - torch.arange(e - s)[None, :]  # query position − key position
    right = 0 if causal else window_size_right
    visible = torch.ones_like(back, dtype=torch.bool)
    if right is not None:
        visible &= back >= -right
    if window_size_left is not None:
        visible &= back <= window_size_left
    return scores.masked_fill(~visible, float("-inf"))


def fa4_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
            max_seqlen_q=None, max_seqlen_k=None, min_seqlen_k=None, page_table=None, softmax_scale=None,
            causal=False, softcap=None, window_size_left=None, window_size_right=None, learnable_sink=None,
            return_lse=False):
    """flash_attn.cute.interface._flash_attn_fwd, packed: (out like q, lse float32 (heads, total_q) in natural log,
    then p, row_max, o_lo: None here). The log-sum-exp only when return_lse (FA4 also makes it when an input
    requires grad, which a custom op's inputs need not show)."""
    assert qv is None and seqused_q is seqused_k is page_table is softcap is learnable_sink is None
    check_packed_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = 1 / math.sqrt(q.size(-1)) if softmax_scale is None else softmax_scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((q.size(1), q.size(0)), float("-inf"), dtype=torch.float32)
    for s, e in segments(cu_seqlens_q):
        scores = segment_scores(q, k, s, e, scale, causal, window_size_left, window_size_right)
        lse[:, s:e] = torch.logsumexp(scores, -1).float()
        values = v[s:e].double().repeat_interleave(q.size(1) // k.size(1), 1)
        out[s:e] = torch.einsum("hst,thd->shd", scores.softmax(-1), values)
    return out.to(q.dtype), lse if return_lse else None, None, None, None


def fa4_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, window_size_left=None,
            window_size_right=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
            max_seqlen_q=None, max_seqlen_k=None, deterministic=False):
    """flash_attn.cute.interface._flash_attn_bwd, packed: (dq, dk, dv) like q, k, v, from the forward's output and
    log-sum-exp as a flash kernel takes them (so a misplaced or mislaid statistic gives wrong gradients)."""
    assert softcap == 0.0 and seqused_q is seqused_k is None
    check_packed_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    assert out.shape == dout.shape == q.shape and out.dtype == dout.dtype == q.dtype
    assert lse.shape == (q.size(1), q.size(0)) and lse.dtype == torch.float32
    scale = 1 / math.sqrt(q.size(-1)) if softmax_scale is None else softmax_scale
    group = q.size(1) // k.size(1)
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v))
    for s, e in segments(cu_seqlens_q):
        scores = segment_scores(q, k, s, e, scale, causal, window_size_left, window_size_right)
        p = torch.exp(scores - lse[:, s:e, None].double())
        d_out = dout[s:e].double()
        keys, values = (t[s:e].double().repeat_interleave(group, 1) for t in (k, v))
        d_p = torch.einsum("shd,thd->hst", d_out, values)
        d_s = p * (d_p - (d_out * out[s:e].double()).sum(-1).T[:, :, None])
        dq[s:e] = torch.einsum("hst,thd->shd", d_s, keys) * scale
        # the gradients of each key/value head summed over the query heads that read it
        dk[s:e] = (torch.einsum("hst,shd->thd", d_s, q[s:e].double()) * scale).unflatten(1, (-1, group)).sum(2)
        dv[s:e] = torch.einsum("hst,shd->thd", p, d_out).unflatten(1, (-1, group)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


STANDIN = tg.define_fa4_ops(fa4_fwd, fa4_bwd, name="fa4_test::varlen")  # train_gpt's ops, around the stand-ins


def packed_batch(rows=3, seq_len=40, max_cuts=5, seed=0, dtype=torch.float64, head_dim=HEAD_DIM):
    """q, k, v (leaves) of a packed batch and its training segments: documents cut at BOS, fewer cuts than the
    capacity, so cu_seqlens ends in empty segments (repeated entries) as in training."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.zeros(rows, seq_len, dtype=torch.bool)
    starts[0, [7, 19]] = starts[2, 30] = True
    cu, _ = tg.document_segments(tg.document_starts(torch.where(starts, tg.BOS_ID, 5)), max_cuts)
    assert (cu[1:] == cu[:-1]).any()
    q, k, v = (torch.randn(rows * seq_len, heads, head_dim, generator=g, dtype=torch.float64).to(dtype)
               .requires_grad_() for heads in (HEADS, KV_HEADS, KV_HEADS))
    return q, k, v, cu, seq_len


def output_and_grads(attn, q, k, v, grad):
    out = attn(q, k, v)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]


def assert_close(got, want, tolerance, names=("out", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert (a - b).abs().max() <= tolerance * b.abs().max(), name


@pytest.fixture
def fa4_in_place(monkeypatch):
    """varlen_causal_attention as on a GPU with FlashAttention-4 and without FlashAttention-3, on the stand-ins."""
    monkeypatch.setattr(tg, "_flash_attn_3_varlen", None)
    monkeypatch.setattr(tg, "_fa4_varlen", STANDIN)
    monkeypatch.setattr(tg, "VARLEN_WINDOWS", True)


@pytest.mark.parametrize("window", [0, WINDOW])
def test_fa4_ops_match_the_reference_attention(window):
    """Output and dq, dk, dv in float64: grouped queries, documents, empty segments, with and without a window."""
    q, k, v, cu, seq_len = packed_batch()
    grad = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(1))
    got = output_and_grads(lambda q, k, v: STANDIN(q, k, v, cu, seq_len, window)[0], q, k, v, grad)
    want = output_and_grads(lambda q, k, v: reference_varlen(q, k, v, cu, seq_len, window), q, k, v, grad)
    assert_close(got, want, 1e-5)  # the float32 log-sum-exp bounds the agreement
    # neither the documents nor the window are vacuous here: each changes the result
    whole = reference_varlen(q, k, v, torch.tensor([0, q.size(0)], dtype=torch.int32), q.size(0), window)
    assert (whole - want[0])[7:19].abs().max() > 0.1
    if window:
        assert (reference_varlen(q, k, v, cu, seq_len) - want[0]).abs().max() > 0.1


def test_log_sum_exp_has_fa4s_layout():
    """(heads, tokens) float32, each entry the log-sum-exp of its query's visible scores."""
    q, k, v, cu, seq_len = packed_batch()
    q, k = q.detach(), k.detach()
    out, lse = STANDIN(q, k, v.detach(), cu, seq_len, 0)
    assert lse.shape == (HEADS, q.size(0)) and lse.dtype == torch.float32
    t, h = 10, 5  # token 10 is 3rd of the document starting at 7; query head 5 reads kv head 2
    scores = q[t, h].double() @ k[7:t + 1, h // 2].double().T / math.sqrt(HEAD_DIM)
    assert torch.isclose(lse[h, t].double(), torch.logsumexp(scores, 0), rtol=1e-6)


@pytest.mark.parametrize("window", [0, WINDOW])
def test_varlen_causal_attention_runs_on_fa4(fa4_in_place, window):
    """The training path: float32 in (bfloat16 for the kernel), heads-first views made contiguous for it, grouped
    queries passed as such (no repeated heads), float32 out; dq, dk, dv through autograd."""
    q, k, v, cu, seq_len = packed_batch(dtype=torch.float32)
    views = [t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for t in (q, k, v)]
    assert not views[0].is_contiguous()
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    got = output_and_grads(lambda q, k, v: tg.varlen_causal_attention(q, k, v, cu, seq_len, window), *views, grad)
    rounded = [t.detach().bfloat16().double().requires_grad_() for t in (q, k, v)]
    want = output_and_grads(lambda q, k, v: reference_varlen(q, k, v, cu, seq_len, window), *rounded, grad.double())
    assert_close(got, [w.float() for w in want], 2e-2)  # bfloat16 inputs, outputs and gradients


def test_fa4_ops_pass_opcheck():
    """Schema, fake kernels, autograd registration and AOT tracing (dynamic shapes) of both custom ops."""
    q, k, v, cu, seq_len = packed_batch()
    for window in (0, WINDOW):
        torch.library.opcheck(torch.ops.fa4_test.varlen.default, (q, k, v, cu, seq_len, window))
        out, lse = STANDIN(q.detach(), k.detach(), v.detach(), cu, seq_len, window)
        torch.library.opcheck(torch.ops.fa4_test.varlen_backward.default,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, cu, seq_len,
                               window))


def test_fa4_ops_trace_compiled():
    """torch.compile (AOT autograd, one graph) keeps the ops opaque and gets the same numbers as eager."""
    q, k, v, cu, seq_len = packed_batch()
    grad = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: STANDIN(q, k, v, cu, seq_len, WINDOW)[0], backend="aot_eager",
                             fullgraph=True)
    got = output_and_grads(compiled, q, k, v, grad)
    want = output_and_grads(lambda q, k, v: reference_varlen(q, k, v, cu, seq_len, WINDOW), q, k, v, grad)
    assert_close(got, want, 1e-5)


def test_the_model_trains_the_same_on_fa4_compiled(monkeypatch, fa4_in_place):
    """A compiled (aot_eager) training step of a model with document attention and a window, packed on the
    stand-ins, against the mask path: the same loss and gradients, up to bfloat16."""
    torch.manual_seed(0)
    h = tiny_hparams(doc_attention=True, doc_segment_tokens=8, attn_window=6, attn_window_layers="0-2")
    model = tg.GPT(h)
    perturb(model)
    idx = torch.randint(2, h.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    idx[0, 11] = idx[1, 30] = tg.BOS_ID
    results = []
    for devices in (("cpu",), ()):
        monkeypatch.setattr(tg, "VARLEN_DEVICES", devices)
        torch._dynamo.reset()
        model.zero_grad()
        loss = torch.compile(model, backend="aot_eager", fullgraph=True)(idx, idx)
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (fa4_loss, fa4_grads), (mask_loss, mask_grads) = results
    # (without document bounds, the loss differs by ~2 % and the gradients by ~50 %)
    assert abs(fa4_loss - mask_loss) < 1e-3 * abs(mask_loss) and int(model.doc_overflows) == 0
    assert (fa4_grads - mask_grads).norm() < 0.02 * mask_grads.norm()


def test_fake_kernels_give_the_real_shapes_on_a_gpu_device():
    """What torch.compile sees of the ops on a (fake) GPU: the output like q, FA4's float32 (heads, tokens)
    log-sum-exp, gradients like their inputs, all contiguous."""
    with FakeTensorMode():
        q = torch.empty(4096, HEADS, 64, device="cuda", dtype=torch.bfloat16)
        kv = torch.empty(4096, KV_HEADS, 64, device="cuda", dtype=torch.bfloat16)
        cu = torch.empty(50, device="cuda", dtype=torch.int32)
        out, lse = STANDIN(q, kv, kv, cu, 2048, 0)
        grads = torch.ops.fa4_test.varlen_backward(out, q, kv, kv, out, lse, cu, 2048, 0)
    assert (out.shape, out.dtype, out.device.type) == (q.shape, torch.bfloat16, "cuda")
    assert (lse.shape, lse.dtype, lse.is_contiguous()) == ((HEADS, 4096), torch.float32, True)
    assert [(g.shape, g.dtype, g.is_contiguous()) for g in grads] == [(t.shape, t.dtype, True) for t in (q, kv, kv)]


def test_varlen_causal_attention_calls_fa4_once_without_repeated_heads(fa4_in_place):
    def attend(q, k, v, cu):
        return tg.varlen_causal_attention(q, k, v, cu, 2048, 128)
    with FakeTensorMode():
        q = torch.empty(4096, HEADS, 64, device="cuda")
        k, v = (torch.empty(4096, KV_HEADS, 64, device="cuda") for _ in range(2))
        cu = torch.empty(50, device="cuda", dtype=torch.int32)
        ops = [str(n.target) for n in make_fx(attend)(q, k, v, cu).graph.nodes if n.op == "call_function"]
    assert ops.count("fa4_test.varlen.default") == 1
    assert not [op for op in ops if "repeat" in op or "expand" in op]


# The import: FA3 first, else FA4, else torch varlen. Each case imports train_gpt afresh in a subprocess, with
# stand-in modules for the packages (a second import in this process would register the custom ops again).
IMPORT_PROBE = r"""
import json, sys, types, torch
case = sys.argv[1]
calls = []
def fwd(*args, **kwargs):
    calls.append(sorted(kwargs.items()))
    q = args[0]
    return torch.zeros_like(q), torch.zeros(q.size(1), q.size(0)), None, None, None
def broken(name):  # what a package that cannot load its CUDA libraries raises (other names: none such)
    raise OSError("libcuda.so.1: cannot open shared object file") if name.startswith("_flash") else AttributeError(name)
fa4 = types.ModuleType("flash_attn.cute.interface")
if case == "broken_fa4":
    fa4.__getattr__ = broken
else:
    fa4._flash_attn_fwd, fa4._flash_attn_bwd = fwd, None
sys.modules.update({"flash_attn": types.ModuleType("flash_attn"), "flash_attn.cute": types.ModuleType("flash_attn.cute"),
                    "flash_attn.cute.interface": fa4})
if case == "fa3":
    sys.modules["flash_attn_interface"] = fa3 = types.ModuleType("flash_attn_interface")
    fa3.flash_attn_func = fa3.flash_attn_varlen_func = fwd
import train_gpt as tg
if tg._fa4_varlen is not None:
    cu = torch.tensor([0, 3, 3, 4], dtype=torch.int32)
    tg._fa4_varlen(torch.zeros(4, 2, 8), torch.zeros(4, 1, 8), torch.zeros(4, 1, 8), cu, 3, 7)
    calls = [[(k, v if k != "cu_seqlens_q" else "cu") for k, v in c if k != "cu_seqlens_k"] for c in calls]
print(json.dumps({"kernel": tg.VARLEN_KERNEL, "devices": tg.VARLEN_DEVICES, "windows": tg.VARLEN_WINDOWS,
                  "op": str(tg._fa4_varlen), "calls": calls}))
"""


def import_probe(case: str) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE, case], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fa4_is_imported_when_fa3_is_not():
    got = import_probe("fa4")
    assert (got["kernel"], got["devices"], got["windows"]) == ("flash_attn_4", ["cuda"], True)
    assert got["op"].startswith("train_gpt.fa4_varlen")
    # the keywords FA4's forward gets: both offsets, host max lengths, causal, the window as window_size_left
    assert got["calls"] == [[["causal", True], ["cu_seqlens_q", "cu"], ["max_seqlen_k", 3], ["max_seqlen_q", 3],
                             ["return_lse", True], ["window_size_left", 7]]]


def test_fa3_takes_precedence_and_a_broken_fa4_falls_back_to_torch():
    fa3 = import_probe("fa3")
    assert (fa3["kernel"], fa3["op"], fa3["calls"]) == ("flash_attn_3", "None", [])
    broken = import_probe("broken_fa4")
    assert (broken["kernel"], broken["op"]) == ("torch" if tg._torch_varlen is not None else "", "None")


def test_the_standins_keep_fa4s_signatures():
    """Where the package is installed: the stand-ins' parameters are FA4's, by name, the first ones in order."""
    interface = pytest.importorskip("flash_attn.cute.interface")
    for standin, real, positional in ((fa4_fwd, interface._flash_attn_fwd, 3),
                                      (fa4_bwd, interface._flash_attn_bwd, 6)):
        ours, theirs = (list(inspect.signature(f).parameters) for f in (standin, real))
        assert set(ours) <= set(theirs) and ours[:positional] == theirs[:positional], standin.__name__


@pytest.mark.skipif(not torch.cuda.is_available() or tg._fa4_varlen is None or tg._torch_varlen is None,
                    reason="needs a GPU, FlashAttention-4 (without FlashAttention-3) and torch varlen")
@pytest.mark.parametrize("window", [0, 100])
def test_fa4_matches_torch_varlen_on_the_gpu(monkeypatch, window):
    """The real kernels on training's segments (empty ones included), grouped queries, head_dim 64, in bfloat16,
    against FlashAttention-2's (torch varlen) and the float64 reference."""
    q, k, v, cu, seq_len = packed_batch(rows=4, seq_len=512, max_cuts=8, head_dim=64)
    q, k, v = (t.detach().cuda().bfloat16().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)
    results = []
    for kernel in (tg._fa4_varlen, None):
        monkeypatch.setattr(tg, "_fa4_varlen", kernel)
        results.append(output_and_grads(lambda *a: tg.varlen_causal_attention(*a, cu.cuda(), seq_len, window),
                                        q, k, v, grad))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert (a.float() - b.float()).abs().max() <= 0.02 * b.float().abs().max() + 1e-3, name
