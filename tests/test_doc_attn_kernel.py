"""DOC_ATTN_KERNEL=cudnn: document attention on cuDNN's ragged kernel. The kernel needs a GPU; on the CPU, stand-ins
for aten's two cuDNN ops (a float64 attention read per the ops' schemas) run the whole path around them: the custom
ops, their autograd, the repeated key/value heads, the offsets and the log-sum-exp handed to the backward. The
results are checked against a brute-force attention that shares none of that code."""
import math
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import train_gpt as tg
from conftest import reference_varlen, tiny_hparams

HEADS, KV_HEADS, HEAD_DIM = 8, 4, 16


def segment_bounds(cu: torch.Tensor) -> list[tuple[int, int]]:
    return [(s, e) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s]


def segment_scores(q, k, s, e, scale):
    """(heads, n, n) causal scores of one segment, −inf above the diagonal."""
    scores = torch.einsum("shd,thd->hst", q[s:e].double(), k[s:e].double()) * scale
    return scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))


def standin_forward(query, key, value, attn_bias, cum_seq_q, cum_seq_k, max_q, max_k, compute_log_sumexp,
                    dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    """aten._cudnn_attention_forward on ragged (tokens, heads, head_dim) inputs, as the kernel reads them: equal
    heads, contiguous, int32 offsets; log-sum-exp float32, token-major (tokens, heads, 1)."""
    assert attn_bias is None and dropout_p == 0 and is_causal and compute_log_sumexp and not return_debug_mask
    assert query.shape == key.shape == value.shape and all(t.is_contiguous() for t in (query, key, value))
    assert cum_seq_q.dtype == torch.int32 and torch.equal(cum_seq_q, cum_seq_k) and cum_seq_q[-1] == query.size(0)
    assert max_q == max_k >= int((cum_seq_q[1:] - cum_seq_q[:-1]).max())
    scale = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    out = torch.zeros_like(query)
    lse = torch.zeros(query.size(0), query.size(1), 1, dtype=torch.float32)
    for s, e in segment_bounds(cum_seq_q):
        scores = segment_scores(query, key, s, e, scale)
        lse[s:e, :, 0] = torch.logsumexp(scores, -1).T.float()
        out[s:e] = torch.einsum("hst,thd->shd", scores.softmax(-1), value[s:e].double()).to(query.dtype)
    philox = torch.zeros(1, dtype=torch.int64)
    return out, lse, cum_seq_q.clone(), cum_seq_k.clone(), max_q, max_k, philox, philox.clone(), query.new_empty(0)


def standin_backward(grad_out, query, key, value, out, logsumexp, philox_seed, philox_offset, attn_bias, cum_seq_q,
                     cum_seq_k, max_q, max_k, dropout_p, is_causal, *, scale=None):
    """aten._cudnn_attention_backward: the attention gradient from the forward's output and log-sum-exp (as a
    flash kernel takes them, so a misplaced or mislaid statistic gives wrong gradients)."""
    assert attn_bias is None and dropout_p == 0 and is_causal and torch.equal(cum_seq_q, cum_seq_k)
    assert logsumexp.shape == (query.size(0), query.size(1), 1) and grad_out.is_contiguous()
    scale = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    grads = [torch.zeros_like(t) for t in (query, key, value)]
    for s, e in segment_bounds(cum_seq_q):
        p = torch.exp(segment_scores(query, key, s, e, scale) - logsumexp[s:e, :, 0].T[:, :, None].double())
        d_out = grad_out[s:e].double()
        d_p = torch.einsum("shd,thd->hst", d_out, value[s:e].double())
        d_s = p * (d_p - (d_out * out[s:e].double()).sum(-1).T[:, :, None])
        grads[0][s:e] = (torch.einsum("hst,thd->shd", d_s, key[s:e].double()) * scale).to(query.dtype)
        grads[1][s:e] = (torch.einsum("hst,shd->thd", d_s, query[s:e].double()) * scale).to(key.dtype)
        grads[2][s:e] = torch.einsum("hst,shd->thd", p, d_out).to(value.dtype)
    return tuple(grads)


@pytest.fixture
def cudnn_on_cpu():
    """The stand-ins registered as aten's CPU kernels of the two cuDNN ops, for one test."""
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_cudnn_attention_forward", standin_forward, "CPU")
    lib.impl("_cudnn_attention_backward", standin_backward, "CPU")
    yield
    lib._destroy()


def brute_force(q, k, v, cu):
    """Causal attention inside each segment in float64, from a dense mask; query head h reads kv head h // group."""
    pos = torch.arange(q.size(0))
    segment = torch.searchsorted(cu.long(), pos, right=True)  # i + 1 in [cu[i], cu[i + 1])
    mask = (segment[:, None] == segment[None, :]) & (pos[:, None] >= pos[None, :])
    kv_head = torch.arange(q.size(1)) // (q.size(1) // k.size(1))
    scores = torch.einsum("shd,thd->hst", q, k[:, kv_head]) / math.sqrt(q.size(-1))
    return torch.einsum("hst,thd->shd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v[:, kv_head])


def packed_batch(rows=3, seq_len=40, max_cuts=5, seed=0):
    """q, k, v (float64, leaves) of a packed batch and its training segments: documents cut at BOS, fewer cuts
    than the capacity, so cu_seqlens ends in empty segments as in training."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.zeros(rows, seq_len, dtype=torch.bool)
    starts[0, [7, 19]] = starts[2, 30] = True
    cu, _ = tg.document_segments(tg.document_starts(torch.where(starts, tg.BOS_ID, 5)), max_cuts)
    assert (cu[1:] == cu[:-1]).any()  # 3 cuts, fewer than the capacity: empty segments at the end
    q, k, v = (torch.randn(rows * seq_len, heads, HEAD_DIM, generator=g, dtype=torch.float64, requires_grad=True)
               for heads in (HEADS, KV_HEADS, KV_HEADS))
    return q, k, v, cu, seq_len


def output_and_grads(attn, q, k, v, cu, max_len, grad):
    out = attn(q, k, v, cu, max_len)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]


def test_cudnn_path_matches_brute_force_attention(cudnn_on_cpu):
    q, k, v, cu, seq_len = packed_batch()
    grad = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(1))
    got = output_and_grads(tg.cudnn_varlen_attention, q, k, v, cu, seq_len, grad)
    want = output_and_grads(lambda q, k, v, cu, _: brute_force(q, k, v, cu), q, k, v, cu, seq_len, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert (a - b).abs().max() < 1e-5 * b.abs().max(), name  # the float32 log-sum-exp bounds the agreement
    # the documents really are bounded: the first row's second document sees nothing of its first
    assert (brute_force(q, k, v, torch.tensor([0, q.size(0)], dtype=torch.int32)) - want[0])[7:19].abs().max() > 0.1


def test_cudnn_path_takes_strided_inputs(cudnn_on_cpu):
    """Heads-first views, as a transposed projection would give: the path makes them contiguous for the kernel."""
    q, k, v, cu, seq_len = packed_batch()
    views = [t.detach().transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v)]
    assert not views[0].is_contiguous()
    out = tg.cudnn_varlen_attention(*views, cu, seq_len)
    assert torch.allclose(out, brute_force(q, k, v, cu), atol=1e-6, rtol=0)


def test_custom_ops_pass_opcheck(cudnn_on_cpu):
    """Schema, fake kernels, autograd registration and AOT tracing (dynamic shapes) of both custom ops."""
    q, k, v, cu, seq_len = packed_batch()
    q, k, v = (t.detach().float().repeat_interleave(HEADS // t.size(1), 1).requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.train_gpt.cudnn_varlen.default, (q, k, v, cu, seq_len))
    out, lse = torch.ops.train_gpt.cudnn_varlen(q.detach(), k.detach(), v.detach(), cu, seq_len)
    torch.library.opcheck(torch.ops.train_gpt.cudnn_varlen_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, cu, seq_len))


def test_fake_kernels_give_the_real_shapes_on_a_gpu_device():
    """What torch.compile sees of the ops on a (fake) GPU: the output like q, a float32 (tokens, heads) statistic,
    gradients like their inputs."""
    with FakeTensorMode():
        q = torch.empty(4096, HEADS, 64, device="cuda", dtype=torch.bfloat16)
        kv = torch.empty(4096, KV_HEADS, 64, device="cuda", dtype=torch.bfloat16)
        cu = torch.empty(50, device="cuda", dtype=torch.int32)
        out, lse = torch.ops.train_gpt.cudnn_varlen(q, q, q, cu, 2048)
        grads = torch.ops.train_gpt.cudnn_varlen_backward(out, q, kv, kv, out, lse, cu, 2048)
    assert (out.shape, out.dtype, out.device.type) == (q.shape, torch.bfloat16, "cuda")
    assert (lse.shape, lse.dtype) == ((4096, HEADS), torch.float32)
    assert [(g.shape, g.dtype) for g in grads] == [(q.shape, q.dtype), (kv.shape, kv.dtype), (kv.shape, kv.dtype)]


def traced_ops(kernel: str, window: int = 0, device: str = "cuda", dtype=torch.float32) -> list[str]:
    """The ops varlen_causal_attention runs (on fake tensors) with this kernel choice."""
    def attend(q, k, v, cu):
        return tg.varlen_causal_attention(q, k, v, cu, 2048, window, kernel)
    with FakeTensorMode():
        q = torch.empty(4096, HEADS, 64, device=device, dtype=dtype)
        k, v = (torch.empty(4096, KV_HEADS, 64, device=device, dtype=dtype) for _ in range(2))
        cu = torch.empty(50, device=device, dtype=torch.int32)
        out = attend(q, k, v, cu)
        assert (out.shape, out.dtype) == (q.shape, dtype)  # float32 in, float32 out (bfloat16 inside)
        graph = make_fx(attend)(q, k, v, cu).graph
    return [str(node.target) for node in graph.nodes if node.op == "call_function"]


@pytest.mark.skipif(tg._flash_attn_3_varlen is not None or tg._torch_varlen is None,
                    reason="FlashAttention-3 takes precedence; torch varlen is the other kernel")
def test_cudnn_kernel_runs_only_on_gpu_tensors_without_a_window():
    cudnn_op = "train_gpt.cudnn_varlen.default"
    assert traced_ops("cudnn").count(cudnn_op) == 1  # one opaque op
    assert cudnn_op not in traced_ops("flash")
    assert cudnn_op not in traced_ops("cudnn", window=128)  # cuDNN's ragged kernel has no sliding window
    assert cudnn_op not in traced_ops("cudnn", device="cpu")


def test_an_unknown_kernel_is_refused():
    with pytest.raises(SystemExit, match="DOC_ATTN_KERNEL='cudnn2' is unknown: use one of flash, cudnn"):
        tg.Hyperparameters(doc_attn_kernel="cudnn2").validate(world_size=8)
    for kernel in tg.DOC_ATTN_KERNELS:
        tg.Hyperparameters(doc_attn_kernel=kernel).validate(world_size=8)


def test_a_torch_without_the_ragged_op_is_refused_at_start_up(monkeypatch):
    # a torch whose forward op takes no ragged offsets, as cudnn_varlen_missing names it
    monkeypatch.setitem(tg.CUDNN_RAGGED_ARGS, "_cudnn_attention_forward",
                        tg.CUDNN_RAGGED_ARGS["_cudnn_attention_forward"] + ("cum_seq_z",))
    missing = tg.cudnn_varlen_missing()
    assert missing == "aten._cudnn_attention_forward taking cum_seq_z"
    monkeypatch.setitem(tg.CUDNN_RAGGED_ARGS, "_cudnn_attention_nope", ("query",))
    monkeypatch.delitem(tg.CUDNN_RAGGED_ARGS, "_cudnn_attention_forward")
    assert tg.cudnn_varlen_missing() == "aten._cudnn_attention_nope taking query"
    monkeypatch.setattr(tg, "CUDNN_VARLEN_MISSING", missing)
    h = tg.Hyperparameters(doc_attn_kernel="cudnn")
    message = re.escape(f"DOC_ATTN_KERNEL=cudnn needs {missing}, which torch {torch.__version__} lacks: "
                        f"set DOC_ATTN_KERNEL=flash")
    with pytest.raises(SystemExit, match=message):
        h.validate(world_size=8)
    with pytest.raises(SystemExit, match=message):  # the benches, which build models without validate()
        tg.use_device_paths(tg.GPT(tiny_hparams(doc_attention=True, doc_attn_kernel="cudnn")), h, torch.device("cpu"))
    tg.Hyperparameters(doc_attn_kernel="flash").validate(world_size=8)  # the default needs none of it


def test_this_torch_has_the_ragged_op():
    """The torch the tests run on has what the GPU machine's needs (there a missing op fails at start-up)."""
    assert tg.CUDNN_VARLEN_MISSING == ""


def test_the_setting_reaches_every_attention_layer(monkeypatch):
    """use_device_paths hands DOC_ATTN_KERNEL to each layer, and each layer to the varlen kernel."""
    kernels = []

    def recording_varlen(*args):
        kernels.append(args[-1])
        return reference_varlen(*args)
    h = tiny_hparams(doc_attention=True, doc_attn_kernel="cudnn")
    model = tg.GPT(h)
    tg.use_device_paths(model, h, torch.device("cpu"))
    monkeypatch.setattr(tg, "VARLEN_DEVICES", ("cpu",))
    monkeypatch.setattr(tg, "varlen_causal_attention", recording_varlen)
    idx = torch.randint(2, h.vocab_size, (2, 32))
    with torch.no_grad():
        model.logits(idx)
    assert kernels == ["cudnn"] * h.num_layers


@pytest.mark.skipif(not torch.cuda.is_available() or tg._torch_varlen is None, reason="needs a GPU and torch varlen")
def test_cudnn_kernel_matches_torch_varlen_on_the_gpu():
    """The real kernel on training's segments (empty ones included) against FlashAttention-2's, in bfloat16."""
    q, k, v, cu, seq_len = packed_batch(rows=4, seq_len=512, max_cuts=8)
    q, k, v = (t.detach().cuda().bfloat16().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)
    results = [output_and_grads(lambda *a: tg.varlen_causal_attention(*a, 0, kernel), q, k, v, cu.cuda(),
                                seq_len, grad) for kernel in ("cudnn", "flash")]
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert (a.float() - b.float()).abs().max() <= 0.02 * b.float().abs().max() + 1e-3, name
