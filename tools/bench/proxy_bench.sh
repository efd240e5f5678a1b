#!/usr/bin/env bash
# The proxy benchmark on one GPU, as docs/benchmarking.md (protocol v1) describes it.
#   tools/bench/proxy_bench.sh start   # from the repo root on the device: shards, then the whole job in the background
#   tools/bench/proxy_bench.sh poll    # later calls: progress, then the logs and summary once it is done
# Needs .bench/ (corpus, tokenizers, bench) and, on a machine without brotli, .whl/ with its wheel.
# Writes only under /tmp/proxy_bench and the shards' /tmp/proxy_sp8192 (the device re-sends the working tree on each call).
#   1. the kernel and model tests on the GPU (GPU_TESTS=0 skips them; GPU_TEST_FILES picks the files);
#   2. throughput: tools/bench/bench_step.py on the full default model, once per entry of BENCH_RUNS (under torchrun on
#      BENCH_NPROC GPUs when that is above 1, so the breakdown has the communication; an entry's own BENCH_NPROC=N
#      overrides it, to time one GPU and several on the same machine in one job; in a quality run's entry it runs
#      that run under torchrun, off protocol v1, which is one GPU);
#   3. quality: protocol v1 (65,536-token batches, QUALITY_SECONDS of training, everything else default), once per
#      entry of QUALITY_RUNS;
#   4. with QUANT_BENCH=1, tools/bench/quant_bench.py $QUANT_BENCH_ARGS on the first quality run's float weights;
#   5. once per entry of EVAL_RUNS, TTT_EVAL_ONLY=1 on the first quality run's artifact (e.g. sgd:TTT_MODE=sgd).
# A run entry is NAME or NAME:VAR=VALUE,VAR=VALUE (overrides on top of the protocol), entries separated by spaces;
# PREQUANT_ONLY=1 in a quality run's overrides stops it after the pre-quant score (no export, no round trip):
#   BENCH_RUNS="base all:XSA_ENABLED=1,SMEAR_GATE_ENABLED=1" QUALITY_RUNS="rtn:QUANT_METHOD=rtn gptq" tools/bench/proxy_bench.sh start
set -u
source "$(dirname "$0")/device_job.sh"
WORK=/tmp/proxy_bench
SHARDS=/tmp/proxy_sp8192
QUALITY_SECONDS=${QUALITY_SECONDS:-180}
BENCH_RUNS=${BENCH_RUNS-"fused_ce0:FUSED_CE=0 fused_ce1:FUSED_CE=1"}
QUALITY_RUNS=${QUALITY_RUNS-quality}
QUANT_BENCH=${QUANT_BENCH:-0}
GPU_TESTS=${GPU_TESTS:-1}
BENCH_NPROC=${BENCH_NPROC:-1}
GPU_TEST_FILES=${GPU_TEST_FILES:-"tests/test_kernels.py tests/test_model_and_optimizer.py tests/test_recurrence_and_docs.py"}
QUANT_BENCH_ARGS=${QUANT_BENCH_ARGS-}
EVAL_RUNS=${EVAL_RUNS-}

# set_launcher OVERRIDES DEFAULT_NPROC: launcher=(python3), or torchrun on the entry's BENCH_NPROC GPUs (else the default)
set_launcher() {
  local nproc
  nproc=$(echo " $1 " | sed -n 's/.* BENCH_NPROC=\([0-9]*\) .*/\1/p'); nproc=${nproc:-$2}
  launcher=(python3)
  [ "$nproc" -gt 1 ] && launcher=(python3 -m torch.distributed.run --standalone --nproc_per_node="$nproc")
}

case "${1:-}" in
start)
  rm -rf "$WORK" && mkdir -p "$WORK"
  # data/ and tokenizers/ hold the bundled sample that some tests train on
  cp -r train_gpt.py tools tests data tokenizers "$WORK/" && cp .bench/tokenizers/fineweb_8192_bpe.model "$WORK/"
  install_wheels "$WORK" || exit 1
  if [ ! -f "$SHARDS/fineweb_val_000000.bin" ]; then
    python3 .bench/bench/make_shards.py .bench/corpus .bench/tokenizers/fineweb_8192_bpe.model "$SHARDS" > "$WORK/shards.log" 2>&1 \
      || { cat "$WORK/shards.log"; exit 1; }
    cat "$WORK/shards.log"
  fi
  export GPU_TESTS GPU_TEST_FILES BENCH_NPROC BENCH_RUNS QUALITY_SECONDS QUALITY_RUNS QUANT_BENCH QUANT_BENCH_ARGS EVAL_RUNS
  start_job "$WORK" "$0"
  ;;
