"""Model, attention, optimizer and schedule: each checked against a slow reference."""
import dataclasses
import math
import os

import pytest
import torch
import torch.distributed as dist

import train_gpt as tg
from conftest import ARCH_OFF, assert_causal


def tiny_hparams(**overrides) -> tg.Hyperparameters:
    h = tg.Hyperparameters(vocab_size=97, num_layers=5, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, **ARCH_OFF)
    for k, v in overrides.items():
        setattr(h, k, v)
    return h


def reference_attention(q, k, v):
    """Causal grouped-query attention in float64, written out by hand. Layout (batch, time, heads, dim)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.size(-1))
    t = q.size(1)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


@pytest.mark.parametrize("heads,kv_heads,seq", [(4, 4, 17), (8, 2, 33), (6, 3, 1)])
def test_sdpa_attention_matches_float64_reference(heads, kv_heads, seq):
    g = torch.Generator().manual_seed(seq)
    q = torch.randn(2, seq, heads, 16, generator=g)
    k = torch.randn(2, seq, kv_heads, 16, generator=g)
    v = torch.randn(2, seq, kv_heads, 16, generator=g)
    out = tg.causal_attention(q, k, v)
    ref = reference_attention(q, k, v)
    assert out.shape == q.shape
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.skipif(tg._flash_attn_3 is None or not torch.cuda.is_available(), reason="needs FlashAttention-3 and a GPU")
def test_flash_attention_3_matches_sdpa():
    q = torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.bfloat16)
    fa3 = tg.causal_attention(q, k, v)
    saved, tg._flash_attn_3 = tg._flash_attn_3, None
    try:
        sdpa = tg.causal_attention(q, k, v)
    finally:
        tg._flash_attn_3 = saved
    assert ((fa3.float() - sdpa.float()).norm() / sdpa.float().norm()).item() < 1e-2


def test_model_is_causal():
    torch.manual_seed(0)
    model = tg.GPT(tiny_hparams()).eval()
    # zero-initialised output projections would make every block the identity: perturb them so attention matters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert_causal(model, torch.randint(0, 97, (2, 24)), t=11, vocab=97)


def test_model_defaults_match_the_spec():
    h = tg.Hyperparameters()
    model = tg.GPT(h)
    assert (h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.rope_dims) == (11, 512, 8, 4, 16)
    assert 35e6 < sum(p.numel() for p in model.parameters()) < 37e6
    assert model.blocks[3].norm_scale == pytest.approx(0.5)
    assert torch.all(model.blocks[0].attn.q_gain == 5.0)
    logits = model.logits(torch.randint(0, h.vocab_size, (1, 8)))
    assert logits.abs().max() <= h.logit_softcap


def test_bad_shapes_are_refused():
    with pytest.raises(SystemExit, match="NUM_KV_HEADS"):
        tg.GPT(tiny_hparams(num_kv_heads=3))
    with pytest.raises(SystemExit, match="ROPE_DIMS"):
        tg.GPT(tiny_hparams(rope_dims=7))


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (3, 48, 96)])
def test_polar_express_against_svd_polar_factor(shape):
    """Five Polar Express steps keep the singular vectors of the input exactly and push every singular value
    of a well-conditioned matrix near 1, so the result is close to the polar factor U·Vᵀ from the SVD."""
    g = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = tg.polar_express(g, steps=5, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    assert ((out - polar).norm() / polar.norm()).item() < 0.15
    inner = u.mT @ out @ vh.mT  # diagonal iff out shares g's singular vectors
    diag = torch.diagonal(inner, dim1=-2, dim2=-1)
    assert (inner - torch.diag_embed(diag)).norm() / diag.norm() < 1e-10
    assert diag.min() > 0.8 and diag.max() < 1.2
    # fewer steps are measurably further from the polar factor: the test can tell the iteration apart
    one_step = tg.polar_express(g, steps=1, dtype=torch.float64)
    assert (one_step - polar).norm() > 2 * (out - polar).norm()
    bf16 = tg.polar_express(g, steps=5, dtype=torch.bfloat16).double()  # the training path's precision
    assert ((bf16 - polar).norm() / polar.norm()).item() < 0.15


def test_muon_step_matches_a_hand_computed_update():
    """Two buckets (two 32×16 matrices, one 16×48) batched in the optimizer, computed here one matrix at a time."""
    torch.manual_seed(0)
    shapes = [(32, 16), (16, 48), (32, 16)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    grads = [[torch.randn(*s) for s in shapes] for _ in range(2)]
    opt = tg.Muon(params, lr=0.1, momentum=0.9, weight_decay=0.5, ns_steps=5, ns_dtype=torch.float32)
    expected = [p.detach().clone() for p in params]
    bufs = [torch.zeros(*s) for s in shapes]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(step_grads):
            bufs[i] = 0.9 * bufs[i] + g
            update = g + 0.9 * bufs[i]
            update = update / update.norm(dim=-1, keepdim=True)
            update = tg.polar_express(update, 5, torch.float32) * math.sqrt(max(1, shapes[i][0] / shapes[i][1]))
            expected[i] = expected[i] * (1 - 0.1 * 0.5) - 0.1 * update
    for p, e in zip(params, expected):
        assert torch.allclose(p.detach(), e, atol=1e-5)


def _optimizer_case(seed: int = 0):
    """Muon matrices in two buckets that do not split evenly over 2 ranks (3 and 1), two Adam vectors, and two
    steps of per-rank gradients, large enough that a clip norm of 1 scales them."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 16), (24, 16), (16, 40), (24, 16)]
    matrices = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    vectors = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (16, 7)]
    grads = [[[3 * torch.randn(p.shape, generator=g) for p in matrices + vectors] for _rank in range(2)]
             for _step in range(2)]
    return matrices, vectors, grads


