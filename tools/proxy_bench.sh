#!/usr/bin/env bash
# The proxy benchmark on one GPU, as ../shared/bench/README.md (protocol v1) describes it.
#   tools/proxy_bench.sh start   # from the repo root on the device: starts the whole job in the background
#   tools/proxy_bench.sh poll    # later calls: progress, then the summary table once it is done
# Needs .bench/ (corpus, tokenizers, bench) and, on a machine without brotli, .whl/ with its wheel.
# Everything it writes goes under /tmp/proxy_bench (the device re-sends the working tree on each call).
set -u
WORK=/tmp/proxy_bench
SHARDS=/tmp/proxy_sp8192
THROUGHPUT_ITERATIONS=${THROUGHPUT_ITERATIONS:-60}
QUALITY_SECONDS=${QUALITY_SECONDS:-180}

case "${1:-}" in
start)
  rm -rf "$WORK" && mkdir -p "$WORK"
  cp train_gpt.py tools/bench_summary.py "$WORK/" && cp .bench/tokenizers/fineweb_8192_bpe.model "$WORK/"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl || exit 1
  fi
  python3 .bench/bench/make_shards.py .bench/corpus .bench/tokenizers/fineweb_8192_bpe.model "$SHARDS" > "$WORK/shards.log" 2>&1 || { cat "$WORK/shards.log"; exit 1; }
  cat "$WORK/shards.log"
  setsid nohup bash "$0" run > "$WORK/bench.log" 2>&1 < /dev/null &
  echo $! > "$WORK/pid"
  echo "started pid $(cat "$WORK/pid")"
  ;;
run)
  cd "$WORK" || exit 1
  export PYTHONPATH="$WORK/site" PYTHONUNBUFFERED=1
  common=(DATA_PATH="$SHARDS" TOKENIZER_PATH="$WORK/fineweb_8192_bpe.model" VOCAB_SIZE=8192)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  # 1. throughput: the full default model at the per-GPU batch of an 8-GPU run (8 micro-steps of 48 x 2048)
  env "${common[@]}" RUN_ID=throughput ITERATIONS="$THROUGHPUT_ITERATIONS" TRAIN_LOG_EVERY=1 \
      TRAIN_BATCH_TOKENS=786432 VAL_TOKENS_LIMIT=131072 python3 train_gpt.py  # its 60-step artifact may not fit: go on
  # 2. quality: protocol v1
  env "${common[@]}" RUN_ID=quality TRAIN_BATCH_TOKENS=65536 MAX_WALLCLOCK_SECONDS="$QUALITY_SECONDS" SEED=1337 \
      python3 train_gpt.py || { echo BENCH_FAILED; exit 1; }
  python3 bench_summary.py logs/throughput.txt logs/quality.txt
  echo BENCH_DONE
  ;;
poll)
  if kill -0 "$(cat "$WORK/pid")" 2>/dev/null; then echo "running"; tail -n 5 "$WORK/bench.log"; exit 0; fi
  cat "$WORK/bench.log"
  mkdir -p "${OUT:-/tmp/out}" && cp "$WORK"/logs/*.txt "$WORK/bench.log" "${OUT:-/tmp/out}/" 2>/dev/null
  ;;
*)
  echo "usage: $0 start|poll" >&2; exit 2 ;;
esac