run)
  cd "$WORK" || exit 1
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  common=(DATA_PATH="$SHARDS" TOKENIZER_PATH="$WORK/fineweb_8192_bpe.model" VOCAB_SIZE=8192)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  if [ "$GPU_TESTS" = 1 ]; then
    python3 -m pytest -q -p no:cacheprovider --tb=line $GPU_TEST_FILES 2>&1 | tail -12
  fi
  for entry in $BENCH_RUNS; do
    name=${entry%%:*}; overrides=$(run_overrides "$entry")
    echo "== bench_step $name $overrides"
    set_launcher "$overrides" "$BENCH_NPROC"
    env "${common[@]}" $overrides TORCH_LOGS=graph_breaks "${launcher[@]}" tools/bench/bench_step.py 2> "bench_step_$name.err"
    grep -c "Graph break" "bench_step_$name.err" | sed 's/^/graph breaks: /'
  done
  for entry in $QUALITY_RUNS; do
    name=${entry%%:*}; overrides=$(run_overrides "$entry")
    echo "== quality $name (protocol v1, ${QUALITY_SECONDS}s) $overrides"
    set_launcher "$overrides" 1
    env "${common[@]}" TRAIN_BATCH_TOKENS=65536 MAX_WALLCLOCK_SECONDS="$QUALITY_SECONDS" SEED=1337 $overrides RUN_ID="$name" \
        OUTPUT_DIR="$WORK/out_$name" "${launcher[@]}" train_gpt.py > "$name.out" 2>&1 &
    run=$!
    case " $overrides " in
      *" PREQUANT_ONLY=1 "*)  # an architecture comparison: stop once the float model is scored
        while kill -0 $run 2>/dev/null && ! grep -q "^pre_quant_ema" "$name.out"; do sleep 2; done
        kill $run 2>/dev/null && echo "stopped after the pre-quant score"
        wait $run 2>/dev/null ;;
      *) wait $run || echo "quality run $name exited non-zero" ;;
    esac
    tail -n 12 "$name.out"
    python3 tools/bench/bench_summary.py "out_$name/logs/$name.txt"
  done
  first=${QUALITY_RUNS%% *}; qname=${first%%:*}; qover=$(run_overrides "$first")
  protocol=(TRAIN_BATCH_TOKENS=65536 SEED=1337 $qover OUTPUT_DIR="$WORK/out_$qname")
  if [ "$QUANT_BENCH" = 1 ]; then
    echo "== quant_bench on out_$qname"
    env "${common[@]}" "${protocol[@]}" python3 tools/bench/quant_bench.py --state "out_$qname/final_model.pt" $QUANT_BENCH_ARGS \
        > quant_bench.out 2>&1 || echo "quant_bench exited non-zero"
    tail -n 25 quant_bench.out
  fi
  for entry in $EVAL_RUNS; do
    name=${entry%%:*}; overrides=$(run_overrides "$entry")
    echo "== eval-only $name on out_$qname $overrides"
    env "${common[@]}" "${protocol[@]}" $overrides TTT_EVAL_ONLY=1 RUN_ID="$name" python3 train_gpt.py > "$name.out" 2>&1 \
        || echo "eval run $name exited non-zero"
    grep -E "ttt_phase|ttt_time_guard|peak" "$name.out"; tail -n 3 "$name.out"
  done
  echo BENCH_DONE
  ;;
stop)
  stop_job "$WORK"
  ;;
poll)
  poll_job "$WORK" "$WORK"/out_*/logs/*.txt "$WORK"/*.err "$WORK"/*.out
  ;;
*)
  echo "usage: $0 start|poll|stop" >&2; exit 2 ;;
esac
