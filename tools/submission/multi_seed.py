#!/usr/bin/env python3
"""Run one training command once per seed, keep going past a failed seed, and report every seed.

  python3 tools/submission/multi_seed.py --seeds 1337 42 2025 [--name NAME] [--out-root DIR] [--shared-output-dir] \\
      -- torchrun --standalone --nproc_per_node=8 train_gpt.py

For each seed the command runs with SEED=<seed> and RUN_ID=<name>_seed<seed> in its environment (NAME
defaults to $RUN_ID, else "run"), and OUTPUT_DIR=<out-root>/<run_id> (out-root defaults to $OUTPUT_DIR,
else "runs"), so each seed keeps its own log and artifact:
  <out-root>/<run_id>/logs/<run_id>.txt, <out-root>/<run_id>/final_model.artifact
(--shared-output-dir leaves OUTPUT_DIR alone: the logs still differ by RUN_ID, the artifacts overwrite each
other.) Its output goes to this terminal as it runs. A seed fails when the command exits non-zero, or its
log is missing, not ours, or unfinished; the next seed runs anyway. At the end: a table of every seed, a
JSON summary (<out-root>/<name>_seeds.json), and the commands for tools/submission/significance.py and
tools/submission/package_record.py on the seeds that finished. Exit status 0 when every seed finished, else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.dirname(os.path.dirname(TOOLS)))
import train_gpt as tg  # noqa: E402
from logparse import LogFormatError, parse_log  # noqa: E402


def run_seed(seed: int, name: str, out_root: str, command: list[str], shared_output_dir: bool) -> dict:
    run_id = f"{name}_seed{seed}"
    env = dict(os.environ, SEED=str(seed), RUN_ID=run_id)
    out_dir = env.get("OUTPUT_DIR", ".") if shared_output_dir else os.path.join(out_root, run_id)
    env["OUTPUT_DIR"] = out_dir
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "logs", f"{run_id}.txt")
    result = {"seed": seed, "run_id": run_id, "log": log_path, "artifact": os.path.join(out_dir, tg.ARTIFACT_NAME),
              "returncode": None, "ok": False, "error": None, "wall_s": None}
    print(f"=== seed {seed}: RUN_ID={run_id} OUTPUT_DIR={out_dir}: {shlex.join(command)}", flush=True)
    start = time.time()
    try:
        result["returncode"] = subprocess.call(command, env=env)
    except OSError as exc:
        result["error"] = f"could not start the command: {exc}"
        return result
    finally:
        result["wall_s"] = round(time.time() - start, 1)
    try:
        log = parse_log(log_path)
    except FileNotFoundError:
        result["error"] = f"exit {result['returncode']}, no log at {log_path}"
        return result
    except (LogFormatError, OSError) as exc:
        result["error"] = f"exit {result['returncode']}, {exc}"
        return result
    result.update(finished=log.finished, steps=log.steps, val_bpb=log.val_bpb, val_loss=log.val_loss,
                  total_bytes=log.total_bytes)
    if not os.path.exists(result["artifact"]):
        result["artifact"] = None
    if result["returncode"] != 0:
        detail = "; ".join(log.errors) if log.errors else ("unfinished log" if not log.finished else "")
        result["error"] = f"exit {result['returncode']}" + (f": {detail}" if detail else "")
    elif not log.finished:
        result["error"] = "exit 0 but the log has no final score"
    else:
        result["ok"] = True
    return result


def table(results: list[dict]) -> str:
    rows = [f"{'seed':>8} {'status':<7} {'val_bpb':>11} {'val_loss':>11} {'steps':>6} {'bytes':>11} {'wall s':>7}  detail"]
    for r in results:
        f = (lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-")  # noqa: E731
        rows.append(f"{r['seed']:>8} {'ok' if r['ok'] else 'FAILED':<7} {f('val_bpb', '.8f'):>11} {f('val_loss', '.8f'):>11} "
                    f"{f('steps', 'd'):>6} {f('total_bytes', ','):>11} {f('wall_s', '.1f'):>7}  {r['error'] or r['log']}")
    ok = [r["val_bpb"] for r in results if r["ok"]]
    if ok:
        std = f"{statistics.stdev(ok):.8f}" if len(ok) > 1 else "n/a"
        rows.append(f"{len(ok)}/{len(results)} seeds finished: val_bpb mean {statistics.fmean(ok):.8f}, std {std}")
    else:
        rows.append(f"0/{len(results)} seeds finished")
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: multi_seed.py --seeds S [S ...] [options] -- COMMAND ...  (see --help)", file=sys.stderr)
        if "-h" in argv or "--help" in argv:
            print(__doc__)
            return 0
        return 2
    split = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, required=True)
    ap.add_argument("--name", default=os.environ.get("RUN_ID", "run"))
    ap.add_argument("--out-root", default=os.environ.get("OUTPUT_DIR", "runs"))
    ap.add_argument("--shared-output-dir", action="store_true")
    a = ap.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        ap.error("no command after --")
    if len(set(a.seeds)) != len(a.seeds):
        ap.error("a seed is given twice")
    results = [run_seed(s, a.name, a.out_root, command, a.shared_output_dir) for s in a.seeds]
    print(table(results))
    os.makedirs(a.out_root, exist_ok=True)
    summary = os.path.join(a.out_root, f"{a.name}_seeds.json")
    with open(summary, "w", encoding="utf-8") as f:
        json.dump({"command": command, "seeds": results}, f, indent=1)
    print(f"summary: {summary}")
    ok = [r for r in results if r["ok"]]
    if ok:
        logs = " ".join(shlex.quote(r["log"]) for r in ok)
        print(f"significance: python3 tools/submission/significance.py --new-logs {logs} --record-json <record>/submission.json")
        arts = [r["artifact"] for r in ok]
        art = (" --artifact " + " ".join(shlex.quote(x) for x in arts)) if all(arts) and not a.shared_output_dir else ""
        print(f"package:      python3 tools/submission/package_record.py --name {a.name} --author ... --github-id ... "
              f"--log {logs}{art}")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