def _optimizers(matrices, vectors, rank: int, world_size: int, update_fn=tg.orthogonal_update) -> list:
    muon = tg.Muon(matrices, lr=0.05, momentum=0.9, weight_decay=0.1, ns_steps=5, ns_dtype=torch.float32,
                   rank=rank, world_size=world_size, update_fn=update_fn)
    return [muon, torch.optim.AdamW(vectors, lr=0.01, weight_decay=0.0)]


def _sharded_muon_worker(rank: int, init_file: str, out_dir: str, compiled: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    matrices, vectors, grads = _optimizer_case()
    model = torch.nn.ParameterList(matrices + vectors)
    # compiled: traced by torch.compile as on a GPU (the "eager" backend runs the captured graph: no C++ compiler)
    update_fn = (torch.compile(tg.orthogonal_update, backend="eager", dynamic=False, fullgraph=True) if compiled
                 else tg.orthogonal_update)
    optimizers = _optimizers(matrices, vectors, rank, 2, update_fn)
    shards = None
    for step_grads in grads:
        for p, grad in zip(model.parameters(), step_grads[rank]):
            p.grad = grad.clone()
        if shards is None:  # Muon is blind to the gradients' scale, so check the mean itself
            shards = [t.clone() for t in optimizers[0].reduce_grads()]
        tg.optimizer_step(model, optimizers, 1.0, 2)
    torch.save(([p.detach() for p in model.parameters()], shards), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_sharded_muon_and_global_clip_on_two_ranks_equal_one_process(tmp_path, compiled):
    """Two gloo ranks (reduce-scattered Muon gradients, the clip norm summed over the shards, all-gathered
    updates) against one process stepping on the averaged gradients with torch's clip_grad_norm_. The ranks hold
    shares of different sizes (2 and 1 of a bucket, 1 and none of another), also with the update compiled."""
    torch.multiprocessing.spawn(_sharded_muon_worker, args=(str(tmp_path / "init"), str(tmp_path), compiled), nprocs=2,
                                join=True)
    matrices, vectors, grads = _optimizer_case()
    params = matrices + vectors
    optimizers = _optimizers(matrices, vectors, 0, 1)
    for step_grads in grads:
        for i, p in enumerate(params):
            p.grad = (step_grads[0][i] + step_grads[1][i]) / 2
        assert torch.nn.utils.clip_grad_norm_(params, 1.0) > 2.0  # the clip is active
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    first_mean = [(a + b) / 2 for a, b in zip(*grads[0])]
    buckets = [[first_mean[0], first_mean[1], first_mean[3]], [first_mean[2]]]  # by shape, in order of appearance
    for rank in range(2):
        got, shards = torch.load(tmp_path / f"rank{rank}.pt")
        for p, q in zip(params, got):
            assert torch.allclose(p.detach(), q, atol=1e-5), (p - q).abs().max()
        for bucket, shard in zip(buckets, shards):  # shares of 2 and 1 matrices, padded with zeros
            share = -(-len(bucket) // 2)
            mine = bucket[rank * share:(rank + 1) * share]
            expected = torch.stack(mine + [torch.zeros_like(bucket[0])] * (share - len(mine)))
            assert torch.allclose(shard, expected, atol=1e-6)


def test_lr_schedule_optional_warmup_flat_warmdown():
    h = tg.Hyperparameters(warmup_steps=10, warmdown_frac=0.5, min_lr=0.1)
    assert tg.lr_multiplier(0, 0.0, h) == pytest.approx(0.1)
    assert tg.lr_multiplier(9, 0.0, h) == pytest.approx(1.0)
    assert tg.lr_multiplier(50, 0.4, h) == 1.0
    assert tg.lr_multiplier(50, 0.75, h) == pytest.approx(0.5)  # (1 − 0.75) / 0.5
    assert tg.lr_multiplier(50, 0.95, h) == pytest.approx(0.1)  # floored from 1 − 0.5·0.1 on
    assert tg.lr_multiplier(50, 1.5, h) == pytest.approx(0.1)
    assert tg.muon_momentum(0, h) == pytest.approx(0.92)
    assert tg.muon_momentum(10**6, h) == pytest.approx(0.97)


def test_parameter_split_puts_block_matrices_in_muon():
    model = tg.GPT(tiny_hparams())
    matrices, embeddings, scalars = tg.split_parameters(model)
    assert len(matrices) == 5 * 6 and all(p.ndim == 2 for p in matrices)
    assert embeddings == [model.tok_emb.weight]
    names = {id(p): n for n, p in model.named_parameters()}
    per_block = ("attn.q_gain", "resid_mix", "attn_scale", "mlp_scale")
    assert {names[id(p)] for p in scalars} == {"skip_weights", "skip_gates"} | {f"blocks.{i}.{n}" for i in range(5)
                                                                                for n in per_block}
    assert all(p.dtype == torch.float32 for p in scalars)  # per-channel vectors: small float32 tensors for Adam


@pytest.mark.parametrize("world,batch,expected", [(1, 786432, 8), (2, 786432, 4), (4, 786432, 2), (8, 786432, 1),
                                                  (3, 786432, 4), (1, 65536, 1), (1, 196608 + 2048 * 3, 3)])
def test_grad_accum_keeps_the_global_batch(world, batch, expected):
    h = tg.Hyperparameters(train_batch_tokens=batch)
    accum = tg.derive_grad_accum_steps(h, world)
    assert accum == expected
    assert h.train_batch_tokens % (world * accum * h.train_seq_len) == 0


def test_grad_accum_refuses_a_batch_that_does_not_split():
    with pytest.raises(SystemExit, match="TRAIN_BATCH_TOKENS"):
        tg.derive_grad_accum_steps(tg.Hyperparameters(train_batch_tokens=1000), 1)
    with pytest.raises(SystemExit, match="GRAD_ACCUM_STEPS"):
        tg.derive_grad_accum_steps(tg.Hyperparameters(grad_accum_steps=5), 1)


def test_training_clock_extrapolates_between_syncs_and_syncs_every_step_near_the_budget(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(tg.time, "perf_counter", lambda: now[0])
    clock = tg.TrainingClock(budget_ms=1000.0, sync_every=10, runtime=tg.Runtime())
    clock.start()
    assert not clock.due(5) and clock.due(10)
    now[0] += 0.2  # 10 steps of 20 ms
    assert clock.measure(10) == pytest.approx(200.0)
    assert clock.estimate(15) == pytest.approx(300.0)  # extrapolated, no sync
    assert not clock.due(15)
    clock.pause()
    now[0] += 5.0  # an evaluation: not training time
    clock.resume()
    now[0] += 0.6  # 30 more steps of 20 ms
    assert clock.measure(40) == pytest.approx(800.0)
    assert clock.due(41)  # 41 + 10 steps would pass 1000 ms: sync every step now
    assert clock.estimate(50) == pytest.approx(1000.0)


def test_residual_stream_dtype_follows_the_switch():
    """RESIDUAL_BF16: every block reads a bfloat16 stream under autocast; without it (and always on the CPU
    paths that main() sets up) the stream stays float32, so CPU numbers are unchanged."""
    h = tiny_hparams(residual_bf16=True)
    torch.manual_seed(0)
    model = tg.GPT(h)
    cuda = torch.device("cuda")  # use_device_paths reads only the device's type: no GPU needed
    for on in (True, False):
        switches = dataclasses.replace(h, residual_bf16=on, fused_ce=on, fused_mlp=on, attn_cudnn=False)
        tg.use_device_paths(model, switches, cuda)
        assert model.residual_dtype == (torch.bfloat16 if on else None)
        fused = on and tg.triton is not None
        assert model.fused_ce == fused and all(m.fused == fused for m in model.modules() if isinstance(m, tg.MLP))
    tg.use_device_paths(model, h, torch.device("cpu"))
    assert model.residual_dtype is None and not model.fused_ce
    idx = torch.randint(0, 97, (2, 16))
    for residual_dtype, expected in ((None, torch.float32), (torch.bfloat16, torch.bfloat16)):
        model.residual_dtype = residual_dtype
        seen = []
        handles = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype)) for b in model.blocks]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, idx)
        for handle in handles:
            handle.remove()
        assert seen == [expected] * len(model.blocks)
        assert torch.isfinite(loss)


