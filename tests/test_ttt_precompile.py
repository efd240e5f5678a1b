"""TTT_PRECOMPILE: the side process that compiles LoRA TTT's graphs during training. On the CPU nothing compiles,
so these check the plumbing: when the side process is wanted, that it runs TTT's warm-up alone and exits, that the
run waits for it and logs how it went, that it leaves the training processes cores of their own, and that a failed
run leaves none behind."""
import dataclasses
import os
import sys

import pytest
import torch

import train_gpt as tg
from conftest import REPO, run_script

SCRIPT = os.path.join(REPO, "train_gpt.py")


@pytest.fixture
def smoke(monkeypatch, tmp_path):
    """A smoke run's settings in this process's environment (the side process inherits them), on the CPU."""
    for name in {f.name.upper() for f in tg.fields(tg.Hyperparameters)} & set(os.environ):
        monkeypatch.delenv(name)
    for name, value in {"PRESET": "smoke", "OUTPUT_DIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": "",
                        "TTT_MODE": "lora", "TTT_BATCH_DOCS": "4"}.items():
        monkeypatch.setenv(name, value)
    return tmp_path


def test_the_side_process_runs_ttt_warm_up_alone_and_exits(tmp_path):
    out = run_script([sys.executable, SCRIPT, tg.PRECOMPILE_FLAG], {"TTT_BATCH_DOCS": "4", "DATA_PATH": "/absent"},
                     str(tmp_path), timeout=300)
    assert "ttt_warmup:lora" in out and "ttt_precompile:done" in out  # it read no data: DATA_PATH does not exist
    assert "peak_mem:0MiB" in out  # what it holds beside training (none on the CPU)
    # and ran below this process in the CPU scheduler, leaving the training processes their cores
    assert f"niceness:{min(19, os.nice(0) + tg.PRECOMPILE_NICENESS)}" in out
    assert not os.path.exists(tmp_path / "logs")  # and opened no run log


def test_it_is_wanted_only_where_it_compiles_something(smoke):
    h = tg.Hyperparameters.from_env()
    cpu, gpu = tg.Runtime(), tg.Runtime(device=torch.device("cuda"))
    assert not tg.TTTPrecompile(dataclasses.replace(h, ttt_precompile=True), cpu, print).wanted
    on = dataclasses.replace(h, ttt_precompile=True, compile=True)
    assert tg.TTTPrecompile(on, gpu, print).wanted
    for off in (dict(ttt_precompile=False), dict(ttt_mode="sgd"), dict(compile=False), dict(ttt_eval_only=True),
                dict(ttt_compile_mode="eager")):
        assert not tg.TTTPrecompile(dataclasses.replace(on, **off), gpu, print).wanted, off


def test_the_run_waits_for_the_side_process_and_logs_its_end(smoke):
    lines = []
    precompile = tg.TTTPrecompile(tg.Hyperparameters.from_env(), tg.Runtime(), lines.append)
    precompile.wanted = True  # on the CPU: the same process, compiling nothing
    precompile.start()
    precompile.wait()
    assert lines[0].startswith("ttt_precompile:started pid:") and lines[1].startswith("ttt_precompile:exit:0 ran:")
    with open(precompile.path) as f:
        assert "ttt_precompile:done" in f.read()
    precompile.wait()  # nothing left to wait for: no second line
    assert len(lines) == 2


def test_the_side_process_leaves_two_cores_to_each_training_process():
    assert tg.spare_cores(set(range(16)), 1) == set(range(2, 16))
    assert tg.spare_cores(set(range(64)), 8) == set(range(16, 64))
    assert tg.spare_cores(set(range(16, 32)), 1) == set(range(18, 32))  # a share of the machine: its own lowest
    assert tg.spare_cores({5, 1, 9, 3}, 1) == {5, 9}
    assert tg.spare_cores({0, 1, 2}, 1) is None and tg.spare_cores({0, 1}, 1) is None  # too few: all, niced


def test_the_side_process_is_started_on_the_spare_cores(smoke, monkeypatch):
    pinned, lines = [], []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pinned.append((pid, cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    precompile = tg.TTTPrecompile(tg.Hyperparameters.from_env(), tg.Runtime(), lines.append)
    precompile.wanted = True
    precompile.start()
    pid = precompile.proc.pid
    precompile.wait()
    assert pinned == [(pid, set(range(4, 16)))]
    assert lines[0].startswith(f"ttt_precompile:started pid:{pid} cores:12 log:")


def test_a_failed_side_process_is_named_in_the_log(smoke, monkeypatch):
    monkeypatch.setenv("NUM_HEADS", "3")  # a model GPT refuses: the width does not divide into 3 heads
    lines = []
    precompile = tg.TTTPrecompile(tg.Hyperparameters(), tg.Runtime(), lines.append)
    precompile.wanted = True
    precompile.start()
    precompile.wait()
    assert lines[1].startswith("ttt_precompile:exit:1 ") and f"see {precompile.path}" in lines[1]


def test_a_failed_run_leaves_no_side_process_running(smoke):
    precompile = tg.TTTPrecompile(tg.Hyperparameters.from_env(), tg.Runtime(), lambda line: None)
    precompile.wanted = True
    precompile.start()
    proc = precompile.proc
    precompile.stop()
    assert proc.poll() is not None and proc.returncode != 0  # killed, not finished
    precompile.stop()  # twice is harmless


def test_the_side_process_sets_up_its_device_as_the_run_does(smoke, monkeypatch):
    """The side process takes its device through configure_device, which sets the process-wide settings of a run's
    process (TF32 on CUDA): they are part of torch.compile's cache keys, and a graph compiled without them is never
    found by the run."""
    calls = []
    configure = tg.configure_device
    monkeypatch.setattr(tg, "configure_device", lambda *args: calls.append(args) or configure(*args))
    monkeypatch.setattr(os, "nice", lambda increment: 0)  # the side process's niceness: not this test process's
    tg.setup_distributed()
    tg.precompile_ttt()
    assert calls == [(0, 1), (0, 1)]


@pytest.mark.parametrize("given, expected", [(None, False), ("1", True)])
def test_mixed_order_reductions_are_off_unless_the_environment_asks(monkeypatch, given, expected):
    """configure_compiler (which configure_device calls on CUDA) turns inductor's mixed-order reductions off, the
    same in every process of a run; an explicit TORCHINDUCTOR_MIX_ORDER_REDUCTION is left to decide."""
    import torch._inductor.config as inductor
    monkeypatch.setattr(inductor.triton, "mix_order_reduction", True)
    if given is None:
        monkeypatch.delenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", given)
    tg.configure_compiler()
    assert inductor.triton.mix_order_reduction is expected
