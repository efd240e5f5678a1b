"""GPTQ on SDClip's grid (QUANT_METHOD=gptq) and on absmax's (QUANT_GRID=absmax): better layer outputs than round-to-nearest on correlated inputs,
the same integers where inputs are uncorrelated, the same scales and artifact layout, act-order undone, and
Hessians collected through hooks equal to XᵀX computed directly."""
import dataclasses
import os
import re
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import ARCH_OFF, REPO, run_script

SCRIPT = os.path.join(REPO, "train_gpt.py")
QMAX6 = 31


def correlated_layer(seed: int = 0, tokens: int = 4096, cols: int = 96, rows: int = 64):
    """(X, W): inputs X = Z·A with a random mixing A plus a shared direction, so XᵀX is far from diagonal;
    W with heavy-tailed (Student-t) entries and rows of different spreads, as training leaves them."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    mixing = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    mixing += 0.5 * torch.randn(1, cols, generator=g, dtype=torch.float64)
    x = z @ mixing
    t = torch.distributions.StudentT(3.0).sample((rows, cols)).double()
    w = 0.02 * t * torch.rand(rows, 1, generator=g, dtype=torch.float64).add(0.5)
    return x, w


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
    return (x @ (w - q.double() * scale.double()[:, None]).T).norm().item()


def test_gptq_output_error_is_well_below_round_to_nearest_with_the_same_scales():
    torch.manual_seed(0)
    x, w = correlated_layer()
    hessian = x.T @ x  # the premise: inputs correlated enough that GPTQ has something to exploit
    assert (hessian - torch.diag(hessian.diagonal())).norm() > hessian.diagonal().norm()
    scale = tg.sdclip_scale(w, 6, 12.85)
    q_rtn, rtn_scale = tg.quantize_per_row(w, 6, 12.85)
    assert torch.equal(rtn_scale, scale)
    # block 32 < 96 columns: the lazy update from one block to the later ones is exercised
    q = tg.gptq_quantize(w, hessian.float(), scale, QMAX6, damp=0.01, block=32)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert output_error(x, w, q, scale) < 0.8 * output_error(x, w, q_rtn, scale)


def test_block_size_does_not_change_the_result():
    """Lazy batch updates are an exact rearrangement of the column-by-column algorithm."""
    torch.manual_seed(1)
    x, w = correlated_layer(seed=1)
    hessian, scale = (x.T @ x).float(), tg.sdclip_scale(w, 6, 12.85)
    q_one_block = tg.gptq_quantize(w, hessian, scale, QMAX6, block=96)
    for block in (1, 16, 40):
        q = tg.gptq_quantize(w, hessian, scale, QMAX6, block=block)
        assert (q == q_one_block).float().mean() > 0.995, block  # float rounding may flip a rare tie


def test_identity_hessian_gives_round_to_nearest_exactly():
    """Uncorrelated inputs of equal power: no error is spread, so GPTQ must store RTN's integers, including
    clipped values (a low clip sigma clips many) and a constant row (step 0: stored as zeros)."""
    torch.manual_seed(2)
    w = torch.distributions.StudentT(2.0).sample((48, 80)) * 0.03
    w[5] = 0.7  # constant row: std 0
    for bits, clip_sigmas in ((6, 12.85), (6, 2.0), (5, 3.0)):
        q_rtn, scale = tg.quantize_per_row(w, bits, clip_sigmas)
        qmax = 2 ** (bits - 1) - 1
        q = tg.gptq_quantize(w, torch.eye(80), scale, qmax, damp=0.01, block=32)
        assert torch.equal(q, q_rtn), (bits, clip_sigmas)
        assert torch.all(q[5] == 0)
    assert (q_rtn.abs() == qmax).sum() > 50  # the clipping branch was really taken


def test_dead_inputs_are_rounded_plainly_and_give_no_nan():
    torch.manual_seed(3)
    x, w = correlated_layer(seed=3, cols=64)
    x[:, [3, 17]] = 0  # inputs that never fire: zero rows and columns in XᵀX
    scale = tg.sdclip_scale(w, 6, 12.85)
    q_rtn, _ = tg.quantize_per_row(w, 6, 12.85)
    for damp in (0.01, 0.0):  # undamped, a dead input would make XᵀX singular and its Cholesky fail
        q = tg.gptq_quantize(w, (x.T @ x).float(), scale, QMAX6, damp=damp, block=16)
        assert torch.equal(q[:, [3, 17]], q_rtn[:, [3, 17]])
        assert output_error(x, w, q, scale) < 0.8 * output_error(x, w, q_rtn, scale)


def test_damping_is_relative_to_the_mean_diagonal():
    """XᵀX summed over more tokens (or in other units) is the same problem: scaling H by a power of two,
    exactly representable, must not change a single integer; an absolute damping would."""
    torch.manual_seed(6)
    x, w = correlated_layer(seed=6, tokens=512)
    hessian, scale = (x.T @ x).float(), tg.sdclip_scale(w, 6, 12.85)
    q = tg.gptq_quantize(w, hessian, scale, QMAX6, damp=0.01, block=32)
    for factor in (2.0 ** -20, 2.0 ** 20):
        assert torch.equal(tg.gptq_quantize(w, hessian * factor, scale, QMAX6, damp=0.01, block=32), q)
    assert not torch.equal(tg.gptq_quantize(w, hessian, scale, QMAX6, damp=1.0, block=32), q)  # damping matters


def test_act_order_permutation_is_undone():
    """Shuffling W's columns and X's features the same way shuffles the stored integers the same way."""
    torch.manual_seed(4)
    x, w = correlated_layer(seed=4)
    hessian = (x.T @ x).float()
    assert hessian.diagonal().unique().numel() == hessian.size(0)  # no ties: the processing order is defined
    scale = tg.sdclip_scale(w, 6, 12.85)
    q = tg.gptq_quantize(w, hessian, scale, QMAX6, block=32)
    perm = torch.randperm(w.size(1))
    q_shuffled = tg.gptq_quantize(w[:, perm], hessian[perm][:, perm], tg.sdclip_scale(w[:, perm], 6, 12.85),
                                  QMAX6, block=32)
    assert torch.equal(q_shuffled, q[:, perm])
    # and the integers sit on their own columns: each is within a few steps of its weight
    assert (q.double() * scale.double()[:, None] - w).abs().div(scale.double()[:, None]).median() < 1.0


# --------------------------------------------------------------------------------------------------
# Hessians from the model, and the state dict quantized with them
# --------------------------------------------------------------------------------------------------

def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    settings = dict(vocab_size=97, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4,
                    float_max_numel=256, **ARCH_OFF)
    settings.update(overrides)
    h = tg.Hyperparameters(**settings)
    model = tg.GPT(h)
    with torch.no_grad():
        for p in model.parameters():  # trained-like: no zero-initialised projections, heavy tails
            p.copy_(torch.distributions.StudentT(4.0).sample(p.shape) * 0.1)
    return h, model


def test_hessians_through_hooks_equal_direct_xtx_of_each_linear_input():
    h, model = tiny_model()
    batches = [torch.randint(0, h.vocab_size, (3, 16)) for _ in range(2)]
    model.train()
    hessians = tg.collect_hessians(model, iter(batches), torch.device("cpu"))
    assert model.training  # mode restored
    linears = {f"blocks.{n}.weight": m for n, m in model.blocks.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(hessians) == set(linears) | {"tok_emb.weight"}
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed

    # direct: record every Linear's input by wrapping its forward (no hooks), sum XᵀX in float64
    direct = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}
    direct["tok_emb.weight"] = torch.zeros(h.model_dim, h.model_dim, dtype=torch.float64)
    for name, m in linears.items():
        def recording(x, m=m, name=name):
            flat = x.detach().reshape(-1, x.size(-1)).double()
            direct[name] += flat.T @ flat
            return torch.nn.functional.linear(x, m.weight)
        m.forward = recording
    with torch.no_grad():
        for x in batches:
            hidden = model.hidden(x).reshape(-1, h.model_dim).double()
            direct["tok_emb.weight"] += hidden.T @ hidden
    # by hand, without the model's forward: the first block's attention reads its resid_mix of x = x0 =
    # rms_norm(embedding), normed, scaled
    mix = model.blocks[0].resid_mix.detach()
    with torch.no_grad():
        x0 = [tg.rms_norm(model.tok_emb(x)) for x in batches]
        attn_in = [(tg.rms_norm(mix[0] * x + mix[1] * x) * model.blocks[0].norm_scale).reshape(-1, h.model_dim)
                   for x in x0]
    hand = sum(a.double().T @ a.double() for a in attn_in)
    for proj in ("q", "k", "v"):
        assert torch.allclose(hand, direct[f"blocks.0.attn.{proj}.weight"], rtol=1e-6, atol=1e-6)
    for name, expected in direct.items():
        got = hessians[name].double()
        assert hessians[name].dtype == torch.float32
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()), name
    # the head's Hessian is not an attention input's: the embedding really gets the final hidden states
    assert not torch.allclose(hessians["tok_emb.weight"], hessians["blocks.0.attn.q.weight"], rtol=1e-2)


def test_gptq_state_dict_keeps_scales_layout_and_qmax():
    h, model = tiny_model(seed=5, embed_bits=5, clip_sigmas_mlp=3.0, clip_sigmas_attn=3.0, clip_sigmas_embed=3.0)
    batches = [torch.randint(0, h.vocab_size, (4, 32)) for _ in range(3)]
    hessians = tg.collect_hessians(model, iter(batches), torch.device("cpu"))
    state = model.state_dict()
    rtn = tg.quantize_state_dict(state, h)
    gptq = tg.quantize_state_dict(state, h, hessians)
    assert list(gptq) == list(rtn)
    ints = [n for n, e in gptq.items() if e["kind"] == "int"]
    assert "tok_emb.weight" in ints and "blocks.0.mlp.down.weight" in ints and "blocks.1.attn.q.weight" in ints
    for name, e in gptq.items():
        assert e["kind"] == rtn[name]["kind"]
        if e["kind"] != "int":
            assert torch.equal(e["data"], rtn[name]["data"])
            continue
        qmax = 2 ** (e["bits"] - 1) - 1
        assert e["bits"] == (h.embed_bits if name == "tok_emb.weight" else h.matrix_bits)
        assert torch.equal(e["scale"], rtn[name]["scale"]), name  # SDClip's scales, fixed before GPTQ
        assert e["q"].dtype == torch.int8 and e["q"].abs().max() <= qmax, name
        assert (e["q"].abs() == qmax).any(), name  # low clip sigmas: the ±qmax clamp is really in use
        assert (e["q"] != rtn[name]["q"]).float().mean() > 0.01, name  # GPTQ really changed the integers
    # same artifact layout: the same index and payload length, only the integers differ; the round trip is exact
    payload, payload_rtn = tg.serialize_quantized(gptq), tg.serialize_quantized(rtn)
    assert len(payload) == len(payload_rtn)
    meta_len = int.from_bytes(payload[:4], "little")
    assert payload[:4 + meta_len] == payload_rtn[:4 + meta_len]
    restored = tg.deserialize_quantized(tg.decompress_artifact(tg.compress_artifact(payload, quality=5)))
    for name in ints:
        assert torch.equal(restored[name]["q"], gptq[name]["q"]) and torch.equal(restored[name]["scale"], gptq[name]["scale"])
    # and better layer outputs on the calibration inputs for the head, measured on its own hidden states
    with torch.no_grad():
        hidden = torch.cat([model.hidden(x).reshape(-1, h.model_dim) for x in batches]).double()
    w = state["tok_emb.weight"].double()
    errors = {k: output_error(hidden, w, d["tok_emb.weight"]["q"], d["tok_emb.weight"]["scale"])
              for k, d in (("rtn", rtn), ("gptq", gptq))}
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


def test_absmax_grid_clips_nothing_and_is_finer_than_sdclip():
    """QUANT_GRID=absmax: every value within half a step of its reconstruction (no clipping), each non-zero row
    reaching ±qmax, a zero row stored as 0, and GPTQ on that grid still beating round-to-nearest."""
    x, w = correlated_layer(seed=3)
    w[5] = 0.0
    for bits in (5, 6, 8):
        qmax = 2 ** (bits - 1) - 1
        q, scale = tg.quantize_per_row(w, bits, 12.85, "absmax")
        assert scale.dtype == torch.float16 and torch.equal(scale, tg.absmax_scale(w, bits))
        step = scale.double()[:, None]
        error = (w - q.double() * step).abs()
        assert (error <= step / 2 + 1e-12).all() and (error[5] == 0).all() and (q[5] == 0).all()
        live = torch.arange(w.size(0)) != 5
        assert (q[live].abs().amax(1) == qmax).all()
        # heavy tails: SDClip's step is coarser (and clips), absmax's rows keep their extremes
        sd_q, sd_scale = tg.quantize_per_row(w, bits, 12.85)
        assert (scale[live].float() < sd_scale[live].float()).float().mean() > 0.5
        q_gptq = tg.gptq_quantize(w, (x.T @ x).float(), scale, qmax)
        assert q_gptq.abs().max() <= qmax
        assert output_error(x, w, q_gptq, scale) < 0.8 * output_error(x, w, q, scale)
    # a maximum that float16 rounds down still lands on ±qmax, not past it
    row = torch.tensor([[0.0, 1.0001 * 31, -3.0]])
    q, scale = tg.quantize_per_row(row, 6, 12.85, "absmax")
    assert q.abs().max() == QMAX6 and scale.float() * QMAX6 >= row.abs().max()


def test_bad_quant_grid_is_refused_before_training(monkeypatch):
    monkeypatch.setenv("QUANT_GRID", "minmax")
    with pytest.raises(SystemExit, match="QUANT_GRID=.minmax. is unknown: use one of sdclip, absmax"):
        tg.main()


def test_calibration_reads_training_shards_only_and_splits_them_between_ranks(tmp_path):
    rng = np.random.default_rng(0)
    tg.write_shard(str(tmp_path / "fineweb_train_000000.bin"), rng.integers(10, 20, 5000))
    tg.write_shard(str(tmp_path / "fineweb_val_000000.bin"), rng.integers(50, 60, 5000))
    h = tg.Hyperparameters(data_path=str(tmp_path), train_batch_tokens=640, train_seq_len=32, gptq_calibration_batches=3)
    single = list(tg.calibration_batches(h, tg.Runtime()))
    assert all(x.size(0) <= tg.GPTQ_MICRO_BATCH_SEQS and x.size(1) == 32 for x in single)
    tokens = torch.cat([x.reshape(-1) for x in single])
    assert tokens.numel() == 3 * 640 and tokens.min() >= 10 and tokens.max() < 20  # never validation tokens
    train = torch.from_numpy(tg.read_shard(str(tmp_path / "fineweb_train_000000.bin")).astype(np.int64))
    assert torch.equal(tokens[:640], train[:640])  # from the start of the training stream
    # two ranks: each its own slice of every batch (a span of 320 inputs + 1 target token per rank)
    ranks = [torch.cat([x.reshape(-1) for x in tg.calibration_batches(h, tg.Runtime(r, 2))]) for r in range(2)]
    assert ranks[0].numel() == ranks[1].numel() == 3 * 320
    assert torch.equal(ranks[0][:320], train[:320]) and torch.equal(ranks[1][:320], train[321:641])


def test_smoke_run_with_gptq_completes_and_scores_the_round_trip(tmp_path):
    env = {"QUANT_METHOD": "gptq", "ITERATIONS": "5", "GPTQ_CALIBRATION_BATCHES": "2", "FLOAT_MAX_NUMEL": "4096",
           "BROTLI_QUALITY": "5", "VAL_TOKENS_LIMIT": "2048", "TRAIN_LOG_EVERY": "1", "RUN_ID": "gptq"}
    out = run_script([sys.executable, SCRIPT], env, str(tmp_path))
    assert "quant_method=gptq" in out.splitlines()[0]
    assert re.search(r"^gptq_hessians:2 batches time:[\d.]+s$", out, re.M)
    train_ms = float(re.findall(r"^step:5/5 train_loss:[\d.]+ train_time:(\d+)ms", out, re.M)[-1])
    total_ms = float(re.search(r"^train_plus_calibration_time:(\d+)ms budget:300000ms$", out, re.M).group(1))
    assert total_ms >= train_ms
    assert re.search(r"^gptq_quantize_time:[\d.]+s$", out, re.M)
    last = out.strip().splitlines()[-1]
    match = re.match(r"^final_int6_rans_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)$", last)
    assert match, last
    pre_quant = float(re.search(r"pre_quant_ema step:5 val_loss:[\d.]+ val_bpb:([\d.]+)", out).group(1))
    assert abs(float(match.group(2)) - pre_quant) < 0.05
    assert os.path.getsize(tmp_path / tg.ARTIFACT_NAME) == int(
        re.search(r"Serialized model int6\+rans: (\d+) bytes", out).group(1))


def _two_rank_worker(rank: int, data_path: str, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    h, model = tiny_model(vocab_size=64)
    h.data_path, h.train_batch_tokens, h.train_seq_len, h.gptq_calibration_batches = data_path, 512, 32, 2
    cpu = torch.device("cpu")
    own = tg.collect_hessians(model, tg.calibration_batches(h, tg.Runtime(rank, 2)), cpu)
    torch.save(own, os.path.join(out_dir, f"own{rank}.pt"))
    tg.all_reduce_sum(own, 2)
    torch.save(own, os.path.join(out_dir, f"summed{rank}.pt"))
    h.quant_reserve_seconds = 4.0  # rank 1's calibration is the slow one: both reserve its time
    reserve = tg.quant_reserve_seconds(h, 10.0 if rank else 1.0, tg.Runtime(rank, 2))
    torch.save(reserve, os.path.join(out_dir, f"reserve{rank}.pt"))
    dist.destroy_process_group()


def test_hessians_are_summed_across_ranks(tmp_path):
    import socket
    import torch.multiprocessing as mp
    tg.write_shard(str(tmp_path / "fineweb_train_000000.bin"), np.random.default_rng(1).integers(0, 64, 4000))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(str(tmp_path), port, str(tmp_path)), nprocs=2)
    own = [torch.load(tmp_path / f"own{r}.pt") for r in range(2)]
    summed = [torch.load(tmp_path / f"summed{r}.pt") for r in range(2)]
    assert set(own[0]) == set(summed[0]) and "tok_emb.weight" in own[0]
    assert [torch.load(tmp_path / f"reserve{r}.pt") for r in range(2)] == [12.5, 12.5]
    for name in own[0]:
        assert not torch.allclose(own[0][name], own[1][name])  # each rank saw its own tokens
        expected = own[0][name] + own[1][name]
        for r in range(2):
            assert torch.allclose(summed[r][name], expected, rtol=1e-5, atol=1e-4), (name, r)


def test_the_warm_up_times_one_calibration_piece_and_scales_it_to_every_piece(monkeypatch):
    h, model = tiny_model(vocab_size=1024)
    h.data_path, h.train_seq_len, h.train_batch_tokens = os.path.join(REPO, "data", "sample"), 64, 20 * 64
    forwards, clock = [], iter([10.0, 10.5])  # the timed forward: 0.5 s
    monkeypatch.setattr(tg, "collect_hessians", lambda m, batches, device: forwards.append([x.shape for x in batches]))
    monkeypatch.setattr(tg.time, "perf_counter", lambda: next(clock))
    loader = tg.DistributedTokenLoader(h.data_path, tg.Runtime())
    estimate = tg.warm_up_calibration(model, loader, h, tg.Runtime())
    assert forwards == [[torch.Size([tg.GPTQ_MICRO_BATCH_SEQS, 64])]] * 2  # built, then timed
    # 20 sequences a batch are 3 pieces of at most 8: 16 batches, 48 pieces
    assert estimate == 0.5 * h.gptq_calibration_batches * 3
    assert tg.warm_up_calibration(model, loader, dataclasses.replace(h, quant_method="rtn"), tg.Runtime()) == 0.0


def test_the_quantization_reserve_is_the_setting_or_the_calibrations_estimate_with_a_margin():
    h = tg.Hyperparameters(quant_reserve_seconds=4.0)
    assert tg.quant_reserve_seconds(h, 0.0, tg.Runtime()) == 4.0  # nothing measured
    assert tg.quant_reserve_seconds(h, 3.0, tg.Runtime()) == 4.0  # 3.75 s fits the setting
    assert tg.quant_reserve_seconds(h, 8.0, tg.Runtime()) == 8.0 * tg.CALIBRATION_MARGIN


@pytest.mark.parametrize("reserve_s, steps", [(None, 3), (1000.0, 1)])
def test_training_stops_the_reserve_before_the_wall_clock_cap(reserve_s, steps):
    from conftest import sample_hparams
    h = dataclasses.replace(sample_hparams(iterations=3, quant_reserve_seconds=4.0), max_wallclock_seconds=1000.0)
    torch.manual_seed(0)
    model = tg.GPT(h)
    optimizers = tg.build_optimizers(model, h, tg.Runtime())
    lines = []
    done, _ = torch.enable_grad()(tg.train)(model, model, optimizers, tg.EMA(model, h.ema_decay), h, 1, tg.Runtime(),
                                            lines.append, None, reserve_s)
    assert done == steps
    assert any(line.startswith("stopping_early") for line in lines) == (steps < 3)
