"""The script run as a competitor runs it: smoke preset, torchrun with 2 gloo ranks, and the packed form."""
import math
import os
import re
import sys

import numpy as np
import torch

import train_gpt as tg
from conftest import REPO, SAMPLE_TOKENIZER, run_script

import pack_script  # noqa: E402

SCRIPT = os.path.join(REPO, "train_gpt.py")
FINAL = re.compile(r"^final_int6_rans_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)$")
SHORT_RUN = {"ITERATIONS": "3", "TRAIN_LOG_EVERY": "1", "BROTLI_QUALITY": "5", "VAL_TOKENS_LIMIT": "2048"}


def final_bpb(stdout: str) -> float:
    last = stdout.strip().splitlines()[-1]
    match = FINAL.match(last)
    assert match, f"last line is not the round-trip score: {last!r}"
    return float(match.group(2))


def test_smoke_run_trains_exports_and_scores_the_reloaded_artifact(tmp_path):
    # no wall-clock stop: on a loaded machine the preset's 300 s could end the run before its 100 steps
    out = run_script([sys.executable, SCRIPT], {"RUN_ID": "smoke", "MAX_WALLCLOCK_SECONDS": "100000"}, str(tmp_path))
    bpb = final_bpb(out)
    total = int(re.search(r"Total submission size int6\+rans: (\d+) bytes", out).group(1))
    model_bytes = int(re.search(r"Serialized model int6\+rans: (\d+) bytes", out).group(1))
    assert model_bytes == os.path.getsize(tmp_path / tg.ARTIFACT_NAME)
    assert model_bytes < total <= 16_000_000
    assert (tmp_path / "logs" / "smoke.txt").read_text().strip().splitlines()[-1] == out.strip().splitlines()[-1]
    assert re.search(r"^step:100/100 train_loss:[\d.]+ train_time:\d+ms step_avg:[\d.]+ms$", out, re.M)
    # it learned: far better than a uniform guess over the vocabulary
    val = np.concatenate([tg.read_shard(p) for p in tg.shard_paths(os.path.join(REPO, "data", "sample"), "val")])
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=SAMPLE_TOKENIZER)
    uniform_bpb = (val.size - 1) * math.log2(1024) / tg.target_byte_counts(val, tg.token_byte_tables(sp)).sum()
    assert bpb < 0.8 * uniform_bpb
    pre_quant = float(re.search(r"pre_quant_ema step:\d+ val_loss:[\d.]+ val_bpb:([\d.]+)", out).group(1))
    assert abs(bpb - pre_quant) < 0.1  # the artifact scores like the model it came from


def test_two_gloo_ranks_equal_one_process_and_the_packed_script_runs_the_same(tmp_path):
    single, double, packed = (tmp_path / d for d in ("single", "double", "packed"))
    for d in (single, double, packed):
        d.mkdir()
    out1 = run_script([sys.executable, SCRIPT], {**SHORT_RUN, "GRAD_ACCUM_STEPS": "2"}, str(single))
    out2 = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT],
                      {**SHORT_RUN, "GRAD_ACCUM_STEPS": "1"}, str(double))
    assert "world_size:2" in out2 and "grad_accum_steps:1" in out2 and "grad_accum_steps:2" in out1
    a = torch.load(single / "final_model.pt")
    b = torch.load(double / "final_model.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=2e-5, rtol=1e-4), name
    assert abs(final_bpb(out1) - final_bpb(out2)) < 1e-3

    # the packed script with Triton really compiling its kernels' definitions, as on a GPU machine
    packed_script = packed / "train_gpt.py"
    packed_script.write_bytes(pack_script.pack_source(open(SCRIPT, encoding="utf-8").read()))
    env = {**SHORT_RUN, "GRAD_ACCUM_STEPS": "2", "DATA_PATH": os.path.join(REPO, "data", "sample"),
           "TOKENIZER_PATH": SAMPLE_TOKENIZER, "TRITON_INTERPRET": None}
    out3 = run_script([sys.executable, str(packed_script)], env, str(packed))
    triton = re.search(r"^world_size:1 .* triton:(\S+)$", out3, re.M).group(1)
    assert triton != "none" and not triton.endswith("-interpreter")
    assert out3.strip().splitlines()[-1] == out1.strip().splitlines()[-1]  # same program, same numbers
    code_bytes = int(re.search(r"Code size \(packed\): (\d+) bytes", out3).group(1))
    assert code_bytes == packed_script.stat().st_size
    assert code_bytes == int(re.search(r"Code size \(packed\): (\d+) bytes", out1).group(1))
