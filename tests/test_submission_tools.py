"""Submission tooling (tools/): log parser, bench summary, record packaging, size audit, Welch test, multi-seed
runner and plots. CPU only, no training runs: logs are the device's real ones (tests/fixtures/) or made from
them, artifacts come from a tiny model."""
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import brotli
import numpy as np
import pytest
import torch

from conftest import BENCH_TOOLS, PROXY, REPO

import bench_summary  # noqa: E402
import logparse  # noqa: E402
import multi_seed  # noqa: E402
import package_record  # noqa: E402
import plot_logs  # noqa: E402
import significance  # noqa: E402
import size_audit  # noqa: E402
import train_gpt as tg  # noqa: E402

FIXTURES = os.path.join(REPO, "tests", "fixtures")
QUALITY = os.path.join(FIXTURES, "quality6.txt")  # a finished 1×H100 proxy run, 1032 steps, under the limit
THROUGHPUT = os.path.join(FIXTURES, "throughput.txt")  # a finished 60-step run, over the limit (ERROR line)
FINEWEB_DATA, FINEWEB_VAL_TOKENS = "./data/datasets/fineweb10B_sp8192", 47_851_520


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------

def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def make_log(path, seed, val_bpb, model_bytes, code_bytes, finished=True, ratio=2.0707, steps=1032):
    """A log in our format, made from the real quality6 log with this seed's numbers."""
    lines = read_lines(QUALITY)
    lines[0] = lines[0].replace("run_id=quality6 seed=1337", f"run_id=pkg_seed{seed} seed={seed}")
    lines[0] = lines[0].replace("data_path=/tmp/proxy_sp8192", f"data_path={FINEWEB_DATA}")  # as if on FineWeb
    out = []
    for line in lines[1:]:
        if line.startswith("val_tokens:"):
            line = f"val_tokens:{FINEWEB_VAL_TOKENS} val_bytes:{round(FINEWEB_VAL_TOKENS * 2865002 / 959012)}"
        elif line.startswith("stopping_early"):
            line = f"stopping_early: wallclock_cap train_time:176042ms step:{steps}/20000"
        elif line.startswith("pre_quant_ema"):
            line = f"pre_quant_ema step:{steps} val_loss:{(val_bpb - 0.02) * ratio:.4f} val_bpb:{val_bpb - 0.02:.4f} eval_time:17390ms"
        elif line.startswith("Serialized model"):
            line = f"Serialized model int6+brotli: {model_bytes} bytes"
        elif line.startswith("Code size"):
            line = f"Code size (packed): {code_bytes} bytes"
        elif line.startswith("Total submission size"):
            line = f"Total submission size int6+brotli: {model_bytes + code_bytes} bytes"
        elif line.startswith("final_int6_brotli_roundtrip_exact"):
            line = f"final_int6_brotli_roundtrip_exact val_loss:{val_bpb * ratio:.8f} val_bpb:{val_bpb:.8f}"
        elif line.startswith("final_int6_brotli_roundtrip"):
            line = f"final_int6_brotli_roundtrip val_loss:{val_bpb * ratio:.4f} val_bpb:{val_bpb:.4f} eval_time:11869ms"
        out.append(line)
    if not finished:
        out = out[:out.index(next(l for l in out if l.startswith("step:600/")))]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join([lines[0]] + out) + "\n")
    return str(path)


TINY = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=8, mlp_mult=2,
            float_max_numel=512, **PROXY)


