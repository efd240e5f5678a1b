#!/usr/bin/env bash
# Quality protocol v1c (the CaseOps proxy), its runs dealt out to the GPUs and side by side, from the repo root:
#   RUNS="defaults proxy:PRESET=proxy" tools/bench/v1c_bench.sh start   # the shards, then the runs detached
#   tools/bench/v1c_bench.sh poll                                        # progress; the score lines once done
# Needs .bench/ (bench/caseops_proxy.tar.xz, tokenizers/). Writes only under /tmp/v1c_bench, the shards'
# /tmp/proxy_caseops, and /tmp/v1c_compile and /tmp/v1c_artifacts (below).
# A run entry is NAME or NAME:VAR=VALUE,VAR=VALUE (overrides on top of the protocol). The entries are dealt out
# to GPUS GPUs (default: all from FIRST_GPU, which defaults to 0): the i-th to GPU FIRST_GPU + i mod GPUS, and the
# entries of one GPU run one after another. PREQUANT_ONLY=1 in an entry stops that run once the float (EMA) model
# is scored.
# Each run compiles into a fresh cache of its own, /tmp/v1c_compile/NAME (a run beside it would otherwise warm its
# compilation up), kept with its artifact, /tmp/v1c_artifacts/NAME.artifact, outside the next start's reach. An
# eval-only entry on that artifact with CACHE=NAME uses that run's cache as it is, TTT's graphs compiled beside
# training (TTT_PRECOMPILE) included, so its TTT warm-up is a cache hit. Queued behind that run on its GPU:
#   GPUS=1 RUNS="defaults ph:TTT_EVAL_ONLY=1,ARTIFACT_PATH=/tmp/v1c_artifacts/defaults.artifact,CACHE=defaults,TTT_PHASE_DOCS=7,14,21"
# With more than one GPU in use, each GPU's queue is pinned (taskset) to its own equal share of the cores, so that a
# compilation or a host-bound TTT eval on one GPU does not slow a training on another; the GPUs' clocks are sampled
# throughout, and the summary ends with each one's clock, power and temperature while busy.
# The protocol: 65,536-token steps (one micro-step), 180 s of training, seed 1337, val_bpb on the byte
# sidecars, the TTT phase boundaries scaled to the proxy's 416 validation documents.
set -u
source "$(dirname "$0")/device_job.sh"
WORK=/tmp/v1c_bench
DATA=$CASEOPS_DATA
TOKENIZER=$CASEOPS_TOKENIZER
RUNS=${RUNS:-defaults}
QUALITY_SECONDS=${QUALITY_SECONDS:-180}

case "${1:-}" in
start)
  rm -rf "$WORK" && mkdir -p "$WORK"
  stage_caseops "$WORK" || exit 1
  export RUNS QUALITY_SECONDS FIRST_GPU=${FIRST_GPU:-0} GPUS=${GPUS:-}
  start_job "$WORK" "$0"
  ;;
run)
  cd "$WORK" || exit 1
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  run_entry() {  # ENTRY GPU CORES
    local name=${1%%:*} overrides cache run pin=()
    overrides=$(run_overrides "$1")
    cache=$(printf ' %s ' "$overrides" | grep -oE ' CACHE=[^ ]+' | cut -d= -f2)
    overrides=$(printf '%s' "$overrides" | sed -E 's/(^| )CACHE=[^ ]*//')
    if [ -z "$cache" ]; then cache=$name; rm -rf "/tmp/v1c_compile/$name"; fi
    [ -n "$3" ] && pin=(taskset -c "$3")
    echo "== $name on GPU $2, cores ${3:-all}, compile cache $cache: $overrides"
    "${pin[@]}" env DATA_PATH="$DATA" TOKENIZER_PATH="$WORK/$TOKENIZER" VOCAB_SIZE=8192 CASEOPS_ENABLED=1 TRAIN_BATCH_TOKENS=65536 \
        MAX_WALLCLOCK_SECONDS="$QUALITY_SECONDS" SEED=1337 TTT_PHASE_DOCS=33,66,100 RUN_ID="$name" \
        OUTPUT_DIR="$WORK/out_$name" CUDA_VISIBLE_DEVICES=$2 TORCHINDUCTOR_CACHE_DIR="/tmp/v1c_compile/$cache" \
        TRITON_CACHE_DIR="/tmp/v1c_compile/$cache/triton" $overrides python3 train_gpt.py > "$name.out" 2>&1 &
    run=$!
    case " $overrides " in
      *" PREQUANT_ONLY=1 "*)
        while kill -0 $run 2>/dev/null && ! grep -q "^pre_quant_ema" "$name.out"; do sleep 2; done
        kill $run 2>/dev/null; wait $run 2>/dev/null; echo "$name: stopped after the pre-quant score" ;;
      *) wait $run || echo "$name exited non-zero" ;;
    esac
    mkdir -p /tmp/v1c_artifacts  # at once, for an eval-only entry queued behind this run on its GPU
    [ -f "out_$name/final_model.artifact" ] && cp "out_$name/final_model.artifact" "/tmp/v1c_artifacts/$name.artifact"
  }
  gpus=${GPUS:-$(( $(nvidia-smi -L | wc -l) - FIRST_GPU ))}
  i=0
  declare -A queue
  for entry in $RUNS; do
    gpu=$((FIRST_GPU + i % gpus)); queue[$gpu]+="$entry "; i=$((i + 1))
  done
  monitor=$(gpu_monitor_start "$WORK/gpu.csv")
  command -v taskset >/dev/null || echo "no taskset: the runs share every core"
  k=0 queues=()
  for gpu in $(printf '%s\n' "${!queue[@]}" | sort -n); do  # each GPU's queue on its own share of the cores
    cores=$(command -v taskset >/dev/null && [ ${#queue[@]} -gt 1 ] && cpu_share $k ${#queue[@]})
    ( for entry in ${queue[$gpu]}; do run_entry "$entry" "$gpu" "$cores"; done ) &
    queues+=($!); k=$((k + 1))
  done
  wait "${queues[@]}"
  kill "$monitor" 2>/dev/null
  for entry in $RUNS; do
    name=${entry%%:*}
    echo "== $name"
    grep -E "^(model_params|stopping_early|step:[0-9]+/[0-9]+ val|pre_quant|Total submission|final_.*_exact|ttt_time_guard|ttt_lora|legal_ttt|peak memory|ttt_precompile:exit)" "$name.out"
    grep -h "^ttt_precompile:done" "out_$name/logs/${name}_ttt_precompile_rank0.txt" 2>/dev/null  # its time and GPU memory
    tail -n 3 "$name.out" | grep -iE "error|Traceback" && tail -n 40 "$name.out"
  done
  echo "== GPUs while busy"
  gpu_summary "$WORK/gpu.csv"
  echo BENCH_DONE
  ;;
stop)
  stop_job "$WORK"
  ;;
poll)
  poll_job "$WORK" "$WORK"/*.out
  for f in "$WORK"/*.out; do echo "-- $f"; grep -E "^step:" "$f" | tail -n 1; done
  ;;
*)
  echo "usage: $0 start|poll|stop" >&2; exit 2 ;;
esac
