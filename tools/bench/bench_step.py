#!/usr/bin/env python3
"""Time train_gpt.py's training step on one GPU at the per-GPU batch of an 8-GPU run, and say where the time goes.

  DATA_PATH=... TOKENIZER_PATH=... python3 tools/bench/bench_step.py        # any train_gpt.py variable applies
  DATA_PATH=... TOKENIZER_PATH=... torchrun --standalone --nproc_per_node=2 tools/bench/bench_step.py   # with communication

Prints, after compiling and warming up:
  - ms per micro-step (one GPU's share of a step on 8 GPUs: BENCH_MICRO_TOKENS, default 48 × 2048) and for the
    full 786,432-token step run on this one GPU as 8 micro-steps (the proxy protocol's throughput figure);
  - tokens/s, model FLOP utilisation against this GPU's measured bf16 matmul rate, peak memory;
  - forward+backward and optimizer (with clipping and the EMA) times from CUDA events, and the kernel time of
    one step by class from the profiler: attention, matmuls, loss, communication and the other kernels.
Under torchrun each GPU runs one micro-step of BENCH_MICRO_TOKENS per step and the gradients are reduced as in
training (Muon's reduce-scatter and all-gather, the rest all-reduced); rank 0 prints.
Medians over BENCH_STEPS timed steps (CUDA events), after BENCH_WARMUP untimed ones; BENCH_TOP kernels listed (12). With NUM_LOOPS > 0 it times
the looped layout (set NUM_LOOPS=0 for the plain one). BENCH_DOC_MASK=1 makes DOC_ATTENTION=1 use the explicit
mask with SDPA instead of the varlen kernel, to compare the two. FP8_MATMULS=1 times the block matrices in FP8
(scaled as FP8_SCALING says).
MUON_COMPILE_MODE=default times Muon's update compiled (eager by default); the optimizer figure shows the difference.
BENCH_COMPILE_MODE sets torch.compile's mode for the model (default: "default"; "reduce-overhead" replays the
forward and backward as CUDA graphs, which train_gpt.py does not offer: a "skipping cudagraphs" warning in the
output says where they were not used).
"""
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train_gpt as tg  # noqa: E402

KERNEL_CLASSES = (  # first match wins; names as the profiler reports CUDA kernels
    ("communication", re.compile(r"nccl", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I)),
    ("loss", re.compile(r"softcap_ce|cross_entropy|log_softmax|nll_loss", re.I)),
    # Inductor's pointwise and reduction kernels are named after the ops they fuse, a matmul among them at times
    # ("triton_red_fused__scaled_mm__to_copy_abs_amax_…": FP8_MATMULS's casts): never a matmul themselves
    ("other", re.compile(r"^triton_(poi|red|per)_")),
    # cuBLAS's FP8 GEMMs ("sm90_xmma_gemm_e4m3…", "nvjet_…") match as the bf16 ones do
    ("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|matmul|_mm_|scaled_mm", re.I)),
)


def measured_bf16_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 20 / (start.elapsed_time(end) / 1000) / 1e12


def flops_per_token(h: tg.Hyperparameters, model: tg.GPT) -> float:
    """6·N for the matmuls (tied embedding counted once, as the head; a looped block once per pass) + causal
    attention's two products (6·T·d per block pass), for the layout the model trains in now."""
    encoder, decoder = model.layout()
    block_params = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    params = sum(p.numel() for p in model.parameters()) + sum(block_params[i] for i in encoder + decoder) - sum(block_params)
    return 6 * params + 6 * len(encoder + decoder) * h.train_seq_len * h.model_dim