def tiny_state(seed):
    torch.manual_seed(seed)
    model = tg.GPT(tg.Hyperparameters(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.state_dict()


def write_artifact(path, state, h):
    blob = tg.compress_artifact(tg.serialize_quantized(tg.quantize_state_dict(state, h)), h.compressor, h.brotli_quality)
    with open(path, "wb") as f:
        f.write(blob)
    return str(path), len(blob)


@pytest.fixture(scope="module")
def packed_code_bytes():
    with open(os.path.join(REPO, "train_gpt.py"), encoding="utf-8") as f:
        return len(package_record.pack_script.pack_source(f.read()))


@pytest.fixture
def three_seeds(tmp_path, packed_code_bytes):
    """Three finished seed logs whose byte counts match three real (tiny) artifacts and the packed train_gpt.py."""
    h = tg.Hyperparameters(**TINY)
    logs, arts, bpbs = [], [], [1.0801, 1.0812, 1.0795]
    for seed, bpb in zip((1337, 42, 2025), bpbs):
        art, size = write_artifact(tmp_path / f"art{seed}.artifact", tiny_state(seed), h)
        arts.append(art)
        logs.append(make_log(tmp_path / "logs" / f"s{seed}.txt", seed, bpb, size, packed_code_bytes))
    return logs, arts, bpbs


def build(tmp_path, logs, arts=None, extra=()):
    argv = ["--name", "Tiny Test", "--author", "A. Person", "--github-id", "aperson", "--blurb", "a test record",
            "--date", "2026-11-24", "--records-dir", str(tmp_path / "records"), "--log", *logs, *extra]
    if arts:
        argv += ["--artifact", *arts]
    return package_record.main(argv)


# ---------------------------------------------------------------------------------------------------
# log parser
# ---------------------------------------------------------------------------------------------------

def test_parser_reads_every_field_of_a_finished_log():
    log = logparse.parse_log(QUALITY)
    assert log.finished and not log.truncated_last_line and log.unknown_lines == []
    assert log.run_id == "quality6" and log.seed == 1337
    assert log.hparams["vocab_size"] == 8192 and log.hparams["compile"] is True and log.hparams["rope_base"] == 10000.0
    assert log.hparams["train_batch_tokens"] == 65536 and log.hparams["data_path"] == "/tmp/proxy_sp8192"
    assert (log.world_size, log.device, log.torch_version, log.attention) == (1, "cuda:0", "2.11.0+cu130", "sdpa")
    assert (log.val_tokens, log.val_bytes, log.model_params) == (959012, 2865002, 35916376)
    assert (log.grad_accum_steps, log.micro_batch_tokens) == (8, 8192)
    assert (log.compile_warmup_steps, log.compile_warmup_s) == (20, 8.0)
    assert len(log.train) == 15 and log.train[0].step == 1 and log.train[-1].step == 1000
    assert log.train[10].train_loss == 3.8749 and log.train[10].train_time_ms == 30131 and log.train[10].step_avg_ms == 150.65
    assert log.val == []
    assert log.stopped_early and log.stop_step == 1032 and log.train_time_ms == 176042 and log.steps == 1032
    assert (log.peak_mem_allocated_mib, log.peak_mem_reserved_mib) == (2805, 2978)
    assert (log.pre_quant_step, log.pre_quant_val_loss, log.pre_quant_val_bpb, log.pre_quant_eval_ms) == (1032, 2.2501, 1.0866, 17390)
    assert (log.payload_bytes, log.compressed_bytes, log.quantize_compress_s) == (36034450, 15518045, 83.3)
    assert (log.quant_label, log.model_bytes, log.code_bytes, log.total_bytes) == ("int6+brotli", 15518045, 14658, 15532703)
    assert (log.final_label, log.final_val_loss, log.final_val_bpb, log.final_eval_ms) == ("int6_brotli", 2.2918, 1.1068, 11869)
    assert (log.val_loss, log.val_bpb) == (2.29180420, 1.10675416)
    assert log.errors == []
    # val_loss / val_bpb is ln2 · bytes / tokens of the validation set
    assert log.nats_per_bpb == pytest.approx(log.val_loss / log.val_bpb, rel=1e-6)


def test_parser_on_a_run_that_reached_its_iterations_and_logged_an_error():
    log = logparse.parse_log(THROUGHPUT)
    assert log.finished and not log.stopped_early
    assert log.steps == 60 and log.train_time_ms == 45459  # the last step line: no early stop
    assert log.total_bytes == 16071371 and len(log.errors) == 1 and "exceeds the 16000000-byte limit" in log.errors[0]
    assert log.val_bpb == 2.01736004


def test_parser_reads_periodic_validation_lines(tmp_path):
    lines = read_lines(QUALITY)
    i = lines.index(next(l for l in lines if l.startswith("step:400/")))
    lines.insert(i + 1, "step:400/20000 val_loss:2.9000 val_bpb:1.4000 train_time:62600ms step_avg:156.50ms")
    p = tmp_path / "val.txt"
    p.write_text("\n".join(lines) + "\n")
    log = logparse.parse_log(str(p))
    assert len(log.val) == 1 and (log.val[0].step, log.val[0].val_loss, log.val[0].val_bpb, log.val[0].train_time_ms) == (400, 2.9, 1.4, 62600)
    assert len(log.train) == 15 and log.unknown_lines == []


def test_parser_keeps_known_fields_when_a_newer_script_logs_more(tmp_path):
    lines = read_lines(QUALITY)
    lines[3] = "model_params:35916376 fused_ce:False"  # a field added to a known line (train_gpt.py does this now)
    lines.insert(4, "ttt_chunks:4 ttt_lr:0.005")  # a new line of key:value fields
    lines.insert(5, "some free-form note")  # anything else
    i = lines.index(next(l for l in lines if l.startswith("step:200/")))
    lines[i] += " lr_mult:0.98"
    p = tmp_path / "newer.txt"
    p.write_text("\n".join(lines) + "\n")
    log = logparse.parse_log(str(p))
    assert log.model_params == 35916376 and log.finished and log.val_bpb == 1.10675416
    assert log.extras == {"fused_ce": False, "ttt_chunks": 4, "ttt_lr": 0.005, "lr_mult": 0.98}
    assert log.unknown_lines == [(6, "some free-form note")]
    assert [t.step for t in log.train] == [t.step for t in logparse.parse_log(QUALITY).train]
    assert bench_summary.summarise(str(p))["ms_per_step"] == 144.7  # needs model_params


def test_a_ttt_run_is_scored_by_its_ttt_line(tmp_path):
    """With TTT_MODE set, the score is the legal_ttt_exact line after the round trip: the run is unfinished
    without it, and its eval time is the one the packager checks and reports."""
    lines = read_lines(QUALITY)
    lines[0] += " ttt_mode=sgd"
    roundtrip = lines[:]
    lines += ["ttt_progress:10/10 rank0_targets:959012 rank0_bpb:1.0950 elapsed:300.5s adapting:1",
              "legal_ttt_exact val_loss:2.26000000 val_bpb:1.09000000 eval_time:300512ms"]
    p, cut = tmp_path / "ttt.txt", tmp_path / "ttt_cut.txt"
    p.write_text("\n".join(lines) + "\n")
    cut.write_text("\n".join(roundtrip) + "\n")
    log = logparse.parse_log(str(p))
    assert log.ttt and log.finished and log.unknown_lines == []
    assert (log.val_loss, log.val_bpb, log.score_eval_ms) == (2.26, 1.09, 300512)
    assert (log.final_exact_val_bpb, log.final_eval_ms) == (1.10675416, 11869)
    assert log.summary()["val_bpb"] == 1.09 and log.to_dict()["score_eval_ms"] == 300512
    assert package_record.log_problems(log) == []
    assert package_record.seed_result(log, "ttt.txt", None)["eval_time_s"] == 300.512
    assert bench_summary.summarise(str(p))["ttt_bpb"] == "1.09000000"
    died = logparse.parse_log(str(cut))  # the round trip is there, the TTT score is not
    assert not died.finished and died.val_bpb is None and died.val_loss is None
    assert "unfinished run" in package_record.log_problems(died)[0]
    p.write_text(p.read_text().replace("eval_time:300512ms", "eval_time:600001ms"))
    assert any("final evaluation took 600.0 s" in e for e in package_record.log_problems(logparse.parse_log(str(p))))


def test_parser_tolerates_interrupted_logs(tmp_path):
    lines = read_lines(QUALITY)
    cut = lines.index(next(l for l in lines if l.startswith("step:600/")))
    # died mid-training, in the middle of writing a line
    p = tmp_path / "died.txt"
    p.write_text("\n".join(lines[:cut + 1]) + "\nstep:800/20000 train_lo")
    log = logparse.parse_log(str(p))
    assert not log.finished and log.truncated_last_line
    assert log.val_bpb is None and log.val_loss is None and log.total_bytes is None and log.pre_quant_val_bpb is None
    assert log.steps == 600 and log.train_time_ms == 98107 and len(log.train) == 13
    assert log.unknown_lines == [(cut + 2, "step:800/20000 train_lo")]
    # cut inside the last line: a half-written final score is not a score
    p2 = tmp_path / "cut_final.txt"
    p2.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:-3])
    log2 = logparse.parse_log(str(p2))
    assert not log2.finished and log2.final_val_bpb == 1.1068 and log2.total_bytes == 15532703
    # only the hyperparameter line
    p3 = tmp_path / "first_line.txt"
    p3.write_text(lines[0] + "\n")
    log3 = logparse.parse_log(str(p3))
    assert not log3.finished and log3.steps is None and log3.train_time_ms is None
    # the summary tool reports it without crashing
    assert bench_summary.summarise(str(p))["finished"] == "no"


