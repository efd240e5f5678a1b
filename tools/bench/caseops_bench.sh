#!/usr/bin/env bash
# CaseOps against a plain tokenizer on the proxy corpus, from the repo root:
#   tools/bench/caseops_bench.sh prepare [CORPUS_DIR]  # two SP8192 tokenizers + two shard sets (default .bench/corpus)
#   tools/bench/caseops_bench.sh start [CORPUS_DIR]    # prepare, then both quality runs in the background (device)
#   tools/bench/caseops_bench.sh poll                  # progress; the two final lines once done
# prepare trains both tokenizers on the corpus's TRAIN split only (train_*.jsonl.xz; val.jsonl.xz is only
# encoded), with data/prepare_corpus.py:
#   /tmp/proxy_plain    plain SP8192, plus byte sidecars (--byte-sidecar): original UTF-8 bytes per val token
#   /tmp/proxy_caseops  CaseOps SP8192 (--caseops: operators U+E001..U+E004 as user-defined symbols), sidecars
# Both runs score val_bpb on the sidecars (CASEOPS_ENABLED=1), so both divide by the same original bytes of the
# same validation documents; `prepare` checks that the two sidecar totals are equal. Without the plain set's
# sidecars the comparison would be unfair: the piece-based count drops the whitespace SentencePiece's
# normaliser collapses (5.2% of the proxy val bytes), which alone would move val_bpb by ~5%.
# Needs train_gpt.py with CASEOPS_ENABLED. Everything it writes goes under /tmp.
set -u
source "$(dirname "$0")/device_job.sh"
CORPUS=${2:-.bench/corpus}
PLAIN=${PLAIN_DIR:-/tmp/proxy_plain}
CASEOPS=${CASEOPS_DIR:-/tmp/proxy_caseops}
WORK=/tmp/caseops_bench
VOCAB=${VOCAB:-8192}
THREADS=${THREADS:-$(nproc)}
QUALITY_SECONDS=${QUALITY_SECONDS:-180}
BROTLI_QUALITY=${BROTLI_QUALITY:-5}  # with COMPRESSOR=brotli only: val_bpb does not depend on it, and 11 adds ~80 s
# a run over 16 MB (an older compressor, another vocabulary) must not stop a comparison of val_bpb
ARTIFACT_LIMIT=${ARTIFACT_LIMIT:-1000000000}

prepare() {
  local train=("$CORPUS"/train_*.jsonl.xz)
  [ -f "${train[0]}" ] && [ -f "$CORPUS/val.jsonl.xz" ] || { echo "no train_*.jsonl.xz / val.jsonl.xz in $CORPUS" >&2; return 1; }
  for mode in plain caseops; do
    if [ "$mode" = plain ]; then out=$PLAIN; flag=--byte-sidecar; else out=$CASEOPS; flag=--caseops; fi
    rm -rf "$out" && mkdir -p "$out"
    start=$SECONDS
    python3 data/prepare_corpus.py $flag --train "${train[@]}" --val "$CORPUS/val.jsonl.xz" --vocab-size "$VOCAB" \
        --tokenizer-prefix "$out/tokenizer/proxy_${VOCAB}_bpe_$mode" --out-dir "$out" --shard-tokens 10000000 \
        --num-threads "$THREADS" --no-progress || return 1
    echo "$mode: tokenizer + shards in $((SECONDS - start)) s"
  done
  python3 - "$PLAIN" "$CASEOPS" <<'EOF' || return 1
import glob, os, sys
sys.path.insert(0, "data")
from caseops import read_byte_sidecar
totals = []
for folder in sys.argv[1:]:
    totals.append(sum(int(read_byte_sidecar(p)[0].sum()) for p in sorted(glob.glob(os.path.join(folder, "fineweb_val_bytes_*.bin")))))
print(f"val original bytes: plain {totals[0]:,}, caseops {totals[1]:,}")
sys.exit(0 if totals[0] == totals[1] > 0 else "the two sidecar totals differ: not the same validation text")
EOF
}

run_args() {  # $1 = plain | caseops
  local dir=$PLAIN; [ "$1" = caseops ] && dir=$CASEOPS
  echo DATA_PATH="$dir" TOKENIZER_PATH="$dir/tokenizer/proxy_${VOCAB}_bpe_$1.model" VOCAB_SIZE="$VOCAB" \
       CASEOPS_ENABLED=1 TRAIN_BATCH_TOKENS=65536 MAX_WALLCLOCK_SECONDS="$QUALITY_SECONDS" SEED=1337 RUN_ID="caseops_bench_$1" \
       BROTLI_QUALITY="$BROTLI_QUALITY" ARTIFACT_LIMIT_BYTES="$ARTIFACT_LIMIT"
}

case "${1:-}" in
prepare)
  prepare || exit 1
  echo "quality runs (protocol v1, both scored on original bytes through the sidecars):"
  echo "  env $(run_args plain) python3 train_gpt.py"
  echo "  env $(run_args caseops) python3 train_gpt.py"
  ;;
start)
  rm -rf "$WORK" && mkdir -p "$WORK"
  cp -r train_gpt.py tools "$WORK/"
  install_wheels "$WORK" || exit 1
  prepare > "$WORK/prepare.log" 2>&1 || { cat "$WORK/prepare.log"; exit 1; }
  cat "$WORK/prepare.log"
  start_job "$WORK" "$0"
  ;;
run)
  cd "$WORK" || exit 1
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  for mode in plain caseops; do
    env $(run_args $mode) python3 train_gpt.py || { echo BENCH_FAILED; exit 1; }
  done
  python3 tools/bench/bench_summary.py logs/caseops_bench_plain.txt logs/caseops_bench_caseops.txt
  echo BENCH_DONE
  ;;
stop)
  stop_job "$WORK"
  ;;
poll)
  poll_job "$WORK" "$WORK"/logs/*.txt "$WORK/prepare.log"
  grep -h "val_tokens:\|roundtrip_exact" "$WORK"/logs/*.txt 2>/dev/null
  ;;
*)
  echo "usage: $0 prepare|start [CORPUS_DIR] | poll | stop" >&2; exit 2 ;;
esac
