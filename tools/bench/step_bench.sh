#!/usr/bin/env bash
# tools/bench/attention_bench.py, then tools/bench/bench_step.py once per setting, one after the other on one GPU,
# on the CaseOps proxy shards, from the repo root:
#   STEP_RUNS="base fp8:FP8_MATMULS=1" GPU=1 tools/bench/step_bench.sh start
#   GPU=1 tools/bench/step_bench.sh poll
# A STEP_RUNS entry is NAME or NAME:VAR=V,VAR=V (default: one run of the defaults). Every run times the plain
# layout (NUM_LOOPS=0) over BENCH_STEPS=20 steps unless the entry says otherwise; each compiles into its own cache.
# TESTS="tests/test_fa4_varlen.py ..." runs those test files on the GPU first (GPU-only tests run only there).
# ATTENTION=0 skips attention_bench.py. A PYTHONPATH given at start comes after the staged wheels (FlashAttention-4:
# PYTHONPATH as fa4_wheels.sh says). Needs .bench/ (bench/caseops_proxy.tar.xz, tokenizers/).
# The GPUs' clocks are sampled throughout; the summary ends with each busy GPU's clock, power and temperature.
# Each GPU has its own job (so two can run side by side, each with its own `base` for reference): poll with the
# same GPU. Writes only under /tmp/step_bench/gpuN and the shards' /tmp/proxy_caseops.
set -u
source "$(dirname "$0")/device_job.sh"
export GPU="${GPU:-0}"
WORK=/tmp/step_bench/gpu$GPU

case "${1:-}" in
start)
  rm -rf "$WORK" && mkdir -p "$WORK"
  stage_caseops "$WORK" && cp -r tests data tokenizers "$WORK/" || exit 1  # the tests' sample shards and tokenizer
  export STEP_RUNS="${STEP_RUNS:-base}" ATTENTION="${ATTENTION:-1}" TESTS="${TESTS:-}"
  start_job "$WORK" "$0"
  ;;
run)
  cd "$WORK" || exit 1
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=$GPU
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  monitor=$(gpu_monitor_start "$WORK/gpu.csv")
  if [ -n "$TESTS" ]; then
    echo "== GPU tests: $TESTS"
    python3 -m pytest -q -p no:cacheprovider $TESTS > tests.out 2>&1 || echo "GPU tests failed"
    tail -n 15 tests.out
  fi
  if [ "$ATTENTION" = 1 ]; then
    echo "== attention_bench"
    python3 tools/bench/attention_bench.py > attention.out 2>&1 || echo "attention_bench exited non-zero"
    cat attention.out
  fi
  for entry in $STEP_RUNS; do
    name=${entry%%:*}; overrides=$(run_overrides "$entry")
    echo "== bench_step $name: $overrides"
    env DATA_PATH="$CASEOPS_DATA" TOKENIZER_PATH="$WORK/$CASEOPS_TOKENIZER" VOCAB_SIZE=8192 CASEOPS_ENABLED=1 \
        NUM_LOOPS=0 BENCH_STEPS=20 TORCHINDUCTOR_CACHE_DIR="$WORK/compile_$name" \
        TRITON_CACHE_DIR="$WORK/compile_$name/triton" $overrides python3 tools/bench/bench_step.py \
        > "step_$name.out" 2>&1 || echo "bench_step $name exited non-zero"
    grep -vE "^(W|I)[0-9]{4} " "step_$name.out" | tail -n 45
  done
  kill "$monitor" 2>/dev/null
  echo "== GPUs while busy (a lower clock than another session's explains a slower step)"
  gpu_summary "$WORK/gpu.csv"
  echo BENCH_DONE
  ;;
stop)
  stop_job "$WORK"
  ;;
poll)
  poll_job "$WORK" "$WORK"/*.out
  ;;
*)
  echo "usage: $0 start|poll|stop" >&2; exit 2 ;;
esac