@pytest.mark.parametrize("content,why", [
    (b"", "empty"),
    (b"# Parameter Golf training system\n\nA training system\n", "first line is not"),
    (b'{"name": "x", "val_bpb": 1.0}\n', "first line is not"),
    (b"a=1 b=2\nstep:1/2 train_loss:1 train_time:1ms step_avg:1ms\n", "lacks run_id"),
    (b"PGOLF-A1\x00\x01\xff\xfe binary", "not UTF-8"),
    (b"run_id=x seed=1\x00\n", "NUL"),
])
def test_parser_refuses_files_that_are_not_our_logs(tmp_path, content, why):
    p = tmp_path / "foreign.txt"
    p.write_bytes(content)
    with pytest.raises(logparse.LogFormatError) as exc:
        logparse.parse_log(str(p))
    assert why in str(exc.value) and str(p) in str(exc.value)
    with pytest.raises(logparse.LogFormatError):
        logparse.parse_log(str(tmp_path))  # a directory


def test_bench_summary_output_is_unchanged_by_the_refactor():
    # the lines the standalone-regex version printed for these two fixtures (commit 981732b)
    expected = {
        QUALITY: "steps_timed=10 ms_per_step=144.7 tokens_per_s=452860 mfu_pct=16.2 compile_s=8.0 peak_mem_mib=2805 "
                 "steps=1032 pre_quant_bpb=1.0866 pre_quant_eval_s=17.4 quant_compress_s=83.3 model_bytes=15518045 "
                 "code_bytes=14658 total_bytes=15532703 roundtrip_eval_s=11.9 roundtrip_bpb=1.10675416 quant_gap=0.02015",
        THROUGHPUT: "steps_timed=8 ms_per_step=747.5 tokens_per_s=1052083 mfu_pct=37.5 compile_s=46.9 peak_mem_mib=24411 "
                    "steps=60 pre_quant_bpb=2.0107 pre_quant_eval_s=30.7 quant_compress_s=67.3 model_bytes=16056713 "
                    "code_bytes=14658 total_bytes=16071371 roundtrip_eval_s=1.8 roundtrip_bpb=2.01736004 quant_gap=0.00666",
    }
    for path, line in expected.items():
        out = bench_summary.summarise(path)
        assert out.pop("run") == path
        assert " ".join(f"{k}={v}" for k, v in out.items()) == line
    proc = subprocess.run([sys.executable, os.path.join(BENCH_TOOLS, "bench_summary.py"), QUALITY, os.path.join(REPO, "README.md")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout.startswith(f"run={QUALITY} steps_timed=10")
    assert "not a train_gpt.py log" in proc.stderr


# ---------------------------------------------------------------------------------------------------
# packaging
# ---------------------------------------------------------------------------------------------------

def test_package_builds_a_folder_that_check_accepts(tmp_path, three_seeds, packed_code_bytes, capsys):
    logs, arts, bpbs = three_seeds
    assert build(tmp_path, logs, arts) == 0
    folder = tmp_path / "records" / "2026-11-24_Tiny_Test"
    assert sorted(os.listdir(folder)) == ["README.md", "requirements.txt", "submission.json", "train_curves.png",
                                          "train_gpt.py", "train_seed1337.txt", "train_seed2025.txt", "train_seed42.txt"]
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx(statistics.fmean(bpbs), abs=5e-9)
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev(bpbs), abs=5e-9)
    assert sub["val_loss"] == pytest.approx(statistics.fmean(round(b * 2.0707, 8) for b in bpbs), abs=5e-9)
    assert sub["seeds"] == [1337, 42, 2025] and sub["num_seeds"] == 3
    assert sub["bytes_code"] == packed_code_bytes == os.path.getsize(folder / "train_gpt.py")
    sizes = [os.path.getsize(a) for a in arts]
    assert sub["bytes_model"] == max(sizes) and sub["bytes_total"] == max(sizes) + packed_code_bytes
    assert [r["bytes_model"] for r in sub["seed_results"]] == sizes
    assert [r["artifact_sha256"] for r in sub["seed_results"]] == [package_record.sha256_file(a) for a in arts]
    assert [r["steps"] for r in sub["seed_results"]] == [1032] * 3 and sub["train_time_s_max"] == 176.042
    assert sub["eval_time_s_max"] == 11.869 and sub["author"] == "A. Person" and sub["date"] == "2026-11-24"
    assert package_record.pack_script.is_packed((folder / "train_gpt.py").read_bytes())
    assert (folder / "train_seed42.txt").read_bytes() == Path(logs[1]).read_bytes()
    readme = (folder / "README.md").read_text()
    assert "$" not in readme.replace("$ ", "")  # every placeholder filled
    for b in bpbs:
        assert f"| {b:.8f} |" in readme
    assert f"**{statistics.fmean(bpbs):.8f}**" in readme and "![train loss and val_bpb](train_curves.png)" in readme
    assert "`MAX_WALLCLOCK_SECONDS=180.0`" in readme  # settings that differ from the defaults
    # the record's json feeds the acceptance test: its per-seed val_loss, no conversion
    rec, ratio = significance._from_json(str(folder / "submission.json"), "record")
    assert rec.values == [r["val_loss"] for r in sub["seed_results"]] and ratio == pytest.approx(2.0707, rel=1e-6)
    capsys.readouterr()
    assert package_record.main(["--check", str(folder), "--artifact", *arts]) == 0
    assert capsys.readouterr().out.startswith(f"OK {folder}")
    # an existing folder is not overwritten without --force
    assert build(tmp_path, logs, arts) == 1 and "exists" in capsys.readouterr().err
    assert build(tmp_path, logs, arts, ["--force", "--no-plot"]) == 0
    assert package_record.check_folder(str(folder)) == []


def test_requirements_name_the_attention_kernel_the_runs_logged(tmp_path, three_seeds):
    logs, arts, _ = three_seeds
    for path in logs[:2]:  # seeds that ran on FlashAttention-4 and one that did not
        text = Path(path).read_text().replace("attention:sdpa\n", "attention:sdpa varlen:flash_attn_4 triton:3.6.0\n")
        Path(path).write_text(text)
    assert build(tmp_path, logs, arts, ["--no-plot"]) == 0
    lines = (tmp_path / "records" / "2026-11-24_Tiny_Test" / "requirements.txt").read_text().splitlines()
    assert "torch>=2.5" in lines and [l for l in lines if "flash" in l] == [package_record.VARLEN_REQUIREMENTS["flash_attn_4"]]
    parsed = [package_record.parse_log(p) for p in logs]  # torch's own varlen needs nothing more
    assert package_record.requirements_text(parsed[2:]) == package_record.REQUIREMENTS.format(torch="2.11.0+cu130")


def test_package_refuses_a_total_over_the_limit(tmp_path, packed_code_bytes, capsys):
    logs = [make_log(tmp_path / f"s{s}.txt", s, 1.08, 16_000_001 - packed_code_bytes + i, packed_code_bytes)
            for i, s in enumerate((1, 2))]
    assert build(tmp_path, logs, extra=["--no-plot"]) == 1
    err = capsys.readouterr().err
    assert "exceeds the 16,000,000-byte limit by 1" in err and "by 2" in err
    assert not (tmp_path / "records" / "2026-11-24_Tiny_Test").exists()
    # exactly at the limit is allowed
    ok = [make_log(tmp_path / f"ok{s}.txt", s, 1.08, 16_000_000 - packed_code_bytes, packed_code_bytes) for s in (1, 2)]
    assert build(tmp_path, ok, extra=["--no-plot"]) == 0
    # the real over-limit run (it logged an ERROR too)
    problems = package_record.log_problems(logparse.parse_log(THROUGHPUT))
    assert any("exceeds the 16,000,000-byte limit by 71,371" in p for p in problems)
    assert any("logged an error" in p for p in problems)
    assert package_record.log_problems(logparse.parse_log(QUALITY)) == []


def test_package_refuses_unfinished_logs(tmp_path, three_seeds, packed_code_bytes, capsys):
    logs, arts, _ = three_seeds
    logs[1] = make_log(tmp_path / "died.txt", 42, 1.08, os.path.getsize(arts[1]), packed_code_bytes, finished=False)
    assert build(tmp_path, logs, arts, ["--no-plot"]) == 1
    assert "unfinished run" in capsys.readouterr().err
    assert not (tmp_path / "records" / "2026-11-24_Tiny_Test").exists()


def test_package_refuses_logs_that_disagree_with_artifacts_code_or_each_other(tmp_path, three_seeds, packed_code_bytes, capsys):
    logs, arts, _ = three_seeds
    # artifacts in the wrong order: sizes differ from the logs' model bytes (tiny models differ by a few bytes)
    sizes = [os.path.getsize(a) for a in arts]
    if len(set(sizes)) > 1:
        assert build(tmp_path, logs, arts[::-1] if sizes[0] != sizes[2] else [arts[1], arts[0], arts[2]], ["--no-plot"]) == 1
        assert "says the model is" in capsys.readouterr().err
    # an artifact that is not one
    bad = tmp_path / "bad.artifact"
    bad.write_bytes(b"x" * sizes[0])
    assert build(tmp_path, logs, [str(bad), *arts[1:]], ["--no-plot"]) == 1
    assert "magic" in capsys.readouterr().err
    # code the runs did not count
    other = tmp_path / "other.py"
    other.write_text("print('hello')\n")
    assert build(tmp_path, logs, arts, ["--no-plot", "--source", str(other)]) == 1
    assert "not the code the runs used" in capsys.readouterr().err
    # two logs of one seed, and logs of different settings
    dup = make_log(tmp_path / "dup.txt", 1337, 1.09, sizes[0], packed_code_bytes)
    assert build(tmp_path, [logs[0], dup], extra=["--no-plot"]) == 1
    assert "same seed" in capsys.readouterr().err
    lines = read_lines(logs[2])
    lines[0] = lines[0].replace("matrix_lr=0.026", "matrix_lr=0.03")
    (tmp_path / "lr.txt").write_text("\n".join(lines) + "\n")
    assert build(tmp_path, [logs[0], str(tmp_path / "lr.txt")], extra=["--no-plot"]) == 1
    assert "matrix_lr=0.03 vs 0.026" in capsys.readouterr().err
    # a foreign file given as a log
    assert build(tmp_path, [logs[0], os.path.join(REPO, "README.md")], extra=["--no-plot"]) == 1
    assert "not a train_gpt.py log" in capsys.readouterr().err
    assert not (tmp_path / "records" / "2026-11-24_Tiny_Test").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda sub: sub["seed_results"][1].update(val_bpb=sub["seed_results"][1]["val_bpb"] - 0.001), "seed 42: val_bpb"),
    (lambda sub: sub.update(val_bpb=sub["val_bpb"] - 1e-6), "submission.json val_bpb"),
    (lambda sub: sub.update(val_bpb_std=0.0), "val_bpb_std"),
    (lambda sub: sub.update(bytes_total=sub["bytes_total"] - 1), "bytes_total"),
    (lambda sub: sub["seed_results"][0].update(bytes_model=sub["seed_results"][0]["bytes_model"] + 1), "bytes_model"),
    (lambda sub: sub["seed_results"][2].update(steps=999), "steps"),
    (lambda sub: sub.update(bytes_code=123), "bytes_code"),
])
def test_check_refuses_a_json_that_disagrees_with_the_logs(tmp_path, three_seeds, edit, message, capsys):
    logs, arts, _ = three_seeds
    assert build(tmp_path, logs, arts, ["--no-plot"]) == 0
    folder = tmp_path / "records" / "2026-11-24_Tiny_Test"
    sub = json.loads((folder / "submission.json").read_text())
    edit(sub)
    (folder / "submission.json").write_text(json.dumps(sub))
    capsys.readouterr()
    assert package_record.main(["--check", str(folder)]) == 1
    assert message in capsys.readouterr().err


