import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU, before train_gpt imports triton

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBMISSION_TOOLS = os.path.join(REPO, "tools", "submission")  # logparse, package_record, pack_script, ...
BENCH_TOOLS = os.path.join(REPO, "tools", "bench")  # benchmarks and their analysis: quant_bench, compress_bench, ...
for folder in (REPO, SUBMISSION_TOOLS, BENCH_TOOLS):  # the tests import the tools by name
    if folder not in sys.path:
        sys.path.insert(0, folder)

import train_gpt as tg  # noqa: E402  (after TRITON_INTERPRET is set)

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


# Document-bounded attention on the CPU, shared by the document and the sliding-window tests.

def reference_varlen(q, k, v, cu_seqlens, max_len, window=0):
    """What a varlen kernel computes: causal attention inside each packed segment, nothing across them; with
    `window`, only the `window` keys before each query and itself."""
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens[0] == 0 and cu_seqlens[-1] == q.size(0)
    assert max_len >= int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = torch.zeros_like(q)
    for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        if e > s:
            out[s:e] = tg.causal_attention(q[None, s:e], k[None, s:e], v[None, s:e], window=window)[0]
    return out


@pytest.fixture
def packed_path(monkeypatch):
    """The varlen branch on the CPU: the reference kernel in place of FlashAttention's."""
    monkeypatch.setattr(tg, "VARLEN_DEVICES", ("cpu",))
    monkeypatch.setattr(tg, "varlen_causal_attention", reference_varlen)


def documents_of(row: torch.Tensor) -> list[tuple[int, int]]:
    starts = [0] + [t for t in range(1, row.numel()) if row[t] == tg.BOS_ID]
    return list(zip(starts, starts[1:] + [row.numel()]))


# A tiny model of the core architecture, shared by the architecture, parity and recurrence tests.

def tiny_hparams(**overrides) -> tg.Hyperparameters:
    h = tg.Hyperparameters(vocab_size=97, num_layers=5, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8,
                           **ARCH_OFF)  # the baseline: every switch off
    for k, v in overrides.items():
        setattr(h, k, v)
    return h


def sample_hparams(**overrides) -> tg.Hyperparameters:
    """tiny_hparams that train on the bundled sample: batches of 4 sequences of 64 tokens, no wall-clock stop."""
    return tiny_hparams(data_path=os.path.join(REPO, "data", "sample"), vocab_size=1024, train_seq_len=64,
                        train_batch_tokens=256, grad_accum_steps=1, max_wallclock_seconds=0, **overrides)


def make_model(seed: int = 0, **overrides) -> tg.GPT:
    torch.manual_seed(seed)
    return tg.GPT(tiny_hparams(**overrides)).eval()


def perturb(model: tg.GPT, seed: int = 1, scale: float = 0.05) -> None:
    """Zero-initialised projections and gates would hide the features: move every weight a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(scale * torch.randn(p.shape, generator=g))


def baseline_keys(num_layers: int) -> set[str]:
    keys = {"tok_emb.weight", "skip_weights", "skip_gates"}
    for i in range(num_layers):
        keys |= {f"blocks.{i}.attn.{n}" for n in ("q.weight", "k.weight", "v.weight", "proj.weight", "q_gain")}
        keys |= {f"blocks.{i}.mlp.up.weight", f"blocks.{i}.mlp.down.weight"}
        keys |= {f"blocks.{i}.{n}" for n in ("resid_mix", "attn_scale", "mlp_scale")}
    return keys


def baseline_logits(model: tg.GPT, idx: torch.Tensor) -> torch.Tensor:
    """The core model written out by hand from the state dict: sequential pre-norm blocks that read
    mix[0]·x + mix[1]·x0 and scale their outputs per channel, U-Net skips joined by lerp(w·skip, x, σ(g))."""
    sd, h = model.state_dict(), tiny_hparams()
    heads, kv, hd = h.num_heads, h.num_kv_heads, h.model_dim // h.num_heads
    rotary = tg.PartialRotary(h.rope_dims, h.rope_base)
    B, T = idx.shape

    def attn(i, x):
        p = f"blocks.{i}.attn."
        q = (x @ sd[p + "q.weight"].T).view(B, T, heads, hd)
        k = (x @ sd[p + "k.weight"].T).view(B, T, kv, hd)
        v = (x @ sd[p + "v.weight"].T).view(B, T, kv, hd)
        q = rotary(tg.rms_norm(q)) * sd[p + "q_gain"]
        k = rotary(tg.rms_norm(k))
        y = tg.causal_attention(q, k, v).reshape(B, T, -1)
        return y @ sd[p + "proj.weight"].T

    def mlp(i, x):
        p = f"blocks.{i}.mlp."
        return F.leaky_relu(x @ sd[p + "up.weight"].T, 0.5).square() @ sd[p + "down.weight"].T

    x0 = x = tg.rms_norm(sd["tok_emb.weight"][idx])
    n_enc = h.num_layers // 2
    skips = []
    for i in range(h.num_layers):
        if 0 <= i - n_enc < sd["skip_gates"].size(0):
            a = torch.sigmoid(sd["skip_gates"][i - n_enc])
            x = a * x + (1 - a) * sd["skip_weights"][i - n_enc] * skips.pop()
        s, p = 1 / math.sqrt(i + 1), f"blocks.{i}."
        x = sd[p + "resid_mix"][0] * x + sd[p + "resid_mix"][1] * x0
        x = x + sd[p + "attn_scale"] * attn(i, tg.rms_norm(x) * s)
        x = x + sd[p + "mlp_scale"] * mlp(i, tg.rms_norm(x) * s)
        if i < n_enc:
            skips.append(x)
    logits = tg.rms_norm(x) @ sd["tok_emb.weight"].T
    return h.logit_softcap * torch.tanh(logits / h.logit_softcap)


def tokens_with_bos(seed: int = 3, shape=(2, 24)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(2, 97, shape, generator=g)
    idx[:, 0] = tg.BOS_ID
    idx[0, 9] = idx[1, 14] = tg.BOS_ID  # a document boundary inside each sequence
    return idx
