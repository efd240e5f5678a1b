import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU, before train_gpt imports triton

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SAMPLE_TOKENIZER = os.path.join(REPO, "tokenizers", "sample_1024_bpe.model")
# PRESET=proxy as fields: recurrence, document attention, two lanes and SmearGate off (the fast proxy setting),
# for tests of other parts that need neither (and for models of fewer layers than the default loops need)
PROXY = dict(num_loops=0, doc_attention=False, parallel_residual_lanes=1, smear_gate_enabled=False)
# Every architecture switch off: the plain core, for tests written against it
ARCH_OFF = dict(PROXY, xsa_enabled=False, attn_gate_enabled=False, parallel_residual_start=-1)


def run_script(args: list[str], env_overrides: dict[str, str], cwd: str, timeout: int = 600) -> str:
    """Run a training command as a competitor would (PRESET=smoke on the CPU); return its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PRESET")}
    env.update({"PRESET": "smoke", "OUTPUT_DIR": cwd, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""})
    env.update({k: v for k, v in env_overrides.items() if v is not None})
    for name in [k for k, v in env_overrides.items() if v is None]:  # None: unset it
        env.pop(name, None)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture
def sample_tokenizer():
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=SAMPLE_TOKENIZER)


def assert_causal(model, idx: torch.Tensor, t: int, vocab: int) -> None:
    """Changing the tokens after position t leaves the logits at ≤ t unchanged, and does change those after it."""
    changed = idx.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.randint(0, vocab - 7, changed[:, t + 1:].shape)) % vocab
    with torch.no_grad():
        a, b = model.logits(idx), model.logits(changed)
    assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6, rtol=0)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-3  # the changed positions do see their inputs
