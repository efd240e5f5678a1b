"""The published stacks' presets (PRESET=pr1787, pr1812, pr1809, pr1512): each names only settings of this script,
each entry differs from the default, each is a valid run at full size on 1 and 8 GPUs, presets combine left to
right under the environment, and each runs end to end at smoke size (PRESET=smoke,<name>, with the few settings
that must shrink with a 4-layer model on 256-token sequences)."""
import re
import sys

import pytest

import train_gpt as tg
from conftest import REPO, run_script

STACKS = ("pr1787", "pr1812", "pr1809", "pr1512")
SHORT_RUN = {"ITERATIONS": "8", "TRAIN_LOG_EVERY": "0", "VAL_TOKENS_LIMIT": "2048", "GPTQ_CALIBRATION_BATCHES": "2"}
# What a preset sets for the full model that the smoke model cannot hold: its sizes, and windows scaled to them.
SMOKE_FIT = {
    "pr1787": {},
    "pr1812": {"TTT_CHUNK_TOKENS": "512", "PARALLEL_RESIDUAL_START": "3"},  # 4 chunks to train on; a parallel layer
    "pr1809": {},
    # sequences of 256 with windows of 64 on 3 of the 4 layers (256 on 8 of 11 at 4096); every matrix int6, so
    # that QAT has matrices to round
    "pr1512": {"TRAIN_SEQ_LEN": "256", "EVAL_SEQ_LEN": "256", "ATTN_WINDOW": "64", "ATTN_WINDOW_LAYERS": "0-2",
               "FLOAT_MAX_NUMEL": "4096"},
}


def header_settings(stdout: str) -> dict[str, str]:
    """The settings line a run logs first: name → value as printed."""
    return dict(item.split("=", 1) for item in stdout.splitlines()[0].split(" "))


def test_presets_name_only_settings_and_change_each_one():
    kinds, defaults = tg.field_kinds(), tg.Hyperparameters()
    for name in STACKS:
        preset = tg.PRESETS[name]
        assert set(preset) <= set(kinds), name
        same = [k for k, v in preset.items() if tg.parse_setting(k, v, kinds[k]) == getattr(defaults, k.lower())]
        assert same == [], f"{name} sets the defaults' own values: {same}"


@pytest.mark.parametrize("name", STACKS)
def test_each_preset_is_a_valid_full_size_run(name):
    h = tg.Hyperparameters.from_env({"PRESET": name})
    for world_size in (1, 8):
        h.validate(world_size=world_size)
    tg.GPT(h)


def test_presets_combine_left_to_right_and_the_environment_wins():
    smoke_then_stack = tg.Hyperparameters.from_env({"PRESET": "smoke,pr1512"})
    assert (smoke_then_stack.model_dim, smoke_then_stack.train_seq_len) == (128, 4096)
    stack_then_smoke = tg.Hyperparameters.from_env({"PRESET": "pr1512,smoke"})
    assert (stack_then_smoke.train_seq_len, stack_then_smoke.attn_window) == (256, 256)
    mine = tg.Hyperparameters.from_env({"PRESET": "smoke,pr1512", "TRAIN_SEQ_LEN": "512", "ATTN_WINDOW": "0"})
    assert (mine.train_seq_len, mine.attn_window, mine.key_offset_dims) == (512, 0, 16)
    with pytest.raises(SystemExit, match=r"PRESET='smoke,pr1521' names 'pr1521', which is unknown: use one of pr1512"):
        tg.Hyperparameters.from_env({"PRESET": "smoke,pr1521"})


@pytest.mark.parametrize("name", STACKS)
def test_each_preset_runs_end_to_end_at_smoke_size(name, tmp_path):
    env = {"PRESET": f"smoke,{name}", "RUN_ID": name, **SHORT_RUN, **SMOKE_FIT[name]}
    out = run_script([sys.executable, f"{REPO}/train_gpt.py"], env, str(tmp_path))
    shown, kinds = header_settings(out), tg.field_kinds()
    for key, raw in tg.PRESETS[name].items():
        if key not in SMOKE_FIT[name]:
            assert shown[key.lower()] == str(tg.parse_setting(key, raw, kinds[key])), key
    assert shown["model_dim"] == "128" and shown["num_layers"] == "4"  # the smoke model
    h = tg.Hyperparameters.from_env(env)
    label = f"int{h.matrix_bits}_{h.compressor}"
    assert re.search(rf"^final_{label}_roundtrip_exact val_loss:[\d.]+ val_bpb:[\d.]+$", out, re.M)
    last = out.strip().splitlines()[-1]
    assert last.startswith("legal_ttt_exact " if h.ttt_mode != "none" else f"final_{label}_roundtrip_exact "), last
    if h.qat_start_frac < 1:
        assert re.search(r"^qat:on step:7 matrices:24$", out, re.M)  # progress 7/8 ≥ 0.85; 4 layers × 6 matrices
    assert f"Total submission size int{h.matrix_bits}+{h.compressor}:" in out