class _FixedBatches:
    """A loader that hands out the given (x, y) batches in order."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def next_batch(self, tokens: int, seq_len: int):
        return next(self.batches)


def _two_rank_case(**features):
    """A small model with the default features on but recurrence (and the given ones), and 2 steps × 2 ranks × 2
    micro-steps of batches: step s, rank r, micro-step m takes batch 4s + 2r + m."""
    h = tg.Hyperparameters(vocab_size=97, num_layers=5, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8,
                           train_seq_len=16, train_batch_tokens=8 * 16, parallel_residual_start=3,
                           grad_clip_norm=0.05, **{"num_loops": 0, **features})
    g = torch.Generator().manual_seed(7)
    tokens = [torch.randint(0, h.vocab_size, (2, h.train_seq_len + 1), generator=g) for _ in range(8)]
    return h, [(t[:, :-1], t[:, 1:]) for t in tokens]


def _two_rank_worker(rank: int, features: dict, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    h, batches = _two_rank_case(**features)
    torch.manual_seed(0)
    model = tg.GPT(h)
    runtime = tg.Runtime(rank, 2)
    optimizers = tg.build_optimizers(model, h, runtime)
    loader = _FixedBatches([b for i, b in enumerate(batches) if (i // 2) % 2 == rank])
    for _ in range(2):
        tg.train_step(model, model, optimizers, loader, h, 2, runtime)
    torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("features", [{}, {"num_loops": 1, "loop_start": 1, "loop_end": 2, "loop_enable_frac": 0.0,
                                            "parallel_residual_lanes": 2}])
def test_training_steps_on_two_ranks_equal_one_process(tmp_path, features):
    """train_step on 2 gloo ranks with 2 micro-steps each (reduce-scatter, all-reduce, global clip active,
    all-gather) against 1 process taking all 4 micro-batches of each step, on the model itself."""
    torch.multiprocessing.spawn(_two_rank_worker, args=(features, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                                join=True)
    h, batches = _two_rank_case(**features)
    torch.manual_seed(0)
    model = tg.GPT(h)
    initial = [p.detach().clone() for p in model.parameters()]
    optimizers = tg.build_optimizers(model, h, tg.Runtime())
    loader = _FixedBatches(batches)
    for _ in range(2):
        tg.train_step(model, model, optimizers, loader, h, 4, tg.Runtime())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for expected, q, p0 in zip(model.parameters(), got, initial):
            assert not torch.equal(expected.detach(), p0)  # every parameter trained
            assert torch.allclose(expected.detach(), q, atol=2e-5), (expected.detach() - q).abs().max()