def classify(name: str) -> str:
    return next((label for label, pattern in KERNEL_CLASSES if pattern.search(name)), "other")


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_step.py measures a GPU: none is visible")
    micro_tokens = int(os.environ.get("BENCH_MICRO_TOKENS", 48 * 2048))
    steps, warmup = int(os.environ.get("BENCH_STEPS", 50)), int(os.environ.get("BENCH_WARMUP", 10))
    runtime = tg.setup_distributed()  # under torchrun: one micro-step per GPU, then the reduction
    world_size, device = runtime.world_size, runtime.device
    os.environ.setdefault("TRAIN_BATCH_TOKENS", str(micro_tokens * world_size))
    os.environ.setdefault("GRAD_ACCUM_STEPS", "1")
    h = tg.Hyperparameters.from_env()
    if os.environ.get("BENCH_DOC_MASK") == "1":
        tg.VARLEN_DEVICES = ()
    torch.manual_seed(h.seed)
    model = tg.GPT(h).to(device)
    tg.use_device_paths(model, h, device)
    fp8 = model.set_fp8(h.fp8_matmuls, h.fp8_scaling)  # as train_and_export does for training
    model.set_training_batches(True)  # the training loop's varlen capacity, as train() sets it
    params = sum(p.numel() for p in model.parameters())
    optimizers = tg.build_optimizers(model, h, runtime)
    ema = tg.EMA(model, h.ema_decay)
    compile_mode = os.environ.get("BENCH_COMPILE_MODE", "default")
    loss_fn = torch.compile(model, mode=compile_mode) if h.compile else model
    loader = tg.DistributedTokenLoader(h.data_path, runtime)

    def step(i: int, marks=None):
        tg.set_schedule(optimizers, i, 0.5, h)
        if marks:
            marks[0].record()
        tg.forward_backward(loss_fn, loader, h, 1, runtime)
        if marks:
            marks[1].record()
        tg.optimizer_step(model, optimizers, h.grad_clip_norm, world_size)
        ema.update(model)
        if marks:
            marks[2].record()

    start = time.perf_counter()
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    timings = []
    for i in range(steps):
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        step(warmup + i, marks)
        timings.append(marks)
    torch.cuda.synchronize()
    fwd_bwd = statistics.median(m[0].elapsed_time(m[1]) for m in timings)
    optim = statistics.median(m[1].elapsed_time(m[2]) for m in timings)
    # back to back, without the events between phases: what the training loop sees
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for i in range(steps):
        step(warmup + steps + i)
    t1.record()
    torch.cuda.synchronize()
    loop_ms = t0.elapsed_time(t1) / steps
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(3):
            step(warmup + 2 * steps + i)
        torch.cuda.synchronize()
    by_class: dict[str, float] = {}
    for evt in prof.key_averages():
        device_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if evt.device_type == torch.autograd.DeviceType.CUDA and device_us:
            by_class[classify(evt.key)] = by_class.get(classify(evt.key), 0.0) + device_us / 1000 / 3
    kernel_total = sum(by_class.values())

    peak = measured_bf16_tflops()
    tokens_per_s = micro_tokens / (loop_ms / 1000)
    mfu = flops_per_token(h, model) * tokens_per_s / (peak * 1e12)
    micro_steps = tg.Hyperparameters().train_batch_tokens // (micro_tokens * world_size)  # of the 786,432-token step
    full_step_ms = micro_steps * fwd_bwd + optim
    if not runtime.is_main:
        return
    print(f"device: {torch.cuda.get_device_name()} × {world_size} torch {torch.__version__} attention: "
          f"{'flash_attn_3' if tg._flash_attn_3 is not None else 'sdpa'} fused_ce: {model.fused_ce} compile: {h.compile} "
          f"fp8_matmuls: {fp8}{f' ({h.fp8_scaling})' if fp8 else ''} "
          f"muon_compile: {h.muon_compile_mode if h.compile else 'eager'} "
          f"model_compile: {compile_mode if h.compile else 'eager'}")
    print(f"model_params: {params} micro_batch_tokens: {micro_tokens} warmup+compile: {compile_s:.1f}s "
          f"block passes: {sum(map(len, model.layout()))} doc_attention: {h.doc_attention} "
          f"varlen: {tg.VARLEN_KERNEL if tg.VARLEN_DEVICES else 'none (mask)'}")
    print("| measure | value |\n|---|---|")
    print(f"| ms per micro-step (fwd+bwd+optimizer+EMA, back to back) | {loop_ms:.1f} |")
    print(f"| ms forward+backward / optimizer+clip+EMA (median, events) | {fwd_bwd:.1f} / {optim:.1f} |")
    print(f"| ms per full 786,432-token step on {world_size} GPU(s) ({micro_steps} × fwd+bwd + 1 optimizer) | "
          f"{full_step_ms:.0f} |")
    print(f"| tokens/s per GPU (micro-steps back to back) | {tokens_per_s:,.0f} |")
    print(f"| MFU vs measured bf16 matmul ({peak:.0f} TFLOP/s) | {100 * mfu:.1f}% |")
    print(f"| peak memory allocated | {peak_gib:.1f} GiB |")
    for label in ("matmul", "attention", "loss", "other", "communication"):
        print(f"| kernels per step: {label} | {by_class.get(label, 0.0):.1f} ms |")
    print(f"| kernels per step: all (sum of kernel times) | {kernel_total:.1f} ms |")
    top = sorted(((e.key, (getattr(e, 'device_time_total', 0) or 0) / 3000) for e in prof.key_averages()
                  if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda kv: -kv[1])[:int(os.environ.get("BENCH_TOP", 12))]
    print("top kernels (ms per step):")
    for name, ms in top:
        print(f"  {ms:7.2f}  [{classify(name)}] {name[:110]}")


if __name__ == "__main__":
    main()
