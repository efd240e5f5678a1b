"""The GPU job scripts under tools/bench/ run only on the device, so CI checks what it can without one: that
every script parses, that a run entry's overrides reach `env` as the entry wrote them, and that side-by-side runs
get disjoint shares of the cores and a summary of each GPU's clocks that leaves its idle samples out, and that
stopping a job ends its processes and no other."""
import glob
import os
import subprocess
import time

import pytest

from conftest import REPO

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "tools", "bench", "*.sh")))


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_every_job_script_parses(script):
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def run_overrides(entry: str) -> str:
    command = 'source tools/bench/device_job.sh && run_overrides "$0"'
    return subprocess.run(["bash", "-c", command, entry], capture_output=True, text=True, cwd=REPO,
                          check=True).stdout.strip()


def test_run_entries_split_at_the_comma_before_each_variable():
    assert run_overrides("bare") == ""
    assert run_overrides("a:X=1,Y_2=two") == "X=1 Y_2=two"
    # a value may hold commas (TTT_PHASE_DOCS, PRESET lists): only a comma before the next VAR= separates
    assert run_overrides("ph:TTT_PHASE_DOCS=7,14,21,SEED=1") == "TTT_PHASE_DOCS=7,14,21 SEED=1"
    assert run_overrides("p:PRESET=smoke,pr1512") == "PRESET=smoke,pr1512"


def device_job(function: str, *args: str) -> str:
    command = f'source tools/bench/device_job.sh && {function} "$@"'
    return subprocess.run(["bash", "-c", command, "device_job", *args], capture_output=True, text=True, cwd=REPO,
                          check=True).stdout.strip()


def test_cpu_shares_are_equal_disjoint_and_cover_the_cores():
    for cores, n in ((32, 2), (16, 3), (64, 4), (2, 2), (7, 1)):
        shares = [device_job("cpu_share", str(k), str(n), str(cores)) for k in range(n)]
        ranges = [tuple(map(int, s.split("-"))) for s in shares]
        used = [c for lo, hi in ranges for c in range(lo, hi + 1)]
        assert len(used) == len(set(used)), shares  # disjoint
        assert {hi - lo for lo, hi in ranges} == {cores // n - 1}, shares  # equal
        assert min(used) == 0 and max(used) < cores and len(used) == n * (cores // n), shares
    # more queues than cores: each still gets one core
    assert [device_job("cpu_share", str(k), "3", "2") for k in range(3)] == ["0-0", "1-1", "0-0"]


def test_gpu_summary_averages_only_the_busy_samples_of_each_gpu(tmp_path):
    samples = tmp_path / "gpu.csv"
    samples.write_text("0, 1980, 650.0, 60, 100\n"
                       "1, 1755, 700.0, 71, 99\n"
                       "0, 345, 80.0, 40, 0\n"        # idle (compiling): left out
                       "0, 1900, 610.0, 62, 97\n"
                       "1, 1805, [N/A], 69, 50\n")    # no power reading: left out of the power mean only
    assert device_job("gpu_summary", str(samples)).splitlines() == [
        "gpu:0 busy_samples:2 sm_mhz_mean:1940 sm_mhz_min:1900 power_w_mean:630 temp_max_c:62",
        "gpu:1 busy_samples:2 sm_mhz_mean:1780 sm_mhz_min:1755 power_w_mean:700 temp_max_c:71",
    ]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (ended, not yet reaped by its parent) counts as ended
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_stop_job_ends_the_job_and_its_children_and_leaves_everything_else(tmp_path):
    job = tmp_path / "job.sh"
    job.write_text('sleep 300 & echo $! > "$(dirname "$0")/child"; wait\n')
    assert device_job("start_job", str(tmp_path), str(job)).startswith("started pid")
    pid = int((tmp_path / "pid").read_text())
    for _ in range(100):
        if (tmp_path / "child").exists() and (tmp_path / "child").read_text().strip():
            break
        time.sleep(0.05)
    child = int((tmp_path / "child").read_text())
    # a process whose command line names the job, as the device call's own shell does: stopping by name takes it
    bystander = subprocess.Popen(["bash", "-c", f"sleep 300 # {job}"])
    try:
        assert alive(pid) and alive(child)
        assert device_job("stop_job", str(tmp_path)) == f"stopped {pid}"
        for _ in range(100):
            if not alive(pid) and not alive(child):
                break
            time.sleep(0.05)
        assert not alive(pid) and not alive(child)
        assert bystander.poll() is None
        assert device_job("stop_job", str(tmp_path)) == "not running"
    finally:
        bystander.kill()


def test_stop_job_ends_children_that_outlive_the_jobs_own_shell(tmp_path):
    # a job whose shell has ended (and been reaped) while its child runs on in the job's process group
    leader = subprocess.Popen(["bash", "-c", f'sleep 300 & echo $! > {tmp_path}/child'], start_new_session=True)
    leader.wait()
    (tmp_path / "pid").write_text(f"{leader.pid}\n")
    child = int((tmp_path / "child").read_text())
    try:
        assert alive(child)
        assert device_job("stop_job", str(tmp_path)) == f"stopped {leader.pid}"
        for _ in range(100):
            if not alive(child):
                break
            time.sleep(0.05)
        assert not alive(child)
    finally:
        if alive(child):
            os.kill(child, 9)