def test_check_refuses_edited_logs_code_and_missing_files(tmp_path, three_seeds, capsys):
    logs, arts, _ = three_seeds
    assert build(tmp_path, logs, arts, ["--no-plot"]) == 0
    folder = tmp_path / "records" / "2026-11-24_Tiny_Test"
    pristine = tmp_path / "pristine"
    shutil.copytree(folder, pristine)

    def fresh():
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder)

    log = folder / "train_seed42.txt"
    log.write_text(log.read_text().replace("val_bpb:1.08120000", "val_bpb:1.07120000"))  # a log changed after the fact
    assert any("seed 42: val_bpb" in p for p in package_record.check_folder(str(folder)))
    fresh()
    lines = read_lines(folder / "train_seed1337.txt")
    (folder / "train_seed1337.txt").write_text("\n".join(lines[:12]) + "\n")  # an unfinished log
    assert any("unfinished" in p for p in package_record.check_folder(str(folder)))
    fresh()
    (folder / "train_gpt.py").write_bytes((folder / "train_gpt.py").read_bytes() + b"\n")  # code that is not the counted one
    assert any("not the code the runs counted" in p for p in package_record.check_folder(str(folder)))
    fresh()
    os.remove(folder / "requirements.txt")
    assert package_record.check_folder(str(folder)) == [f"{folder}: requirements.txt is missing"]
    fresh()
    assert package_record.check_folder(str(folder)) == []
    other = tmp_path / "other.artifact"
    write_artifact(other, tiny_state(7), tg.Hyperparameters(**TINY))
    assert package_record.check_folder(str(folder), [arts[0], arts[1], str(other)]) != []


