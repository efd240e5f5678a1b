#!/usr/bin/env bash
# A submission's dry run on a machine with two GPUs, from the repo root:
#   tools/bench/submission_dry_run.sh start DATA_DIR TOKENIZER   # runs detached, everything under /tmp/dry_run
#   tools/bench/submission_dry_run.sh poll                       # progress; once done, the comparison
# 1. the readable train_gpt.py trains a short run under torchrun on 2 GPUs;
# 2. tools/submission/package_record.py builds a records folder from that run's log (its train_gpt.py is the packed script);
# 3. from inside that folder, its train_gpt.py runs the same settings under torchrun on 2 GPUs;
# 4. the readable script and the folder's script run side by side on 1 GPU each (CUDA_VISIBLE_DEVICES).
# Then each pair's final lines are compared. ITERATIONS (default 200) and every setting that settings() below does
# not fix come from the environment; the data and tokenizer are CaseOps-style (CASEOPS_ENABLED=1, byte sidecars
# next to the shards).
set -u
source "$(dirname "$0")/device_job.sh"
WORK=/tmp/dry_run
ITERATIONS=${ITERATIONS:-200}

settings() {  # $1 = run id
  echo DATA_PATH="$DATA" TOKENIZER_PATH="$TOKENIZER" VOCAB_SIZE=8192 CASEOPS_ENABLED=1 TRAIN_BATCH_TOKENS=65536 \
       ITERATIONS="$ITERATIONS" MAX_WALLCLOCK_SECONDS=600 VAL_TOKENS_LIMIT=262144 TTT_MODE=none SEED=1337 RUN_ID="$1"
}

final_lines() {  # the lines that must agree between the readable and the packed script
  grep -E "^(step:$ITERATIONS/|pre_quant_ema|Serialized model|Code size|Total submission|final_.*_exact)" "$1" \
    | sed -E 's/ (train_time|step_avg|eval_time):[0-9.]+ms//g'
}

case "${1:-}" in
start)
  [ $# -eq 3 ] || { echo "usage: $0 start DATA_DIR TOKENIZER" >&2; exit 2; }
  rm -rf "$WORK" && mkdir -p "$WORK/repo"
  cp -r train_gpt.py tools requirements.txt "$WORK/repo/"
  install_wheels "$WORK" || exit 1
  echo "DATA=$(realpath "$2") TOKENIZER=$(realpath "$3")" > "$WORK/paths"
  start_job "$WORK" "$0"
  ;;
run)
  source "$WORK/paths"
  export DATA TOKENIZER PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  cd "$WORK/repo" || exit 1
  echo "== 1. readable script, 2 GPUs"
  env $(settings readable2) torchrun --standalone --nproc_per_node=2 train_gpt.py > /dev/null || { echo DRY_RUN_FAILED; exit 1; }
  echo "== 2. package_record"
  python3 tools/submission/package_record.py --name DryRun --author "Dry Run" --github-id dryrun --blurb "submission dry run" \
      --log logs/readable2.txt --artifact final_model.artifact --records-dir "$WORK/records" --no-plot --not-fineweb \
      || { echo DRY_RUN_FAILED; exit 1; }
  folder=$(ls -d "$WORK"/records/*_DryRun)
  echo "== 3. the folder's script, 2 GPUs"
  (cd "$folder" && env $(settings packed2) torchrun --standalone --nproc_per_node=2 train_gpt.py > /dev/null) \
      || { echo DRY_RUN_FAILED; exit 1; }
  echo "== 4. readable and packed, 1 GPU each, side by side"
  env $(settings readable1) CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc_per_node=1 --master_port=29511 train_gpt.py > /dev/null &
  (cd "$folder" && env $(settings packed1) CUDA_VISIBLE_DEVICES=1 torchrun --standalone --nproc_per_node=1 --master_port=29512 train_gpt.py > /dev/null) &
  wait
  for n in 2 1; do
    echo "== $n GPU(s): readable | packed"
    diff <(final_lines logs/readable$n.txt) <(final_lines "$folder/logs/packed$n.txt") && echo "IDENTICAL ($n GPUs)"
    final_lines "$folder/logs/packed$n.txt"
  done
  grep -h "^world_size" logs/readable1.txt "$folder/logs/packed1.txt"
  python3 tools/submission/package_record.py --check "$folder" && echo CHECK_OK
  echo DRY_RUN_DONE
  ;;
stop)
  stop_job "$WORK"
  ;;
poll)
  poll_job "$WORK" "$WORK"/repo/logs "$WORK"/records
  ;;
*)
  echo "usage: $0 start DATA_DIR TOKENIZER | poll | stop" >&2; exit 2 ;;
esac
