# Background jobs on the device machine, for the job scripts of tools/bench/ (source it).
# A call of the device tool may last 10 minutes, so a long job runs detached and later calls poll it.

# install_wheels WORK: the wheels carried in .whl/ (brotli: the device has none) into WORK/site
install_wheels() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1/site" .whl/*.whl
  fi
}

# start_job WORK SCRIPT: run `SCRIPT run` detached, its output in WORK/bench.log, its pid in WORK/pid
start_job() {
  setsid nohup bash "$2" run > "$1/bench.log" 2>&1 < /dev/null &
  echo $! > "$1/pid"
  echo "started pid $(cat "$1/pid")"
}

# stop_job WORK: end the job started in WORK with all its processes (its process group: start_job's setsid makes the
# job a group of its own), and nothing else on the machine; says "stopped PID" or "not running". Never stop a job by
# name (pkill -f NAME): that also matches the shell whose command line holds NAME, the device call's own among them.
stop_job() {
  local pid
  pid=$(cat "$1/pid" 2>/dev/null)
  # the group, not the leader: children that outlive the job's own shell are still the job
  if [ -z "$pid" ] || ! kill -0 -- "-$pid" 2>/dev/null; then echo "not running"; return 0; fi
  kill -TERM -- "-$pid" 2>/dev/null
  for _ in $(seq 1 20); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null
  echo "stopped $pid"
}

# poll_job WORK FILE...: "running" and the log's last 30 lines, or, once done, the whole log to $OUT and FILEs in $OUT/files.tgz
poll_job() {
  local work=$1; shift
  if kill -0 "$(cat "$work/pid")" 2>/dev/null; then echo "running"; tail -n 30 "$work/bench.log"; return 0; fi
  cat "$work/bench.log"
  # the device returns at most 8 files: everything else goes back as one archive
  mkdir -p "${OUT:-/tmp/out}" && cp "$work/bench.log" "${OUT:-/tmp/out}/" \
    && tar czf "${OUT:-/tmp/out}/files.tgz" --ignore-failed-read "$@" 2>/dev/null
  return 0
}

# run_overrides ENTRY: "NAME:VAR=V,VAR=V" -> "VAR=V VAR=V" (nothing for a bare NAME), for env. Only a comma before
# the next VAR= separates, so a value may hold commas: "ph:TTT_PHASE_DOCS=7,14,21,SEED=1" -> "TTT_PHASE_DOCS=7,14,21 SEED=1"
run_overrides() {
  case "$1" in *:*) echo "${1#*:}" | sed -E 's/,([A-Z_][A-Z0-9_]*=)/ \1/g' ;; esac
}

# cpu_share K N [CORES]: the K-th of N equal, disjoint shares of CORES cores (default: this process's), as taskset's
# list "LO-HI". Runs side by side on different GPUs each get their own share, so that one run's compilation or
# host-bound TTT does not slow the other's training.
cpu_share() {
  local cores=${3:-$(nproc)} size
  size=$(( cores / $2 )); [ "$size" -ge 1 ] || size=1
  local lo=$(( ($1 * size) % cores ))
  echo "$lo-$(( lo + size - 1 ))"
}

# gpu_monitor_start FILE: sample every GPU every 5 s into FILE (index, SM clock MHz, power W, temperature C,
# utilisation %) until killed; prints the sampler's pid
gpu_monitor_start() {
  nvidia-smi --query-gpu=index,clocks.sm,power.draw,temperature.gpu,utilization.gpu --format=csv,noheader,nounits \
    -l 5 > "$1" 2>/dev/null &
  echo $!
}

# gpu_summary FILE: per GPU, over the samples taken while it was busy (utilisation at least 50%), the mean and the
# lowest SM clock, the mean power and the highest temperature: a GPU that clocks lower shows here, not in a run's log
gpu_summary() {
  awk -F', *' '$5 + 0 >= 50 {
      g = $1; n[g]++; clock[g] += $2
      if ($3 ~ /^[0-9.]+$/) { power[g] += $3; watts[g]++ }  # "[N/A]" where the driver does not report it
      if (!(g in low) || $2 + 0 < low[g]) low[g] = $2 + 0
      if ($4 + 0 > hot[g]) hot[g] = $4 + 0
    }
    END { for (g in n) printf "gpu:%s busy_samples:%d sm_mhz_mean:%.0f sm_mhz_min:%d power_w_mean:%s temp_max_c:%d\n",
                              g, n[g], clock[g] / n[g], low[g], watts[g] ? sprintf("%.0f", power[g] / watts[g]) : "n/a",
                              hot[g] }' "$1" | sort
}

# The CaseOps proxy shards (with byte sidecars) and their tokenizer's file name, for the protocol-v1c jobs
CASEOPS_DATA=/tmp/proxy_caseops/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved
CASEOPS_TOKENIZER=fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model

# stage_caseops WORK: train_gpt.py, tools/, the CaseOps tokenizer and the wheels into WORK; the shards unpacked once
stage_caseops() {
  cp -r train_gpt.py tools "$1/" && cp ".bench/tokenizers/$CASEOPS_TOKENIZER" "$1/" && install_wheels "$1" || return 1
  [ -f "$CASEOPS_DATA/fineweb_val_000000.bin" ] \
    || { mkdir -p /tmp/proxy_caseops && tar xJf .bench/bench/caseops_proxy.tar.xz -C /tmp/proxy_caseops; }
}
