"""Bad input is refused before anything is trained or written, naming the file or variable; a failed run
never costs an earlier run its files; a dead or hung rank ends the whole job. CPU, the bundled sample."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import train_gpt as tg
from conftest import REPO, SAMPLE_TOKENIZER, run_script

SCRIPT = os.path.join(REPO, "train_gpt.py")
SAMPLE_DIR = os.path.join(REPO, "data", "sample")
SHORT_RUN = {"ITERATIONS": "3", "TRAIN_LOG_EVERY": "1", "VAL_TOKENS_LIMIT": "2048", "GPTQ_CALIBRATION_BATCHES": "2",
             "RUN_ID": "good"}
REFUSAL_SECONDS = 10  # the bar: every refusal within this, torch's import included


@pytest.fixture
def smoke_env(monkeypatch, tmp_path):
    """The environment of a smoke run in this process (short, so old code that trains on ends soon)."""
    ours = {f.name.upper() for f in tg.fields(tg.Hyperparameters)} | set(RECORD_NAMES) | {"RANK", "WORLD_SIZE",
                                                                                         "LOCAL_RANK"}
    for name in ours & set(os.environ):
        monkeypatch.delenv(name)
    for name, value in {"PRESET": "smoke", "OUTPUT_DIR": str(tmp_path), "ITERATIONS": "2",
                        "VAL_TOKENS_LIMIT": "2048"}.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def sample_copy(directory) -> str:
    """The bundled sample's shards, copied to `directory`, to be spoiled there."""
    os.makedirs(directory, exist_ok=True)
    for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        shutil.copyfile(os.path.join(SAMPLE_DIR, name), os.path.join(directory, name))
    return str(directory)


