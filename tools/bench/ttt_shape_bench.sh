#!/usr/bin/env bash
# LoRA TTT at FineWeb's shape on one GPU (docs/benchmarking.md, "TTT at FineWeb's shape"): eval-only over
# the FineWeb-shaped share (6,250 documents, ~6.04M tokens: one GPU's on 8), phases at 104,208,312 documents.
#   tools/bench/ttt_shape_bench.sh start   # from the repo root on the device: the data, an artifact, then the job detached
#   tools/bench/ttt_shape_bench.sh poll    # later calls: progress, then the summary once it is done
# Needs .bench/ (corpus, tokenizers, bench). Writes only under /tmp/ttt_shape_bench and the
# shards it makes (/tmp/proxy_sp8192, /tmp/fineweb_shaped*).
#   ARTIFACT=random (default): the default model's shape, untrained (tools/bench/random_artifact.py, seconds);
#   ARTIFACT=trained: a 60-step training run on the proxy shards that exports (make_shards.py first, minutes);
#   ARTIFACT=/path/to/final_model.artifact: that one.
#   EVAL_RUNS: entries NAME or NAME:VAR=V,VAR=V, run one after the other (default: one run of the defaults),
#   e.g. EVAL_RUNS="base docs128:TTT_BATCH_DOCS=128". EVAL_BUDGET_SECONDS defaults to 600 as in the real eval.
#   NPROC=2 (on a machine with two GPUs): torchrun on 2 GPUs over 2 GPUs' share (12,500 documents, phases at 208,416,624);
#   the log's ttt_rank_finish_seconds line gives each rank's finish and its targets left unadapted.
#   PRECOMPILE=1: before each eval run, the TTT_PRECOMPILE side process (train_gpt.py --ttt-precompile) alone, as
#   a training run would start it, into that run's compile cache; its time is printed, the eval's warm-up then
#   shows what is left of the compilation. Each entry compiles into its own cache either way.
set -u
source "$(dirname "$0")/device_job.sh"
WORK=/tmp/ttt_shape_bench
NPROC=${NPROC:-1}
SHAPED=/tmp/fineweb_shaped; [ "$NPROC" -gt 1 ] && SHAPED=/tmp/fineweb_shaped_x$NPROC
SHARDS=/tmp/proxy_sp8192
ARTIFACT=${ARTIFACT:-random}
EVAL_RUNS=${EVAL_RUNS:-base}
PHASES=$((104 * NPROC)),$((208 * NPROC)),$((312 * NPROC))  # one GPU's share: 104,208,312 of 6,250 documents

case "${1:-}" in
start)
  rm -rf "$WORK" && mkdir -p "$WORK"
  cp -r train_gpt.py tools "$WORK/" && cp .bench/tokenizers/fineweb_8192_bpe.model "$WORK/"
  if [ ! -f "$SHAPED/fineweb_val_000000.bin" ]; then
    python3 .bench/bench/fineweb_shaped_val.py .bench/corpus .bench/tokenizers/fineweb_8192_bpe.model "$SHAPED" \
        --docs $((6250 * NPROC)) || exit 1
  fi
  if [ "$ARTIFACT" = trained ] && [ ! -f "$SHARDS/fineweb_val_000000.bin" ]; then
    python3 .bench/bench/make_shards.py .bench/corpus .bench/tokenizers/fineweb_8192_bpe.model "$SHARDS" || exit 1
  fi
  export ARTIFACT EVAL_RUNS NPROC PRECOMPILE=${PRECOMPILE:-0}
  start_job "$WORK" "$0"
  ;;
run)
  cd "$WORK" || exit 1
  export -n EVAL_RUNS  # read here; train_gpt.py would warn of it as a misspelt EVAL_ setting
  export PYTHONUNBUFFERED=1
  common=(TOKENIZER_PATH="$WORK/fineweb_8192_bpe.model" VOCAB_SIZE=8192)
  launcher=(python3); [ "$NPROC" -gt 1 ] && launcher=(python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  case "$ARTIFACT" in
    random) artifact="$WORK/random.artifact"; env "${common[@]}" python3 tools/bench/random_artifact.py "$artifact" || exit 1 ;;
    trained)
      artifact="$WORK/out_train/final_model.artifact"
      echo "== training 60 steps on the proxy shards"
      env "${common[@]}" DATA_PATH="$SHARDS" ITERATIONS=60 VAL_LOSS_EVERY=0 TTT_MODE=none TRAIN_BATCH_TOKENS=65536 \
          RUN_ID=train OUTPUT_DIR="$WORK/out_train" python3 train_gpt.py > train.out 2>&1 || { tail -n 20 train.out; exit 1; }
      tail -n 4 train.out ;;
    *) artifact="$ARTIFACT" ;;
  esac
  for entry in $EVAL_RUNS; do
    name=${entry%%:*}; overrides=$(run_overrides "$entry")
    echo "== eval-only TTT $name $overrides"
    cache=(TORCHINDUCTOR_CACHE_DIR="$WORK/compile_$name" TRITON_CACHE_DIR="$WORK/compile_$name/triton")
    if [ "$PRECOMPILE" = 1 ]; then
      SECONDS=0
      env "${common[@]}" "${cache[@]}" TTT_PHASE_DOCS="$PHASES" EVAL_STRIDE=2048 $overrides python3 train_gpt.py \
          --ttt-precompile > "$name.precompile.out" 2>&1 || echo "precompile $name exited non-zero"
      echo "precompile wall time: ${SECONDS}s; $(grep '^ttt_precompile' "$name.precompile.out")"
    fi
    SECONDS=0
    env "${common[@]}" "${cache[@]}" DATA_PATH="$SHAPED" TTT_PHASE_DOCS="$PHASES" EVAL_STRIDE=2048 $overrides TTT_EVAL_ONLY=1 \
        ARTIFACT_PATH="$artifact" RUN_ID="$name" OUTPUT_DIR="$WORK/out_$name" "${launcher[@]}" train_gpt.py \
        > "$name.out" 2>&1 || echo "eval run $name exited non-zero"
    echo "process wall time: ${SECONDS}s"
    grep -E "^(val_tokens|final_|ttt_warmup|ttt_phase|ttt_time_guard|ttt_lora|ttt_rank|legal_ttt)" "$name.out"
    grep "^ttt_progress" "$name.out" | tail -n 3
    tail -n 3 "$name.out" | grep -iE "error|Traceback" && tail -n 30 "$name.out"
  done
  echo BENCH_DONE
  ;;
stop)
  stop_job "$WORK"
  ;;
poll)
  poll_job "$WORK" "$WORK"/out_*/logs/*.txt "$WORK"/*.out
  ;;
*)
  echo "usage: $0 start|poll|stop" >&2; exit 2 ;;
esac