# ---------------------------------------------------------------------------------------------------
# size audit
# ---------------------------------------------------------------------------------------------------

def test_size_audit_numbers_add_up(tmp_path, monkeypatch, packed_code_bytes, capsys):
    h = tg.Hyperparameters(**TINY, quant_method="rtn")  # round to nearest: the state dict gives the payload again
    state = tiny_state(0)
    torch.save(state, tmp_path / "final_model.pt")
    art, size = write_artifact(tmp_path / tg.ARTIFACT_NAME, state, h)
    r = size_audit.audit(str(tmp_path / "final_model.pt"), art, os.path.join(REPO, "train_gpt.py"), quality=11, h=h)
    payload = tg.decompress_artifact(Path(art).read_bytes())
    (meta_len,) = struct.unpack_from("<I", payload, 0)
    meta = json.loads(payload[4:4 + meta_len])
    groups = r["groups"]
    data_groups = [g for name, g in groups.items() if name != "index"]
    # per-group raw bytes sum to the payload's data bytes, and with the index to the whole payload
    assert sum(g["raw_bytes"] for g in data_groups) == r["payload_data_bytes"] == sum(meta["sizes"].values())
    assert r["payload_data_bytes"] + groups["index"]["raw_bytes"] == r["payload_bytes"] == len(payload)
    assert groups["index"]["raw_bytes"] == 4 + meta_len
    # the real artifact total is the file size; the total adds the packed code; headroom to 16 MB
    assert r["artifact_bytes"] == size == os.path.getsize(art)
    assert r["code"]["packed_bytes"] == packed_code_bytes and r["code"]["raw_bytes"] == os.path.getsize(os.path.join(REPO, "train_gpt.py"))
    assert r["total_bytes"] == size + packed_code_bytes and r["headroom_bytes"] == 16_000_000 - size - packed_code_bytes
    assert r["state_matches_artifact"] is True
    # groups hold what the tensor classes say, and each group compresses alone as brotli-11 would
    assert groups["embedding"]["params"] == TINY["vocab_size"] * TINY["model_dim"]
    q_emb = state["tok_emb.weight"]
    expected_emb = tg.quantize_state_dict({"tok_emb.weight": q_emb}, h)["tok_emb.weight"]["q"].numpy().astype("i1").tobytes()
    assert groups["embedding"]["raw_bytes"] == len(expected_emb)
    assert groups["embedding"]["compressed_bytes"] == len(brotli.compress(expected_emb, quality=11))
    int_names = [n for n, t in state.items() if t.ndim == 2 and t.numel() > h.float_max_numel or tg.is_gate_matrix(n, t)]
    assert groups["scales"]["raw_bytes"] == 2 * sum(state[n].shape[0] for n in int_names)
    assert groups["float16"]["raw_bytes"] == 2 * sum(t.numel() for n, t in state.items() if n not in int_names)
    assert groups["attention"]["tensors"] > 0 and groups["mlp"]["tensors"] > 0
    assert r["groups_compressed_sum"] == sum(g["compressed_bytes"] for g in groups.values())
    # from the state dict alone: the artifact is made as a run makes it
    r2 = size_audit.audit(str(tmp_path / "final_model.pt"), None, None, quality=11, h=h)
    assert r2["artifact_bytes"] == size and r2["groups"] == groups and r2["headroom_bytes"] == 16_000_000 - size
    # the command line reads the Hyperparameters from the environment, as a run does
    for k, v in {**TINY, "quant_method": "rtn"}.items():
        monkeypatch.setenv(k.upper(), str(v))
    capsys.readouterr()
    assert size_audit.main(["--artifact", art, "--state", str(tmp_path / "final_model.pt")]) == 0
    out = capsys.readouterr().out
    assert f"artifact {size:,} B" in out and f"headroom to 16,000,000: {16_000_000 - size - packed_code_bytes:,} B" in out
    assert "re-quantizes to the artifact's payload: yes" in out
    monkeypatch.setenv("EMBED_BITS", "8")  # other settings: the state dict no longer gives this artifact
    assert size_audit.main(["--artifact", art, "--state", str(tmp_path / "final_model.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state_matches_artifact"] is False
    bad = tmp_path / "bad.artifact"
    bad.write_bytes(b"not an artifact at all")
    assert size_audit.main(["--artifact", str(bad)]) == 2


# ---------------------------------------------------------------------------------------------------
# Welch test
# ---------------------------------------------------------------------------------------------------

def test_t_distribution_tail_matches_scipy():
    from scipy import stats
    for dof in (1, 1.5, 2, 2.7352, 4, 7.3, 30, 250):
        for t in (-6.0, -1.3, 0.0, 0.2, 1.0, 2.5, 4.1, 12.0, 60.0):
            assert significance.t_sf(t, dof) == pytest.approx(stats.t.sf(t, dof), rel=1e-9, abs=1e-15)


def test_welch_test_matches_scipy():
    from scipy import stats
    rng = np.random.default_rng(0)
    decisions = set()
    for trial in range(40):
        n_rec, n_new = int(rng.integers(2, 6)), int(rng.integers(2, 6))
        rec = rng.normal(2.24, rng.uniform(0.0003, 0.004), n_rec)
        new = rng.normal(2.24 - rng.uniform(0.0, 0.02), rng.uniform(0.0003, 0.004), n_new)
        res = significance.welch(significance.Sample("record", float(np.mean(rec)), float(np.std(rec, ddof=1)), n_rec, None, ""),
                                 significance.Sample("new", float(np.mean(new)), float(np.std(new, ddof=1)), n_new, None, ""))
        ref = stats.ttest_ind(rec - 0.005, new, equal_var=False, alternative="greater")
        assert res["t"] == pytest.approx(ref.statistic, rel=1e-9)
        assert res["p"] == pytest.approx(ref.pvalue, rel=1e-7, abs=1e-14)
        if hasattr(ref, "df"):
            assert res["dof"] == pytest.approx(ref.df, rel=1e-9)
        assert res["significant"] == bool(ref.pvalue < 0.01 and np.mean(rec) - np.mean(new) > 0.005)
        decisions.add(res["significant"])
    assert decisions == {True, False}  # both outcomes were exercised


def test_significance_cli_converts_bpb_to_nats_and_prints_its_numbers(tmp_path, capsys):
    from scipy import stats
    ratio = 2.0707
    new_bpb, rec = [1.0701, 1.0705, 1.0699], (1.0761, 0.0007, 3)
    code = significance.main(["--new-bpb", *map(str, new_bpb), "--record-stats", *map(str, rec), "--ratio", str(ratio)])
    out = capsys.readouterr().out
    ref = stats.ttest_ind_from_stats(rec[0] * ratio - 0.005, rec[1] * ratio, 3, np.mean(new_bpb) * ratio,
                                     np.std(new_bpb, ddof=1) * ratio, 3, equal_var=False, alternative="greater")
    assert code == (0 if ref.pvalue < 0.01 else 1)
    for label in ("mean", "std", "dof", " t ", "one-sided p", "PASS" if code == 0 else "FAIL"):
        assert label in out
    assert f"t {ref.statistic:.6f}" in out and f"p {ref.pvalue:.6g}" in out
    # 0.005 nats = 0.005 / ratio ≈ 0.0024 bpb: a clean 0.003 bpb gain passes, a 0.002 one does not (with the
    # threshold compared against bpb directly, both would fail)
    assert 0.002 < 0.005 / ratio < 0.003
    base = [1.0800, 1.0801, 1.0802]
    for gain, expect in ((0.003, 0), (0.002, 1)):
        args = ["--new-bpb", *(str(b - gain) for b in base), "--record-bpb", *map(str, base), "--ratio", str(ratio)]
        assert significance.main(args) == expect
    capsys.readouterr()
    # from logs: each run's own val_loss, no conversion; the record's ratio comes from its logs
    rec_logs = [make_log(tmp_path / f"r{s}.txt", s, b, 1000, 100) for s, b in zip((1, 2, 3), base)]
    new_logs = [make_log(tmp_path / f"n{s}.txt", s, b - 0.004, 1000, 100) for s, b in zip((1, 2, 3), base)]
    assert significance.main(["--new-logs", *new_logs, "--record-logs", *rec_logs, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rec_loss = [logparse.parse_log(p).val_loss for p in rec_logs]
    new_loss = [logparse.parse_log(p).val_loss for p in new_logs]
    assert res["record_values"] == rec_loss and res["new_values"] == new_loss
    ref = stats.ttest_ind(np.array(rec_loss) - 0.005, new_loss, equal_var=False, alternative="greater")
    assert res["p"] == pytest.approx(ref.pvalue, rel=1e-7) and res["t"] == pytest.approx(ref.statistic, rel=1e-9)
    # bpb values without any ratio are refused; an unfinished log is refused
    assert significance.main(["--new-bpb", "1.0", "1.1", "--record-bpb", "1.2", "1.3"]) == 2
    died = make_log(tmp_path / "died.txt", 9, 1.0, 1000, 100, finished=False)
    assert significance.main(["--new-logs", died, new_logs[0], "--record-logs", *rec_logs]) == 2
    assert "unfinished" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# multi-seed runner
# ---------------------------------------------------------------------------------------------------

FAKE_TRAIN = """
import os, sys
seed, out, rid = int(os.environ["SEED"]), os.environ["OUTPUT_DIR"], os.environ["RUN_ID"]
os.makedirs(os.path.join(out, "logs"), exist_ok=True)
lines = open(sys.argv[1]).read().splitlines()
lines[0] = lines[0].replace("run_id=quality6 seed=1337", f"run_id={rid} seed={seed}")
if seed in (42, 5):
    lines = lines[:12]  # dies mid-training (42 exits 1, 5 exits 0 regardless)
with open(os.path.join(out, "logs", rid + ".txt"), "w") as f:
    f.write("\\n".join(lines) + "\\n")
if seed == 7:
    os.remove(os.path.join(out, "logs", rid + ".txt"))
sys.exit(1 if seed in (42, 7) else 0)
"""


def test_multi_seed_runs_every_seed_and_reports_the_failed_ones(tmp_path, capsys):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    root = tmp_path / "runs"
    code = multi_seed.main(["--seeds", "1337", "42", "7", "5", "2025", "--name", "exp", "--out-root", str(root),
                            "--", sys.executable, str(script), QUALITY])
    out = capsys.readouterr().out
    assert code == 1
    summary = json.loads((root / "exp_seeds.json").read_text())["seeds"]
    assert [r["seed"] for r in summary] == [1337, 42, 7, 5, 2025]
    assert [r["ok"] for r in summary] == [True, False, False, False, True]
    assert [r["returncode"] for r in summary] == [0, 1, 1, 0, 0]
    for r in summary:
        if r["ok"]:
            log = logparse.parse_log(r["log"])
            assert log.seed == r["seed"] and log.run_id == f"exp_seed{r['seed']}" == r["run_id"]
            assert r["log"] == str(root / r["run_id"] / "logs" / f"{r['run_id']}.txt") and r["val_bpb"] == 1.10675416
    assert "unfinished" in summary[1]["error"] and "no log" in summary[2]["error"]
    assert "no final score" in summary[3]["error"] and summary[3]["steps"] == 6
    assert "2/5 seeds finished" in out and out.count("FAILED") == 3
    assert "tools/submission/significance.py --new-logs" in out
    # all seeds fine: exit 0
    assert multi_seed.main(["--seeds", "1", "2", "--name", "ok", "--out-root", str(root), "--", sys.executable, str(script), QUALITY]) == 0


# ---------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------

def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_a_png_of_the_expected_size(tmp_path, capsys):
    lines = read_lines(QUALITY)
    i = lines.index(next(l for l in lines if l.startswith("step:400/")))
    lines.insert(i + 1, "step:400/20000 val_loss:2.9000 val_bpb:1.4000 train_time:62600ms step_avg:156.50ms")
    with_val = tmp_path / "with_val.txt"
    with_val.write_text("\n".join(lines) + "\n")
    died = tmp_path / "died.txt"
    died.write_text("\n".join(lines[:14]) + "\n")
    out = tmp_path / "curves.png"
    assert plot_logs.main([QUALITY, THROUGHPUT, str(with_val), str(died), "-o", str(out), "--title", "t"]) == 0
    assert png_size(out) == (1200, 800) and os.path.getsize(out) > 20_000
    assert plot_logs.main([QUALITY, "-o", str(tmp_path / "small.png"), "--size", "6x4", "--dpi", "50"]) == 0
    assert png_size(tmp_path / "small.png") == (300, 200)
    assert plot_logs.main([os.path.join(REPO, "README.md"), "-o", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_size_audit_says_what_it_cannot_recheck_of_a_gptq_artifact(tmp_path, monkeypatch, capsys):
    h = tg.Hyperparameters(**TINY)  # QUANT_METHOD=gptq, the default
    state = tiny_state(0)
    torch.save(state, tmp_path / "final_model.pt")
    torch.manual_seed(1)
    hessians = {}
    for name, t in state.items():
        if t.ndim == 2 and t.numel() > h.float_max_numel:
            x = torch.randn(4 * t.shape[1], t.shape[1])
            hessians[name] = x.T @ x
    blob = tg.compress_artifact(tg.serialize_quantized(tg.quantize_state_dict(state, h, hessians)), h.compressor)
    (tmp_path / "gptq.artifact").write_bytes(blob)
    r = size_audit.audit(str(tmp_path / "final_model.pt"), str(tmp_path / "gptq.artifact"), None, h=h)
    assert r["state_matches_artifact"] is None
    assert r["recheck"] == {"layout": True, "scales": True, "float16": True, "integers": False}
    for k, v in TINY.items():
        monkeypatch.setenv(k.upper(), str(v))
    capsys.readouterr()
    assert size_audit.main(["--artifact", str(tmp_path / "gptq.artifact"), "--state", str(tmp_path / "final_model.pt")]) == 0
    out = capsys.readouterr().out
    assert "tensor layout yes, row scales yes, float16 tensors yes" in out
    assert "integers (and LQER factors) cannot be re-checked" in out and "NO" not in out
