"""TTT_PRECOMPILE: the side process that compiles LoRA TTT's graphs during training. On the CPU nothing compiles,
so these check the plumbing: when the side process is wanted, that it runs TTT's warm-up alone and exits, that the
run waits for it and logs how it went, that it leaves the training processes cores of their own, and that a failed
run leaves none behind."""
import dataclasses
import os
import subprocess
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


def test_the_side_processes_leave_two_cores_to_each_training_process_and_share_the_rest():
    assert tg.side_cores(set(range(16)), 1, 0) == set(range(2, 16))
    assert tg.side_cores(set(range(16, 32)), 1, 0) == set(range(18, 32))  # a share of the machine: its own lowest
    assert tg.side_cores({5, 1, 9, 3}, 1, 0) == {5, 9}
    # eight ranks on 64 cores: 16 for training, 48 dealt out six a side process, disjoint
    shares = [tg.side_cores(set(range(64)), 8, rank) for rank in range(8)]
    assert shares[0] == set(range(16, 22)) and shares[7] == set(range(58, 64))
    assert set().union(*shares) == set(range(16, 64)) and sum(map(len, shares)) == 48
    assert tg.side_cores(set(range(7)), 2, 1) == {4, 5, 6}  # shares of one core: every spare one, for each
    assert tg.side_cores({0, 1, 2}, 1, 0) is None and tg.side_cores({0, 1}, 1, 0) is None  # too few: all, niced


@pytest.mark.parametrize("local_rank, cores", [("0", set(range(4, 10))), ("1", set(range(10, 16)))])
def test_each_rank_starts_its_side_process_for_its_gpu_on_its_share_of_the_cores(smoke, monkeypatch, local_rank,
                                                                                  cores):
    pinned, lines = [], []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pinned.append((pid, cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    precompile = tg.TTTPrecompile(tg.Hyperparameters.from_env(), tg.Runtime(), lines.append)
    precompile.wanted = True
    precompile.start()
    pid = precompile.proc.pid
    assert precompile.proc.args[-2:] == [tg.PRECOMPILE_FLAG, local_rank]  # its GPU: the rank's own
    precompile.wait()
    assert pinned == [(pid, cores)]
    assert lines[0].startswith(f"ttt_precompile:started pid:{pid} cores:6 log:")
    with open(precompile.path) as f:
        assert "ttt_precompile:done" in f.read()


def test_the_side_process_reads_its_local_rank_from_its_arguments(tmp_path):
    assert tg.precompile_local_rank([]) == 0 and tg.precompile_local_rank(["3"]) == 3
    for wrong in (["x"], ["-1"], ["1", "2"]):
        with pytest.raises(SystemExit, match="usage: train_gpt.py --ttt-precompile"):
            tg.precompile_local_rank(wrong)
    proc = subprocess.run([sys.executable, SCRIPT, tg.PRECOMPILE_FLAG, "gpu1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "usage: train_gpt.py --ttt-precompile [LOCAL_RANK]" in proc.stderr


def _waiting_rank(rank, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    lines = []
    h = dataclasses.replace(tg.Hyperparameters(), output_dir=out_dir)
    precompile = tg.TTTPrecompile(h, tg.Runtime(rank=rank, world_size=2), lines.append)
    precompile.proc = subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({rank})"])  # rank 1's fails
    precompile.wait()
    with open(os.path.join(out_dir, f"rank{rank}.log"), "w") as f:
        f.write("\n".join(lines))
    torch.distributed.destroy_process_group()


def test_rank_0_logs_every_ranks_side_process(tmp_path):
    torch.multiprocessing.spawn(_waiting_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    line = (tmp_path / "rank0.log").read_text()
    assert line.startswith("ttt_precompile:exit:0,1 ran:")
    assert line.endswith(f"see {tmp_path}/logs/{tg.Hyperparameters().run_id}_ttt_precompile_rank1.txt)")


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
    tg.precompile_ttt(1)
    assert calls == [(0, 1), (1, 1)]  # the side process of local rank 1: that rank's GPU


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
