"""Test-time training at evaluation (TTT_MODE=sgd|lora): score first, proved by replaying the traced model states;
every target scored once with the byte total of the set; documents independent in LoRA mode; LR 0 gives the
plain score; 2 gloo ranks equal 1 process; TTT_EVAL_ONLY on a saved smoke artifact; the time guard."""
import dataclasses
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import train_gpt as tg
from conftest import PROXY, REPO, run_script

import logparse

CPU = torch.device("cpu")
SCRIPT = os.path.join(REPO, "train_gpt.py")
TINY = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=4, eval_seq_len=16,
            eval_stride=4, eval_batch_seqs=3, ttt_chunk_tokens=22, ttt_chunk=5, ttt_batch_docs=3, ttt_lora_rank=4,
            ttt_lora_alpha=8.0, ttt_phase_docs="3,6", ttt_lr=0.05, ttt_lora_lr=0.01, ttt_phase_lr=0.02, ttt_epochs=2,
            compile=False, ttt_log_every=1000, ttt_width_step=4, **PROXY)
# Sliding-window attention and the partial key offset change what a window computes: the replay and LR-0 tests also
# run with both on, so TTT's windows (clipped at documents, padded, growing) score as the document alone does.
FEATURES = {"core": {}, "window_offset": dict(attn_window=5, key_offset_dims=6)}


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: a second thread only waits on the first (and on a busy machine, much longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_h(**overrides) -> tg.Hyperparameters:
    return tg.Hyperparameters(**{**TINY, **overrides})


def tiny_model(h: tg.Hyperparameters) -> tg.GPT:
    torch.manual_seed(0)
    model = tg.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # the zero-initialised projections too: every adapter matters
    return model


def tiny_stream(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and per-target bytes. "docs": 4 tokens before the first BOS, a 40-token document (longer than the
    16-token context), single-token documents (a BOS right before the next BOS), a final BOS as the last target.
    "plain": 53 tokens and no BOS at all: one document, longer than the context, chunks that do not divide it."""
    rng = np.random.default_rng(1)
    if kind == "plain":
        stream = list(rng.integers(2, 64, 53))
    else:
        stream = list(rng.integers(2, 64, 4))
        for length in (7, 1, 40, 12, 3, 25, 9, 1, 18, 5):
            stream += [tg.BOS_ID] + list(rng.integers(2, 64, length - 1))
        stream += [tg.BOS_ID]
    tokens = np.array(stream, dtype=np.uint16)
    return tokens, rng.integers(0, 5, tokens.size - 1)


def run_ttt(mode, model, tokens, target_bytes, h, trace=None, log=None, clock=None, rank=0, world_size=1):
    """evaluate_with_ttt in TTT_MODE=`mode` on the model itself (uncompiled), its time counted from now."""
    clock = clock or tg.time.perf_counter
    return tg.evaluate_with_ttt(model, model.token_losses, model, tg.ValidationData(tokens, target_bytes),
                                dataclasses.replace(h, ttt_mode=mode), tg.Runtime(rank, world_size),
                                log or (lambda line: None), clock(), clock=clock, trace=trace)


def plain_score(model, tokens, target_bytes, h):
    """The sliding-window score without TTT."""
    return tg.evaluate_bpb(model.token_losses, tg.ValidationData(tokens, target_bytes), h, tg.Runtime())


class Recorder:
    """Every trace event, with a copy of the state at that moment: the model's weights and, in LoRA mode, the
    adapters. Log lines (when passed as `log`) are kept in the same sequence."""

    def __init__(self, model):
        self.model, self.events = model, []

    def __call__(self, kind, index, losses, lora):
        weights = [p.detach().clone() for p in self.model.parameters()]
        adapters = [t.detach().clone() for t in lora.A + lora.B] if lora is not None else None
        self.events.append((kind, index.clone(), None if losses is None else losses.clone(), weights, adapters))

    def log(self, line):
        self.events.append(("log", line, None, None, None))

    def scored_targets(self) -> np.ndarray:
        return np.concatenate([e[1][e[1] >= 0].numpy() for e in self.events if e[0] == "score"])

    def updates(self) -> int:
        return sum(e[0] == "update" for e in self.events)


def check_score_first(rec: Recorder, num_targets: int, tokens: np.ndarray | None = None) -> None:
    """Every target scored exactly once, and every update follows only targets scored before it. With the tokens,
    also: when a target is scored, no update so far has used it or any later target of its document."""
    assert np.array_equal(np.sort(rec.scored_targets()), np.arange(num_targets))
    seen, applied = np.zeros(num_targets, dtype=bool), np.zeros(num_targets, dtype=bool)
    doc_end = None
    if tokens is not None:
        starts, lengths = tg.document_spans(tokens)
        doc_end = np.repeat(starts + lengths, lengths)  # per target: the end of its document
    for kind, index, *_ in rec.events:
        if kind == "log":
            continue
        targets = index[index >= 0].numpy()
        if kind == "score":
            seen[targets] = True
            if doc_end is not None:
                applied_after = np.concatenate(([0], np.cumsum(applied)))  # applied_after[b] − [a]: used in [a, b)
                assert not (applied_after[doc_end[targets]] - applied_after[targets]).any(), \
                    "a target was scored after an update had used it or a later target of its document"
        elif kind == "update":
            assert seen[targets].all(), "an update used a target before it was scored"
            applied[targets] = True


def check_totals(rec: Recorder, result, target_bytes) -> None:
    total = sum(e[2][e[1] >= 0].sum().item() for e in rec.events if e[0] == "score")
    assert result[0] == pytest.approx(total / target_bytes.size, rel=1e-12)
    assert result[1] == pytest.approx(total / math.log(2) / target_bytes.sum(), rel=1e-12)


def plain_losses(model, weights, tokens, start, end) -> torch.Tensor:
    """Losses of targets start..end-1 from one forward over tokens[start:end] with the given weights."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in model.parameters()]
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
        t = torch.from_numpy(tokens.astype(np.int64))
        out = model.token_losses(t[None, start:end], t[None, start + 1:end + 1])[0].double()
        for p, w in zip(model.parameters(), saved):
            p.copy_(w)
    return out


def lora_reference_losses(model, weights, adapters, row, scale, tokens, start, end) -> torch.Tensor:
    """One document's losses under the base weights plus row `row` of each adapter, computed one layer at a time
    with plain matrices: no batching, no padding, no masks."""
    half = len(adapters) // 2
    a, b = [t[row] for t in adapters[:half]], [t[row] for t in adapters[half:]]
    saved = [p.detach().clone() for p in model.parameters()]
    try:
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.copy_(w)
            return lora_losses_with_grad(model, a, b, scale, tokens, start, end)
    finally:
        with torch.no_grad():
            for p, w in zip(model.parameters(), saved):
                p.copy_(w)


def doc_window(starts, lengths, h, first_target):
    """The document of a chunk's first scored target, and the chunk's window [start, end) of input positions:
    the ≤ EVAL_SEQ_LEN tokens of the document up to the chunk's end."""
    d = int(np.searchsorted(starts, first_target, side="right") - 1)
    chunk_end = ((first_target - starts[d]) // h.ttt_chunk + 1) * h.ttt_chunk
    return starts[d] + max(0, chunk_end - h.eval_seq_len), starts[d] + min(chunk_end, lengths[d])


@pytest.mark.parametrize("features", sorted(FEATURES))
@pytest.mark.parametrize("kind", ["docs", "plain"])
def test_sgd_scores_first_by_replay(kind, features):
    """Each recorded loss is the loss, recomputed from scratch, of the weights at the moment of scoring; those
    weights are the ones the next update starts from (nothing changes them unseen); every target is scored once,
    before any update that uses it; the totals are the exact sums over the whole set."""
    h = tiny_h(**FEATURES[features])
    tokens, target_bytes = tiny_stream(kind)
    model = tiny_model(h)
    initial = [p.detach().clone() for p in model.parameters()]
    rec = Recorder(model)
    result = run_ttt("sgd", model, tokens, target_bytes, h, trace=rec)
    check_score_first(rec, tokens.size - 1, tokens)
    check_totals(rec, result, target_bytes)
    assert rec.updates() > 2 and any(not torch.equal(a, b) for a, b in zip(initial, model.parameters()))
    scratch = tiny_model(h)
    for n, (kind_, index, losses, weights, _) in enumerate(rec.events):
        if kind_ == "update" and rec.events[n - 1][0] == "score":
            assert all(torch.equal(a, b) for a, b in zip(weights, rec.events[n - 1][3]))
        if kind_ != "score":
            continue
        for row in range(index.size(0)):
            keep = index[row] >= 0
            if not keep.any():  # a padding row: nothing scored
                continue
            end = int(index[row].max()) + 1
            replay = plain_losses(scratch, weights, tokens, end - index.size(1), end)
            assert torch.allclose(replay[keep], losses[row][keep], rtol=0, atol=1e-5)
    plain = plain_score(tiny_model(h), tokens, target_bytes, h)
    assert abs(result[1] - plain[1]) > 1e-4  # it did adapt


@pytest.mark.parametrize("features", sorted(FEATURES))
@pytest.mark.parametrize("kind", ["docs", "plain"])
def test_lora_scores_first_by_replay(kind, features):
    """The same for LoRA TTT and its global phases: each recorded loss equals a from-scratch, one-document
    computation with the base weights and that document's adapters at the moment of scoring, in a window of the
    document's own ≤ EVAL_SEQ_LEN tokens up to the chunk's end."""
    h = tiny_h(**FEATURES[features])
    tokens, target_bytes = tiny_stream(kind)
    starts, lengths = tg.document_spans(tokens)
    model = tiny_model(h)
    rec = Recorder(model)
    log_lines = []
    result = run_ttt("lora", model, tokens, target_bytes, h, trace=rec, log=log_lines.append)
    check_score_first(rec, tokens.size - 1, tokens)
    check_totals(rec, result, target_bytes)
    assert rec.updates() > 5 and sum(l.startswith("ttt_phase:") for l in log_lines) == (2 if kind == "docs" else 0)
    scale = h.ttt_lora_alpha / h.ttt_lora_rank
    scratch = tiny_model(h)
    for kind_, index, losses, weights, adapters in rec.events:
        if kind_ != "score":
            continue
        for row in range(index.size(0)):
            keep = index[row] >= 0
            if keep.any():
                targets = index[row][keep]
                start, end = doc_window(starts, lengths, h, int(targets[0]))
                assert int(targets[-1]) == end - 1
                replay = lora_reference_losses(scratch, weights, adapters, row, scale, tokens, start, end)
                assert torch.allclose(replay[-len(targets):], losses[row][keep], rtol=0, atol=1e-5)
    # after each phase the adapters start fresh: the next scoring pass sees A as initialised and B = 0
    initial_a = [a.clone() for a in tg.BatchedLoRA(tiny_model(h), h, CPU).A]
    after_phase = [n for n, e in enumerate(rec.events) if e[0] == "update" and e[4] is None]
    firsts = {next(n for n in range(p, len(rec.events)) if rec.events[n][0] == "score")
              for p in after_phase if any(e[0] == "score" for e in rec.events[p:])}
    assert len(firsts) == (2 if kind == "docs" else 0)
    for n in firsts:
        adapters = rec.events[n][4]
        assert all(torch.equal(a, a0) for a, a0 in zip(adapters[:len(initial_a)], initial_a))
        assert not any(b.any() for b in adapters[len(initial_a):])
    assert not any(p.requires_grad is False for p in model.parameters())  # handed back trainable, hooks gone
    assert all(not m._forward_hooks for m in model.modules())


def test_lora_documents_in_a_batch_are_independent():
    """Changing one document's tokens changes its own scores and no other score in its batch (adapters are per
    document, windows hold one document); later batches may differ (A carries over, as the protocol says)."""
    h = tiny_h(ttt_phase_docs="", ttt_batch_docs=4)
    tokens, target_bytes = tiny_stream("docs")
    starts, lengths = tg.document_spans(tokens)
    order = sorted(range(len(starts)), key=lambda d: (-lengths[d], d))
    first_batch, changed = order[:4], order[1]
    changed_tokens = tokens.copy()
    span = slice(starts[changed] + 1, starts[changed] + lengths[changed])  # keep its BOS and the next BOS
    changed_tokens[span] = (changed_tokens[span] - 2 + 7) % 62 + 2

    def per_target(stream):
        rec = Recorder(tiny_model(h))
        run_ttt("lora", rec.model, stream, target_bytes, h, trace=rec)
        out = np.zeros(stream.size - 1)
        for kind, index, losses, *_ in rec.events:
            if kind == "score":
                keep = index >= 0
                out[index[keep].numpy()] = losses[keep].numpy()
        return out

    a, b = per_target(tokens), per_target(changed_tokens)
    for d in first_batch:
        same = np.array_equal(a[starts[d]:starts[d] + lengths[d]], b[starts[d]:starts[d] + lengths[d]])
        assert same == (d != changed), d


@pytest.mark.parametrize("features", sorted(FEATURES))
def test_lr_zero_equals_the_plain_score(features):
    """SGD at LR 0 gives the plain sliding-window score; LoRA and its phases at LR 0 give the plain per-document
    score (each chunk in a window of its document's ≤ EVAL_SEQ_LEN tokens), to float32 rounding."""
    tokens, target_bytes = tiny_stream("docs")
    h = tiny_h(ttt_lr=0.0, ttt_lora_lr=0.0, ttt_phase_lr=0.0, **FEATURES[features])
    model = tiny_model(h)
    plain = plain_score(model, tokens, target_bytes, h)
    assert run_ttt("sgd", model, tokens, target_bytes, h) == pytest.approx(plain, rel=1e-12)

    starts, lengths = tg.document_spans(tokens)
    total = 0.0
    for s, n in zip(starts, lengths):
        for c in range(0, n, h.ttt_chunk):
            start, end = doc_window(starts, lengths, h, s + c)
            total += plain_losses(model, list(model.parameters()), tokens, start, end)[-(end - s - c):].sum().item()
    loss, bpb = run_ttt("lora", model, tokens, target_bytes, h)
    assert loss == pytest.approx(total / (tokens.size - 1), rel=1e-6)
    assert bpb == pytest.approx(total / math.log(2) / target_bytes.sum(), rel=1e-6)


@pytest.mark.parametrize("mode", ["sgd", "lora"])
def test_warm_up_on_random_tokens_changes_no_score_and_no_weight(mode):
    """TTT_WARMUP compiles on random tokens (an SGD step at LR 0, a LoRA batch whose adapters are put back): the
    scores, the adapted weights and the traced events are exactly those of a run without it."""
    tokens, target_bytes = tiny_stream("docs")
    runs = {}
    for warmup in (False, True):
        h = tiny_h(ttt_warmup=warmup)
        rec, lines = Recorder(tiny_model(h)), []
        result = run_ttt(mode, rec.model, tokens, target_bytes, h, trace=rec, log=lines.append)
        runs[warmup] = result, [p.detach().clone() for p in rec.model.parameters()], rec.events, lines
    (plain, weights, events, lines), (warm, warm_weights, warm_events, warm_lines) = runs[False], runs[True]
    assert warm == plain and all(torch.equal(a, b) for a, b in zip(weights, warm_weights))
    assert len(events) == len(warm_events) and rec.updates() > 0
    for a, b in zip(events, warm_events):
        assert a[0] == b[0] and torch.equal(a[1], b[1]) and (a[2] is None or torch.equal(a[2], b[2]))
        assert all(torch.equal(x, y) for x, y in zip(a[3], b[3]))
    warm_ups = [line.split()[0] for line in warm_lines if line.startswith("ttt_warmup:")]
    assert warm_ups == (["ttt_warmup:sgd"] if mode == "sgd" else ["ttt_warmup:lora"])  # the phases run eager
    assert not any(line.startswith("ttt_warmup:") for line in lines)


class StepClock:
    """A clock that advances one second per reading: the guard's decisions become deterministic."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


@pytest.mark.parametrize("mode,budget", [("sgd", 20.0), ("lora", 40.0)])
def test_time_guard_stops_adapting_and_still_scores_everything(mode, budget):
    tokens, target_bytes = tiny_stream("docs")
    # no budget: never adapts, and scores exactly as without TTT
    h = tiny_h(eval_budget_seconds=0.0, ttt_phase_docs="")
    rec = Recorder(tiny_model(h))
    result = run_ttt(mode, rec.model, tokens, target_bytes, h, trace=rec, log=rec.log)
    check_score_first(rec, tokens.size - 1)
    assert rec.updates() == 0
    frozen = tiny_h(ttt_lr=0.0, ttt_lora_lr=0.0, ttt_phase_docs="")
    assert result == pytest.approx(run_ttt(mode, tiny_model(h), tokens, target_bytes, frozen), rel=1e-12)
    # a budget that runs out on the way: adapts, stops for good, says so once, scores the rest
    h = tiny_h(eval_budget_seconds=budget)  # clock reads (one second each) run out at the 4th chunk / 2nd batch
    rec = Recorder(tiny_model(h))
    run_ttt(mode, rec.model, tokens, target_bytes, h, trace=rec, log=rec.log, clock=StepClock())
    check_score_first(rec, tokens.size - 1)
    stops = [n for n, e in enumerate(rec.events) if e[0] == "log" and e[1].startswith("ttt_time_guard:")]
    assert len(stops) == 1
    assert any(e[0] == "update" for e in rec.events[:stops[0]])
    assert not any(e[0] == "update" for e in rec.events[stops[0]:])
    assert any(e[0] == "score" for e in rec.events[stops[0]:])


def test_guard_projects_the_remaining_work_at_the_measured_paces():
    """Adapting goes on while elapsed + the upcoming adaptation + 2 × (scoring pace per unit of work) × the work
    left fits the budget; the first unit (compilation) is left out of both paces."""
    now = [0.0]
    guard = tg.EvalGuard(tiny_h(eval_budget_seconds=100.0), 1000, tg.Runtime(), lambda: now[0], 0.0)
    guard.scored_unit(50.0, 100)  # the first unit: not measured
    guard.adapted_unit(50.0, 100)
    assert guard.score_pace() == 0 and guard.adapt_pace() == 0
    guard.scored_unit(10.0, 100)  # 0.1 s a unit
    guard.adapted_unit(30.0, 100)  # 0.3 s a unit
    assert guard.score_pace() == pytest.approx(0.1) and guard.adapt_pace() == pytest.approx(0.3)
    now[0] = 20.0  # 20 + 2·0.1·800 = 180 s for the rest alone
    assert not guard.allows(lambda line: None, collective=False, upcoming_s=0.0)
    lines = []
    guard = tg.EvalGuard(tiny_h(eval_budget_seconds=200.0), 1000, tg.Runtime(), lambda: now[0], 0.0)
    for seconds, work in ((50.0, 100), (10.0, 100)):
        guard.scored_unit(seconds, work)
    assert guard.allows(lines.append, collective=False, upcoming_s=19.0)  # 20 + 19 + 160 < 200
    assert not guard.allows(lines.append, collective=False, upcoming_s=20.0)  # = 200: stops, for good
    assert not guard.allows(lines.append, collective=False, upcoming_s=0.0)
    assert len(lines) == 1 and "rank0_work_left:0.800" in lines[0]


def _rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    results = {}
    for mode, h in two_rank_cases():
        model, lines = tiny_model(h), []
        results[mode] = run_ttt(mode, model, *tiny_stream("docs"), h, rank=rank, world_size=world_size, log=lines.append)
        results[mode + "_log"] = lines
        results[mode + "_weights"] = [p.detach().clone() for p in model.parameters()]
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def two_rank_cases():
    # LoRA's adapters at LR 0: A carries over between a rank's own batches, so with LoRA LR > 0 the scores
    # depend on how documents are dealt out; the phases (base weights, all ranks) and the scoring must not.
    return [("sgd", tiny_h()), ("lora", tiny_h(ttt_lora_lr=0.0, ttt_phase_lr=0.05))]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    torch.multiprocessing.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for mode, h in two_rank_cases():
        model = tiny_model(h)
        single = run_ttt(mode, model, *tiny_stream("docs"), h)
        for r in ranks:
            assert r[mode] == pytest.approx(single, rel=1e-6), mode
        for a, b, c in zip(ranks[0][mode + "_weights"], ranks[1][mode + "_weights"], model.parameters()):
            assert torch.equal(a, b)  # the ranks take identical steps
            assert torch.allclose(a, c.detach(), rtol=0, atol=1e-6)
    finish = [line for line in ranks[0]["lora_log"] if line.startswith("ttt_rank_finish_seconds:")]
    assert len(finish) == 1 and len(finish[0].split()[0].split(":")[1].split(",")) == 2
    assert finish[0].split()[-1] == "unadapted_targets:0,0"  # the default budget stops nothing
    assert ranks[0]["sgd"] != pytest.approx(plain_score(tiny_model(tiny_h()), *tiny_stream("docs"), tiny_h()), rel=1e-6)


def _late_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    """LoRA TTT on two ranks without phases, rank 1's clock past the budget from its first reading on."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    readings = iter([0.0])
    clock = (lambda: next(readings, 1e6)) if rank == 1 else None
    h, lines = tiny_h(ttt_phase_docs=""), []
    run_ttt("lora", tiny_model(h), *tiny_stream("docs"), h, log=lines.append, clock=clock, rank=rank, world_size=2)
    torch.save(lines, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_the_finish_line_counts_each_ranks_unadapted_targets(tmp_path):
    """Each rank's guard stops on its own: rank 1's stops before its first batch, rank 0's never. Only rank 0
    logs, so the finish line must carry rank 1's count."""
    torch.multiprocessing.spawn(_late_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    lines = torch.load(tmp_path / "rank0.pt")
    h = tiny_h(ttt_phase_docs="")
    _, lengths = tg.document_spans(tiny_stream("docs")[0])
    rank1_targets = sum(int(lengths[b].sum()) for batches in tg.dealt_batches(lengths, h, 1, 2)[1] for b in batches)
    finish = [line for line in lines if line.startswith("ttt_rank_finish_seconds:")]
    assert rank1_targets > 0 and len(finish) == 1
    assert finish[0].split()[-1] == f"unadapted_targets:0,{rank1_targets}"


def test_a_mode_without_test_time_training_is_refused():
    h = tiny_h()
    with pytest.raises(ValueError, match="TTT_MODE='none' runs no test-time training"):
        run_ttt("none", tiny_model(h), *tiny_stream("docs"), h)


def test_document_spans():
    tokens = np.array([5, 6, 1, 7, 1, 1, 8, 9, 1], dtype=np.uint16)  # 8 targets
    starts, lengths = tg.document_spans(tokens)
    assert starts.tolist() == [0, 2, 4, 5] and lengths.tolist() == [2, 2, 1, 3]  # the final BOS starts nothing


SMOKE = {"ITERATIONS": "2", "VAL_TOKENS_LIMIT": "512", "BROTLI_QUALITY": "5", "EVAL_SEQ_LEN": "128",
         "EVAL_STRIDE": "64", "RUN_ID": "smoke"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    return out, run_script([sys.executable, SCRIPT], SMOKE, str(out))


def exact_line(stdout: str, prefix: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(prefix))


def test_eval_only_reproduces_the_round_trip_and_scores_with_ttt(smoke_run, tmp_path):
    """TTT_EVAL_ONLY on the training run's artifact: the same round-trip score to the last digit, then the TTT
    score as the last line, a log of its own (the training log kept), and no training data read."""
    out, train_stdout = smoke_run
    val_only = tmp_path / "val_only"
    val_only.mkdir()
    shutil.copy(os.path.join(REPO, "data", "sample", "fineweb_val_000000.bin"), val_only)
    for mode, extra in (("sgd", {"TTT_CHUNK_TOKENS": "128"}),
                        ("lora", {"TTT_BATCH_DOCS": "4", "TTT_LORA_RANK": "4", "TTT_CHUNK": "32", "TTT_PHASE_DOCS": "3",
                                  "TTT_CHUNK_TOKENS": "128"})):
        env = {**SMOKE, **extra, "TTT_EVAL_ONLY": "1", "TTT_MODE": mode, "DATA_PATH": str(val_only)}
        stdout = run_script([sys.executable, SCRIPT], env, str(out))
        roundtrip = "final_int6_rans_roundtrip_exact"
        assert exact_line(stdout, roundtrip) == exact_line(train_stdout, roundtrip)
        assert stdout.strip().splitlines()[-1].startswith("legal_ttt_exact val_loss:")
        assert "step:" not in stdout and (mode == "sgd" or "ttt_phase:1 docs:3" in stdout)
        log = logparse.parse_log(str(out / "logs" / "smoke_eval.txt"))
        assert log.finished and log.ttt and log.val_bpb == log.ttt_val_bpb != log.final_exact_val_bpb
        assert log.score_eval_ms == log.ttt_eval_ms > 0
    train_log = logparse.parse_log(str(out / "logs" / "smoke.txt"))
    assert train_log.finished and not train_log.ttt and train_log.val_bpb == train_log.final_exact_val_bpb


def test_eval_only_refuses_a_missing_corrupt_or_mismatched_artifact(smoke_run, tmp_path, monkeypatch):
    out, _ = smoke_run
    for key, value in {**SMOKE, "PRESET": "smoke", "OUTPUT_DIR": str(tmp_path), "TTT_EVAL_ONLY": "1"}.items():
        monkeypatch.setenv(key, value)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match="no artifact at"):
        tg.main()  # OUTPUT_DIR holds none
    corrupt = tmp_path / "corrupt.artifact"
    corrupt.write_bytes((out / tg.ARTIFACT_NAME).read_bytes()[:-100])
    monkeypatch.setenv("ARTIFACT_PATH", str(corrupt))
    with pytest.raises(SystemExit, match="cannot score the artifact .*corrupt"):
        tg.main()
    monkeypatch.setenv("ARTIFACT_PATH", str(out / tg.ARTIFACT_NAME))
    for var, value, what in (("NUM_LAYERS", "3", "blocks.3"), ("MODEL_DIM", "64", "tok_emb.weight")):
        monkeypatch.setenv(var, value)
        with pytest.raises(SystemExit, match=f"do not match the model the hyperparameters describe.*{what}"):
            tg.main()
        monkeypatch.delenv(var)


def test_lora_chunk_longer_than_the_context_is_refused(monkeypatch):
    for key, value in {"TTT_MODE": "lora", "TTT_CHUNK": "64", "EVAL_SEQ_LEN": "32"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match="TTT_CHUNK=64 must be at most EVAL_SEQ_LEN=32"):
        tg.main()


def reference_lora_document(model, h, a0, tokens, start, length) -> torch.Tensor:
    """One document's scores by the protocol, the slow way: its own adapters (A from `a0`, B = 0) under
    torch.optim.AdamW, each chunk scored from scratch in the ≤ EVAL_SEQ_LEN tokens of the document up to the
    chunk's end (as a whole chunk's, so the last of a long document keeps EVAL_SEQ_LEN − TTT_CHUNK of context),
    then one step on that chunk's mean loss unless it is the document's last."""
    scale, half = h.ttt_lora_alpha / h.ttt_lora_rank, len(a0)
    adapters = [a.clone().requires_grad_() for a in a0] + [torch.zeros(b, a.size(0), requires_grad=True)
                                                             for a, b in zip(a0, out_features(model))]
    opt = torch.optim.AdamW(adapters, lr=h.ttt_lora_lr, betas=(h.ttt_lora_beta1, h.ttt_lora_beta2), eps=tg.LORA_EPS,
                            weight_decay=h.ttt_lora_wd)
    scores = []
    for c in range(0, length, h.ttt_chunk):
        end = min(c + h.ttt_chunk, length)
        first = max(0, c + h.ttt_chunk - h.eval_seq_len)  # the window ends where a whole chunk would
        losses = lora_losses_with_grad(model, adapters[:half], adapters[half:], scale, tokens, start + first, start + end)
        scores.append(losses[c - first:].detach())
        if end < length:
            losses[c - first:].mean().backward()
            opt.step()
            opt.zero_grad()
    return torch.cat(scores)


def out_features(model) -> list[int]:
    linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.endswith(tg.LORA_TARGETS)]
    return [m.out_features for m in linears] + [model.tok_emb.weight.size(0)]


def lora_losses_with_grad(model, a, b, scale, tokens, start, end) -> torch.Tensor:
    linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.endswith(tg.LORA_TARGETS)]
    hooks = [m.register_forward_hook(lambda _m, inputs, out, i=i: out + inputs[0] @ a[i].T @ b[i].T * scale)
             for i, m in enumerate(linears)]
    try:
        t = torch.from_numpy(tokens.astype(np.int64))
        hidden = model.hidden(t[None, start:end])[0]
        logits = hidden @ model.tok_emb.weight.T + hidden @ a[-1].T @ b[-1].T * scale
        logits = model.logit_softcap * torch.tanh(logits / model.logit_softcap)
        return F.cross_entropy(logits, t[start + 1:end + 1], reduction="none").double()
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("width_step,beta1,doc_attention", [(4, 0.0, False), (256, 0.0, False), (4, 0.9, False),
                                                              (4, 0.0, True)])
def test_lora_equals_a_per_document_reference(width_step, beta1, doc_attention):
    """With every document in one batch and no phase, LoRA TTT's score of every target equals the per-document
    reference (torch's AdamW, one document at a time, no batching, no padding, no shrinking rows or windows),
    with the spec's β1 = 0 and with a first moment; with document attention too, which TTT's rows skip."""
    h = tiny_h(ttt_batch_docs=16, ttt_phase_docs="", ttt_width_step=width_step, ttt_lora_lr=0.003, ttt_lora_beta1=beta1,
               doc_attention=doc_attention)
    tokens, target_bytes = tiny_stream("docs")
    starts, lengths = tg.document_spans(tokens)
    model = tiny_model(h)
    model.requires_grad_(False)
    a0 = [a.clone() for a in tg.BatchedLoRA(model, h, CPU).A]
    rec = Recorder(model)
    run_ttt("lora", model, tokens, target_bytes, h, trace=rec)
    got = np.zeros(tokens.size - 1)
    for kind, index, losses, *_ in rec.events:
        if kind == "score":
            got[index[index >= 0].numpy()] = losses[index >= 0].numpy()
    model.requires_grad_(False)
    order = sorted(range(len(starts)), key=lambda d: (-lengths[d], d))  # row r of the batch holds order[r]
    for row, d in enumerate(order):
        want = reference_lora_document(model, h, [a[row] for a in a0], tokens, int(starts[d]), int(lengths[d]))
        assert np.allclose(got[starts[d]:starts[d] + lengths[d]], want.numpy(), rtol=0, atol=2e-5), d
    assert rec.updates() > 5


def test_phase_pieces_tile_the_documents_without_crossing_a_boundary():
    tokens, _ = tiny_stream("docs")
    starts, lengths = tg.document_spans(tokens)
    pieces = tg.phase_pieces(starts, lengths, range(len(starts)), 16)
    covered = np.concatenate([np.arange(s, s + n) for s, n in pieces])
    assert np.array_equal(covered, np.arange(tokens.size - 1))  # every target once, in order
    doc_of = np.repeat(np.arange(len(starts)), lengths)
    for s, n in pieces:
        assert 1 <= n <= 16 and doc_of[s] == doc_of[s + n - 1]
        assert s in starts or doc_of[s - 1] == doc_of[s] and (s - starts[doc_of[s]]) % 16 == 0
    steps = tg.phase_steps(pieces, 22)
    assert sum(steps, []) == pieces and all(sum(n for _, n in step) >= 22 for step in steps[:-1])


@pytest.mark.parametrize("doc_attention", [False, True])
def test_phase_step_equals_a_per_piece_reference(doc_attention):
    """A phase step (rows of a width side by side, padded and masked) moves the weights as plain SGD on the mean
    loss of the pieces, each computed alone from its own tokens: no padding and no other document in context,
    also where the rows run on into the next document and document attention is skipped (one_document)."""
    h = tiny_h(ttt_grad_clip=0.0, doc_attention=doc_attention)
    tokens, _ = tiny_stream("docs")
    starts, lengths = tg.document_spans(tokens)
    pieces = tg.phase_pieces(starts, lengths, range(len(starts)), h.eval_seq_len)
    model, reference = tiny_model(h), tiny_model(h)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tg.phase_step(model, opt, 0.1, model.token_losses, torch.from_numpy(tokens.astype(np.int64)), pieces, h,
                  tg.Runtime(), None)
    t = torch.from_numpy(tokens.astype(np.int64))
    total = sum(reference.token_losses(t[None, s:s + n], t[None, s + 1:s + n + 1]).sum() for s, n in pieces)
    (total / sum(n for _, n in pieces)).backward()
    for p, r in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.detach(), r.detach() - 0.1 * r.grad, rtol=0, atol=1e-6)


def test_batches_are_dealt_to_ranks_within_five_percent():
    """Segments cut the longest-first order at the phase counts. The deal of FineWeb-like lengths (log-normal,
    median ~570, a long tail; 2 GPUs' share) gives each of 2 ranks every batch of a segment once, and of the last
    segment work within 5%: both ranks start it together after the last (collective) phase, so they finish
    within 5% of each other. One rank gets every batch, in cost order."""
    h = tg.Hyperparameters(ttt_phase_docs="208,416,624")
    lengths = np.random.default_rng(0).lognormal(math.log(570), 1.0, 12500).astype(np.int64).clip(20, 60000)
    bounds, segments = tg.lora_segments(lengths, h)
    order = sum(sum(segments, []), [])
    assert bounds == [0, 208, 416, 624, 12500] and sorted(order) == list(range(12500))
    assert all(lengths[a] >= lengths[b] for a, b in zip(order, order[1:]))
    assert [sum(map(len, batches)) for batches in segments] == [208, 208, 208, 12500 - 624]
    for batches in segments:
        costs = [tg.batch_cost(lengths[b].tolist(), h) for b in batches]
        deal = tg.deal_batches(costs, 2)
        assert sorted(deal[0] + deal[1]) == list(range(len(batches)))
    loads = [sum(costs[b] for b in mine) for mine in deal]
    assert max(loads) <= 1.05 * min(loads), loads
    assert tg.deal_batches([5, 9, 1, 9], 1) == [[1, 3, 0, 2]]
    assert tg.deal_batches([5, 9, 1, 9], 2) == [[1, 0], [3, 2]]


def test_lora_batches_reuse_one_graph():
    """Compiled (graph capture only, where recompilation is decided), every batch of a LoRA TTT run, with its
    shrinking rows and growing windows, runs on the warm-up's graph, a phase on its own, and a batch after the
    phase on the first again: no recompilation."""
    from torch._dynamo.utils import counters
    h = tiny_h(ttt_batch_docs=4)
    tokens, target_bytes = tiny_stream("docs")
    starts, lengths = tg.document_spans(tokens)
    model = tiny_model(h)
    lora = tg.BatchedLoRA(model, h, CPU)
    torch._dynamo.reset()
    counters.clear()
    loss_fn = torch.compile(lora.token_losses, backend="eager")
    phase_fn = torch.compile(model.token_losses, backend="eager")
    tg.warm_up_lora(lora, loss_fn, h, CPU, lambda line: None)
    tg.warm_up_phase(model, phase_fn, h, tg.Runtime(), lambda line: None)
    warm = counters["stats"]["unique_graphs"]
    t, sums = torch.from_numpy(tokens.astype(np.int64)), tg.ScoreSums(target_bytes, CPU)
    segments, _ = tg.dealt_batches(lengths, h, 0, 1)
    for batch in sum(segments, []):
        tg.lora_score_batch(lora, loss_fn, t, starts[batch].tolist(), lengths[batch].tolist(), h, sums,
                            tg.PartTimes(CPU, tg.time.perf_counter), True, None)
    tg.run_phase(model, phase_fn, t, tg.phase_pieces(starts, lengths, sum(segments[0], []), h.eval_seq_len), h,
                 tg.Runtime(), None)
    batch = segments[-1][-1]  # after a phase (the base weights trained, then frozen again): still the same graph
    tg.lora_score_batch(lora, loss_fn, t, starts[batch].tolist(), lengths[batch].tolist(), h, sums,
                        tg.PartTimes(CPU, tg.time.perf_counter), True, None)
    lora.close()
    assert warm == 2 and counters["stats"]["unique_graphs"] == warm, dict(counters["stats"])


def test_closed_adapters_leave_the_base_model_as_it_was():
    """After a batch that adapted (B ≠ 0), close() takes the hooks and the adapters' views off every Linear: the
    model's losses are the base model's again, bit for bit."""
    h = tiny_h(ttt_batch_docs=4)
    tokens, target_bytes = tiny_stream("docs")
    model = tiny_model(h).eval()
    x = torch.from_numpy(tokens[:16].astype(np.int64))[None]
    y = torch.from_numpy(tokens[1:17].astype(np.int64))[None]
    before = model.token_losses(x, y)
    lora = tg.BatchedLoRA(model, h, CPU)
    starts, lengths = tg.document_spans(tokens)
    tg.lora_score_batch(lora, lora.token_losses, torch.from_numpy(tokens.astype(np.int64)), starts[:4].tolist(),
                        lengths[:4].tolist(), h, tg.ScoreSums(target_bytes, CPU), tg.PartTimes(CPU, tg.time.perf_counter),
                        True, None)
    assert any(b.abs().sum() > 0 for b in lora.B)
    lora.active = True  # even left on: close() switches it off
    lora.close()
    assert not any(m._forward_hooks or hasattr(m, "lora_a") for m in model.modules())
    assert torch.equal(model.token_losses(x, y), before)


def test_windows_grow_with_the_chunk_and_rows_shrink_with_the_batch():
    h = tg.Hyperparameters(ttt_width_step=256)  # TTT_CHUNK 48, EVAL_SEQ_LEN 2048
    assert [tg.lora_window(48 * (i + 1), h) for i in (0, 4, 5, 10, 42, 43, 500)] == [256, 256, 512, 768, 2048, 2048, 2048]
    assert [tg.lora_window(48 * (i + 1), tg.Hyperparameters()) for i in (0, 1, 2, 41, 42)] == [64, 128, 192, 2048, 2048]
    assert [tg.lora_rows(live, 64) for live in (64, 40, 33, 32, 5, 1, 0)] == [64, 64, 64, 32, 8, 2, 2]
    assert tg.lora_rows(3, 3) == 3 and tg.lora_rows(1, 1) == 1
    # the work model: one batch of a long document and 63 short ones is mostly the long one's narrow rows
    long_tail = tg.batch_cost([2048] + [48] * 63, h)
    assert long_tail == 64 * 256 + h.ttt_step_cost_tokens + sum(2 * tg.lora_window(48 * (j + 1), h) + h.ttt_step_cost_tokens
                                                                   for j in range(1, 43))


@pytest.mark.parametrize("adapt", [True, False])
def test_a_chunks_autograd_graph_is_gone_before_the_next_chunks_forward(adapt):
    """Each chunk's losses (and with them its forward's saved activations) are released before the next chunk's
    forward runs, with or without the update (a batch the time guard no longer adapts): never two windows' worth
    of activations alive at once."""
    import weakref
    h = tiny_h(ttt_batch_docs=4)
    tokens, target_bytes = tiny_stream("docs")
    starts, lengths = tg.document_spans(tokens)
    lora = tg.BatchedLoRA(tiny_model(h), h, CPU)
    previous, alive_at_call = [], []

    def loss_fn(x, y, positions):
        alive_at_call.append(bool(previous) and previous[-1]() is not None)
        losses = lora.token_losses(x, y, positions)
        previous.append(weakref.ref(losses))
        return losses

    tg.lora_score_batch(lora, loss_fn, torch.from_numpy(tokens.astype(np.int64)), starts[:4].tolist(),
                        lengths[:4].tolist(), h, tg.ScoreSums(target_bytes, CPU),
                        tg.PartTimes(CPU, tg.time.perf_counter), adapt, None)
    lora.close()
    assert len(alive_at_call) > 2 and not any(alive_at_call)
