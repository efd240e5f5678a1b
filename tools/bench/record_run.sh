#!/usr/bin/env bash
# The whole run as the challenge runs it, on this machine's GPUs, from the repo root:
#   NPROC=2 tools/bench/record_run.sh start   # the CaseOps proxy shards, the packed script in a folder, the run detached
#   tools/bench/record_run.sh poll            # progress; once done, the summary
# The run: `torchrun --standalone --nproc_per_node=$NPROC train_gpt.py` from inside a records-style folder whose
# train_gpt.py is the packed script, at the defaults (786,432-token steps, 600 s of training, LoRA TTT inside
# 600 s of eval, phases at 33,66,100 of the 416 documents) on the CaseOps proxy data with its byte sidecars. Then
# tools/bench/bench_step.py under torchrun gives the share of a step spent in communication (BENCH_STEP=0 skips it,
# about 2 minutes). EXTRA="VAR=V ..." adds settings to the run. Needs .bench/ (bench/caseops_proxy.tar.xz,
# tokenizers/) and .whl/ (python-minifier, brotli). Writes only under /tmp/record_run and the shards'
# /tmp/proxy_caseops.
set -u
source "$(dirname "$0")/device_job.sh"
WORK=/tmp/record_run
DATA=$CASEOPS_DATA
TOKENIZER=$CASEOPS_TOKENIZER
NPROC=${NPROC:-2}

case "${1:-}" in
start)
  rm -rf "$WORK" && mkdir -p "$WORK/record"
  stage_caseops "$WORK" || exit 1
  PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" python3 tools/submission/pack_script.py "$WORK/record/train_gpt.py" train_gpt.py || exit 1
  export NPROC EXTRA="${EXTRA:-}" BENCH_STEP="${BENCH_STEP:-1}"
  start_job "$WORK" "$0"
  ;;
run)
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  # the TTT phase boundaries scaled to the proxy's 416 validation documents, as in protocol v1c
  common=(DATA_PATH="$DATA" TOKENIZER_PATH="$WORK/$TOKENIZER" VOCAB_SIZE=8192 CASEOPS_ENABLED=1 SEED=1337
          TTT_PHASE_DOCS=33,66,100)
  echo "== the record's run: $NPROC processes, $EXTRA"
  monitor=$(gpu_monitor_start "$WORK/gpu.csv")  # the clocks tell a slower machine from slower code
  (cd "$WORK/record" && env "${common[@]}" RUN_ID=record $EXTRA \
      torchrun --standalone --nproc_per_node="$NPROC" train_gpt.py > "$WORK/record.out" 2>&1) || echo "the run exited non-zero"
  kill "$monitor" 2>/dev/null
  if [ "$BENCH_STEP" != 0 ]; then
    echo "== communication share of a step (bench_step.py, $NPROC processes)"
    (cd "$WORK" && env "${common[@]}" BENCH_STEPS=20 NUM_LOOPS=0 $EXTRA \
        torchrun --standalone --nproc_per_node="$NPROC" tools/bench/bench_step.py > "$WORK/bench_step.out" 2>&1) \
        || echo "bench_step exited non-zero"
    grep -E "^\| (ms per|kernels per step)" "$WORK/bench_step.out"
  fi
  echo "== summary"
  grep -E "^(model_params|grad_accum|compile_warmup|quant_reserve|gptq_hessians|train_plus|recurrence|stopping_early|peak memory|pre_quant|Serialized|Code size|Total submission|final_.*_exact|ttt_warmup|ttt_phase|ttt_time_guard|ttt_lora|ttt_rank|legal_ttt)" "$WORK/record.out"
  grep -E "^step:" "$WORK/record.out" | tail -n 2
  echo "== GPUs while busy (the record's run)"
  gpu_summary "$WORK/gpu.csv"
  tail -n 3 "$WORK/record.out" | grep -iE "error|Traceback" && tail -n 40 "$WORK/record.out"
  echo BENCH_DONE
  ;;
stop)
  stop_job "$WORK"
  ;;
poll)
  poll_job "$WORK" "$WORK"/*.out "$WORK"/gpu.csv "$WORK"/record/logs/*.txt
  grep -E "^step:" "$WORK/record.out" 2>/dev/null | tail -n 1
  ;;
*)
  echo "usage: $0 start|poll|stop" >&2; exit 2 ;;
esac