def start_script(env: dict, cwd) -> tuple[int, str, float]:
    """Run train_gpt.py as a user would with PRESET=smoke; (exit status, stdout + stderr, seconds)."""
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PRESET")}
    full.update({"PRESET": "smoke", "OUTPUT_DIR": str(cwd), "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""})
    full.update(env)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, SCRIPT], cwd=cwd, env=full, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------
# Shards: every one checked, before training
# ----------------------------------------------------------------------------------------------------

def test_an_out_of_range_id_in_the_second_train_shard_is_refused_naming_it(smoke_env, tmp_path):
    data = sample_copy(tmp_path / "data")
    tokens = np.array(tg.read_shard(os.path.join(SAMPLE_DIR, "fineweb_train_000000.bin")))[:20000]
    tokens[12345] = 1500
    tg.write_shard(os.path.join(data, "fineweb_train_000001.bin"), tokens)
    smoke_env.setenv("DATA_PATH", data)
    with pytest.raises(SystemExit, match=r"fineweb_train_000001\.bin holds token id 1500 but VOCAB_SIZE=1024"):
        tg.main()
    assert not (tmp_path / "logs").exists() and not (tmp_path / tg.ARTIFACT_NAME).exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_shard_of_zero_tokens_is_refused_naming_it(smoke_env, tmp_path, split):
    data = sample_copy(tmp_path / "data")
    tg.write_shard(os.path.join(data, f"fineweb_{split}_000001.bin"), np.zeros(0, dtype=np.uint16))
    smoke_env.setenv("DATA_PATH", data)
    with pytest.raises(SystemExit, match=rf"fineweb_{split}_000001\.bin: the shard holds 0 tokens"):
        tg.main()


def test_a_train_set_smaller_than_one_micro_step_is_refused(smoke_env, tmp_path):
    data = tmp_path / "data"
    sample_copy(data)
    tg.write_shard(str(data / "fineweb_train_000000.bin"), np.arange(10, 20))
    smoke_env.setenv("DATA_PATH", str(data))
    with pytest.raises(SystemExit, match=r"hold 10 tokens, fewer than the 4097 of one micro-step.*TRAIN_BATCH_TOKENS"):
        tg.main()


def test_check_shards_reads_every_shard_of_a_split(tmp_path):
    for i, top in enumerate((5, 9, 7)):
        tg.write_shard(str(tmp_path / f"fineweb_train_{i:06d}.bin"), np.array([1, top, 2]))
    assert tg.check_shards(str(tmp_path), "train", 10) == 9
    with pytest.raises(SystemExit, match="fineweb_train_000001.bin holds token id 9 but VOCAB_SIZE=9"):
        tg.check_shards(str(tmp_path), "train", 9)
    # with two ranks each reads its share of the shards' ids (shard 1 is rank 1's); both read every header
    assert tg.check_shards(str(tmp_path), "train", 9, rank=0, world_size=2) == 9
    with pytest.raises(SystemExit, match="fineweb_train_000001.bin holds token id 9"):
        tg.check_shards(str(tmp_path), "train", 9, rank=1, world_size=2)
    tg.write_shard(str(tmp_path / "fineweb_train_000003.bin"), np.zeros(0, dtype=np.uint16))
    with pytest.raises(tg.ShardError, match="fineweb_train_000003.bin: the shard holds 0 tokens"):
        tg.check_shards(str(tmp_path), "train", 10, rank=0, world_size=2)


# ----------------------------------------------------------------------------------------------------
# Settings: parsed strictly, range-checked, all at start-up
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", ["ture", "2", "", "enabled", "y"])
def test_a_boolean_outside_the_listed_words_is_refused(smoke_env, raw):
    smoke_env.setenv("XSA_ENABLED", raw)
    with pytest.raises(SystemExit, match="XSA_ENABLED=.* is not a boolean: use one of 1, true, yes, on, 0, false"):
        tg.Hyperparameters.from_env()


@pytest.mark.parametrize("raw,value", [("1", True), ("TRUE", True), ("Yes", True), (" on ", True),
                                       ("0", False), ("False", False), ("NO", False), ("off", False)])
def test_the_listed_boolean_words_are_read(smoke_env, raw, value):
    smoke_env.setenv("XSA_ENABLED", raw)
    assert tg.Hyperparameters.from_env().xsa_enabled is value


@pytest.mark.parametrize("name,raw,message", [
    ("ITERATIONS", "-5", "ITERATIONS=-5 is out of range: it must be at least 1"),
    ("ITERATIONS", "0", "ITERATIONS=0 is out of range"),
    ("MODEL_DIM", "0", "MODEL_DIM=0 is out of range"),
    ("WARMDOWN_FRAC", "1.5", "WARMDOWN_FRAC=1.5 is out of range: it must be between 0 and 1"),
    ("EMA_DECAY", "-0.1", "EMA_DECAY=-0.1 is out of range"),
    ("MATRIX_LR", "-0.01", "MATRIX_LR=-0.01 is out of range: it must be at least 0"),
    ("LOGIT_SOFTCAP", "0", "LOGIT_SOFTCAP=0.0 is out of range: it must be positive"),
    ("MATRIX_BITS", "9", "MATRIX_BITS=9 is out of range: it must be between 2 and 8"),
    ("MUON_NS_STEPS", "6", "MUON_NS_STEPS=6 is out of range: it must be between 1 and 5"),
    ("ADAM_BETA2", "1", "ADAM_BETA2=1.0 is out of range"),
    ("MAX_WALLCLOCK_SECONDS", "nan", "MAX_WALLCLOCK_SECONDS='nan' must be a finite number"),
    ("ITERATIONS", "1e3", "ITERATIONS='1e3' is not an integer"),
    ("EVAL_STRIDE", "999", r"EVAL_STRIDE=999 must be in 1..EVAL_SEQ_LEN=256"),
    ("QUANT_METHOD", "awq", "QUANT_METHOD='awq' is unknown: use one of rtn, gptq"),
    ("MUON_BACKEND", "grma", "MUON_BACKEND='grma' is unknown: use one of polar, gram"),
    ("FP8_SCALING", "column", "FP8_SCALING='column' is unknown: use one of tensor, row"),
    ("MUON_GRAM_MIN_ASPECT", "0.5", "MUON_GRAM_MIN_ASPECT=0.5 is out of range: it must be at least 1"),
    ("MUON_COMPILE_MODE", "reduce-overhead", "MUON_COMPILE_MODE='reduce-overhead' is unknown: use one of default, "),
    ("TTT_PHASE_DOCS", "10,x", "TTT_PHASE_DOCS='10,x' must be document counts"),
])
def test_a_setting_out_of_range_is_refused_before_any_data_is_read(smoke_env, tmp_path, name, raw, message):
    smoke_env.setenv(name, raw)
    smoke_env.setenv("DATA_PATH", str(tmp_path / "absent"))  # the setting, not the data, is what is named
    with pytest.raises(SystemExit, match=message):
        tg.main()
    assert not (tmp_path / "logs").exists()


def test_a_reserve_of_the_whole_wall_clock_cap_is_refused(smoke_env, tmp_path):
    smoke_env.setenv("MAX_WALLCLOCK_SECONDS", "30")
    smoke_env.setenv("QUANT_RESERVE_SECONDS", "30")
    with pytest.raises(SystemExit, match="QUANT_RESERVE_SECONDS=30.0 must be below MAX_WALLCLOCK_SECONDS=30.0"):
        tg.main()
    assert not (tmp_path / "logs").exists()


def test_brotli_without_its_package_is_refused_at_start_not_after_training(smoke_env, tmp_path, monkeypatch):
    real_find_spec = tg.importlib.util.find_spec
    monkeypatch.setattr(tg.importlib.util, "find_spec", lambda name, *a: None if name == "brotli" else real_find_spec(name, *a))
    smoke_env.setenv("COMPRESSOR", "brotli")
    smoke_env.setenv("DATA_PATH", str(tmp_path / "absent"))
    with pytest.raises(SystemExit, match="COMPRESSOR=brotli needs the brotli package: pip install brotli, or set COMPRESSOR=rans"):
        tg.main()
    smoke_env.setenv("COMPRESSOR", "rans")
    tg.Hyperparameters.from_env().validate(world_size=1)  # the other compressors need no package


def test_every_range_names_a_field():
    names = {f.name for f in tg.fields(tg.Hyperparameters)}
    assert set(tg.SETTING_RANGES) <= names
    tg.Hyperparameters().validate(world_size=8)  # the defaults pass, on the 8 GPUs they are made for


def test_an_unknown_preset_is_refused(smoke_env):
    smoke_env.setenv("PRESET", "smok")
    with pytest.raises(SystemExit, match="PRESET='smok' is unknown: use one of pr1512, pr1787, pr1809, pr1812, proxy, "
                                         "smoke, several separated by commas"):
        tg.Hyperparameters.from_env()
    assert tg.PRESETS["smoke"] is tg.SMOKE_PRESET


def test_misspelled_or_unknown_variables_under_our_prefixes_are_warned_about():
    env = {"ITERATONS": "2", "MODLE_DIM": "64", "TTT_LORA_RANKS": "8", "MUON_FOO": "1", "XSA_ENABLED": "1",
           "MUON_WD": "0.1", "PHASED_TTT_NUM_PHASES": "3", "HOME": "/root", "PATH": "/bin", "MAX_JOBS": "4",
           "TORCH_LOGS": "+dynamo", "CUDA_HOME": "/usr/local/cuda", "NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ".", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x",
           "iterations": "5"}
    warnings = tg.unknown_variable_warnings(env)
    assert warnings == [
        "WARNING ITERATONS is not a setting of train_gpt.py and is ignored: did you mean ITERATIONS?",
        "WARNING MODLE_DIM is not a setting of train_gpt.py and is ignored: did you mean MODEL_DIM?",
        "WARNING MUON_FOO is not a setting of train_gpt.py and is ignored: no setting of this script has that name",
        "WARNING TTT_LORA_RANKS is not a setting of train_gpt.py and is ignored: did you mean TTT_LORA_RANK?",
    ]


def test_the_warnings_are_printed_even_when_the_start_is_refused(tmp_path):
    rc, out, _ = start_script({"ITERATONS": "2", "XSA_ENABLED": "nope", "RUN_ID": "w"}, tmp_path)
    assert rc != 0 and "did you mean ITERATIONS?" in out and "XSA_ENABLED='nope' is not a boolean" in out


# ----------------------------------------------------------------------------------------------------
# The published record's names
# ----------------------------------------------------------------------------------------------------

RECORD_NAMES = {"MLP_CLIP_SIGMAS": ("clip_sigmas_mlp", "10.5", 10.5),
                "ATTN_CLIP_SIGMAS": ("clip_sigmas_attn", "12.5", 12.5),
                "EMBED_CLIP_SIGMAS": ("clip_sigmas_embed", "15", 15.0),
                "GPTQ_RESERVE_SECONDS": ("quant_reserve_seconds", "8", 8.0),
                "BETA1": ("adam_beta1", "0.8", 0.8), "BETA2": ("adam_beta2", "0.95", 0.95),
                "TIED_EMBED_LR": ("embed_lr", "0.05", 0.05), "MUON_WD": ("muon_weight_decay", "0.04", 0.04),
                "EMBED_WD": ("embed_weight_decay", "0.07", 0.07), "TTT_BETA1": ("ttt_lora_beta1", "0.1", 0.1),
                "TTT_BETA2": ("ttt_lora_beta2", "0.999", 0.999), "TTT_WEIGHT_DECAY": ("ttt_lora_wd", "0.3", 0.3),
                # names the record shares with us
                "WARMDOWN_FRAC": ("warmdown_frac", "0.7", 0.7), "TTT_LORA_RANK": ("ttt_lora_rank", "64", 64),
                "MATRIX_LR": ("matrix_lr", "0.03", 0.03), "QK_GAIN_INIT": ("qk_gain_init", "4", 4.0),
                "NUM_LOOPS": ("num_loops", "1", 1), "EMA_DECAY": ("ema_decay", "0.99", 0.99)}


@pytest.mark.parametrize("record_name", sorted(RECORD_NAMES))
def test_the_record_names_set_our_fields(smoke_env, record_name):
    field, raw, value = RECORD_NAMES[record_name]
    smoke_env.setenv(record_name, raw)
    h = tg.Hyperparameters.from_env()
    assert getattr(h, field) == value != getattr(tg.Hyperparameters(), field)
    assert tg.unknown_variable_warnings({record_name: raw}) == []


def test_a_record_name_and_ours_set_to_different_values_are_refused(smoke_env):
    smoke_env.setenv("BETA2", "0.95")
    smoke_env.setenv("ADAM_BETA2", "0.950")  # the same number: accepted
    assert tg.Hyperparameters.from_env().adam_beta2 == 0.95
    smoke_env.setenv("ADAM_BETA2", "0.9")
    with pytest.raises(SystemExit, match="BETA2 gives ADAM_BETA2='0.95' but ADAM_BETA2='0.9' is set too"):
        tg.Hyperparameters.from_env()
    smoke_env.delenv("ADAM_BETA2")
    smoke_env.setenv("BETA2", "high")
    with pytest.raises(SystemExit, match="^BETA2='high' is not a number"):  # named as the user wrote it
        tg.Hyperparameters.from_env()


@pytest.mark.parametrize("env,docs", [({"PHASED_TTT_PREFIX_DOCS": "2400", "PHASED_TTT_NUM_PHASES": "3"}, "800,1600,2400"),
                                      ({"PHASED_TTT_PREFIX_DOCS": "2000"}, "666,1333,2000"),
                                      ({"PHASED_TTT_PREFIX_DOCS": "1000", "PHASED_TTT_NUM_PHASES": "1"}, "1000"),
                                      ({"PHASED_TTT_NUM_PHASES": "2"}, "1250,2500")])
def test_the_record_phase_count_becomes_cumulative_phase_docs(smoke_env, env, docs):
    for name, value in env.items():
        smoke_env.setenv(name, value)
    assert tg.Hyperparameters.from_env().ttt_phase_docs == docs
    assert tg.Hyperparameters().ttt_phase_docs == "833,1666,2500"  # the record's 2500 in 3 phases


def test_the_lora_adam_betas_are_settings_with_the_values_they_had():
    h = tg.Hyperparameters()
    assert (h.ttt_lora_beta1, h.ttt_lora_beta2) == (0.0, 0.99)


def test_an_unsupported_record_variable_is_warned_as_ignored():
    assert tg.unknown_variable_warnings({"SPARSE_ATTN_GATE_SCALE": "1.0"}) == [
        "WARNING SPARSE_ATTN_GATE_SCALE='1.0' is ignored: the attention gate's logit scale is fixed at 0.5 here "
        "(ATTN_GATE_SCALE)"]
    assert tg.ATTN_GATE_SCALE == 0.5


# ----------------------------------------------------------------------------------------------------
# Nothing lost on failure
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished smoke run: its folder and the bytes of its log, artifact and final state."""
    out = tmp_path_factory.mktemp("good")
    run_script([sys.executable, SCRIPT], SHORT_RUN, str(out))
    files = ("logs/good.txt", tg.ARTIFACT_NAME, "final_model.pt")
    return out, {name: (out / name).read_bytes() for name in files}


def spoiled_second_shard(directory) -> dict:
    data = sample_copy(directory)
    tg.write_shard(os.path.join(data, "fineweb_train_000001.bin"), np.array([1, 5, 1999, 7]))
    return {"DATA_PATH": data}


@pytest.mark.parametrize("case", ["second_shard", "boolean", "preset", "vocab"])
def test_a_failed_start_after_a_good_run_is_quick_named_and_leaves_its_files(good_run, tmp_path, case):
    out, before = good_run
    env, cause = {
        "second_shard": (spoiled_second_shard(tmp_path / "data"), r"fineweb_train_000001\.bin holds token id 1999"),
        "boolean": ({"XSA_ENABLED": "ture"}, "XSA_ENABLED='ture' is not a boolean"),
        "preset": ({"PRESET": "smok"}, "PRESET='smok' is unknown"),
        "vocab": ({"VOCAB_SIZE": "2048"}, "has 1024 pieces but VOCAB_SIZE=2048"),
    }[case]
    rc, text, seconds = start_script({**SHORT_RUN, **env}, out)
    assert rc != 0 and re.search(cause, text), text[-2000:]
    assert seconds < REFUSAL_SECONDS, f"refused after {seconds:.1f} s"
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not any(name.startswith("good.txt.") for name in os.listdir(out / "logs"))


def test_a_started_run_keeps_the_earlier_log_and_writes_its_error_into_its_own(good_run, tmp_path):
    out, before = good_run
    run = tmp_path / "again"
    shutil.copytree(out, run)
    corrupt = run / "corrupt.artifact"
    corrupt.write_bytes(before[tg.ARTIFACT_NAME][:-50])
    env = {**SHORT_RUN, "TTT_EVAL_ONLY": "1", "ARTIFACT_PATH": str(corrupt)}
    for attempt in (1, 2):
        rc, text, _ = start_script(env, run)
        assert rc != 0 and "cannot score the artifact" in text
    log = (run / "logs" / "good_eval.txt").read_text()
    assert log.startswith("run_id=good ") and log.rstrip().splitlines()[-1].startswith("ERROR: cannot score the artifact")
    assert "was kept as" in log and (run / "logs" / "good_eval.txt.1").read_text().startswith("run_id=good ")
    assert (run / "logs" / "good.txt").read_bytes() == before["logs/good.txt"]


def test_the_logger_keeps_an_earlier_log_of_the_same_name(tmp_path):
    h = tg.Hyperparameters(output_dir=str(tmp_path), run_id="r")
    (tmp_path / "logs").mkdir()
    for n, text in enumerate(("first\n", "second\n")):
        (tmp_path / "logs" / "r.txt").write_text(text)
        log = tg.Logger(h, rank=0)
        assert log.kept == str(tmp_path / "logs" / f"r.txt.{n + 1}")
    assert (tmp_path / "logs" / "r.txt.1").read_text() == "first\n"
    assert (tmp_path / "logs" / "r.txt.2").read_text() == "second\n"
    assert (tmp_path / "logs" / "r.txt").read_text() == ""
    tg.Logger.active = None


# ----------------------------------------------------------------------------------------------------
# package_record.py on a run that is not FineWeb
# ----------------------------------------------------------------------------------------------------

def test_package_record_refuses_a_sample_run_unless_labelled_and_reproduces_every_setting(good_run, tmp_path, capsys):
    import package_record
    from logparse import parse_log
    out, _ = good_run
    argv = ["--name", "Sample", "--author", "A", "--github-id", "a", "--date", "2026-11-30", "--no-plot",
            "--records-dir", str(tmp_path / "records"), "--log", str(out / "logs" / "good.txt"),
            "--artifact", str(out / tg.ARTIFACT_NAME)]
    assert package_record.main(argv) == 1
    err = capsys.readouterr().err
    assert "not a FineWeb dataset folder" in err and "VAL_TOKENS_LIMIT=2048" in err and "--not-fineweb" in err
    assert not (tmp_path / "records").exists() or not os.listdir(tmp_path / "records")
    assert package_record.main(argv + ["--not-fineweb"]) == 0
    folder = tmp_path / "records" / "2026-11-30_Sample"
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["not_fineweb"] is True and sub["dataset"] == SAMPLE_DIR
    readme = (folder / "README.md").read_text()
    assert "**Not a FineWeb run**" in readme.splitlines()[2]
    command = next(line.strip() for line in readme.splitlines() if "RUN_ID=<run_id>" in line)
    words = command.split(" python3 ")[0].split()
    env = dict(w.split("=", 1) for w in words if "=" in w)
    assert env["DATA_PATH"] == SAMPLE_DIR and env["TOKENIZER_PATH"] == SAMPLE_TOKENIZER and env["VOCAB_SIZE"] == "1024"
    env = {k: v for k, v in env.items() if k not in ("SEED", "RUN_ID")}
    logged = parse_log(str(out / "logs" / "good.txt")).hparams
    rebuilt = tg.Hyperparameters.from_env(env)  # the command alone, no preset: the run's settings, every one
    for name, value in logged.items():
        if name not in ("run_id", "seed", "output_dir"):
            assert getattr(rebuilt, name) == value, name
    assert package_record.main(["--check", str(folder)]) == 0


# ----------------------------------------------------------------------------------------------------
# Distributed faults: a dead or hung rank ends the job
# ----------------------------------------------------------------------------------------------------

RANK_PROGRAM = """
import os, sys, time
import torch
sys.path.insert(0, {repo!r})
import train_gpt as tg

def body():
    runtime = tg.setup_distributed(timeout_seconds=3.0)
    if runtime.rank == 1:
        if {fault!r} == "dies":
            os._exit(0)
        time.sleep(600)  # hangs, never joining the collective
    tg.all_reduce_mean([torch.ones(3)], runtime.world_size)
    print("all_reduce returned", flush=True)

tg.run_guarded(body)
"""


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_ends_the_other_with_a_clear_message(tmp_path, fault):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    program = tmp_path / "ranks.py"
    program.write_text(RANK_PROGRAM.format(repo=REPO, fault=fault))
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, str(program)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    start = time.perf_counter()
    try:
        out, _ = procs[0].communicate(timeout=45)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode != 0 and "all_reduce returned" not in out
    assert "rank 0: a collective failed, so the job stops: another rank died or hangs" in out, out[-2000:]
    assert time.perf_counter() - start < 40
