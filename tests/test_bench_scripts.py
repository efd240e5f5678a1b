"""The GPU job scripts under tools/bench/ run only on the device, so CI checks what it can without one: that
every script parses, and that a run entry's overrides reach `env` as the entry wrote them."""
import glob
import os
import subprocess

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
