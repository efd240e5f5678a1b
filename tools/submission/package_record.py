#!/usr/bin/env python3
"""Build a record folder from finished runs, or re-validate one.

  python3 tools/submission/package_record.py --name MyRecord --author "A. Person" --github-id aperson \\
      --blurb "what is new" --log runs/seed1337/logs/seed1337.txt runs/seed42/logs/seed42.txt ... \\
      [--artifact runs/seed1337/final_model.artifact ...] [--source train_gpt.py | --packed packed.py] \\
      [--date YYYY-MM-DD] [--records-dir records/track_10min_16mb] [--no-plot]
  python3 tools/submission/package_record.py --check records/track_10min_16mb/<date>_<name> [--artifact ...]

It writes records/track_10min_16mb/<date>_<name>/ with:
  train_gpt.py       the packed script (tools/submission/pack_script.py's pack_source of --source, default this repository's
                     train_gpt.py; or --packed copied as is). Its size must equal the logs' "Code size
                     (packed)": the code that is counted is the code the runs ran.
  train_seed<S>.txt  each log, copied.
  submission.json    the fields described in records/README.md.
  README.md          tools/submission/record_template.md filled in, with the per-seed results table.
  requirements.txt   what the script imports (--requirements FILE to copy one instead).
  train_curves.png   tools/submission/plot_logs.py of the logs (unless --no-plot, or matplotlib is missing).

It refuses, naming every problem: a log that is not ours or did not finish; a log that is not a FineWeb run (its
validation set is not FineWeb's ≈47.9M SP8192 / ≈62M SP1024 tokens, or VAL_TOKENS_LIMIT cut it, or DATA_PATH is
not a fineweb* folder) unless --not-fineweb, which packages it labelled as such in submission.json and README.md; two logs of one seed; logs whose
settings or code size differ (other than run_id, seed, output_dir); a total (code + model) over 16,000,000
bytes; a log whose total is not code + model, or that logged an ERROR; train or final eval time over 600 s;
an artifact whose size differs from its log's model bytes or that does not decompress; a packed script
whose size differs from the logs'; an existing folder (unless --force). The folder is assembled aside,
checked with the same checks as --check, then moved into place.

--check DIR re-reads the folder's logs and re-derives every number of submission.json, refusing a json that
disagrees with the logs (a val_bpb, a byte count, a step count...), a packed script whose size is not the
logs' code bytes or that does not import under Triton (so Triton must be installed where --check runs), an
unfinished log, a total over the limit, or a README.md that does not show each seed's val_bpb. With --artifact it also re-checks the
artifacts against the logs and the json's sha256s. Exit status: 0 accepted, 1 refused, 2 bad usage.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import statistics
import string
import subprocess
import sys
import tempfile

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(TOOLS))
for p in (TOOLS, REPO):
    if p not in sys.path:
        sys.path.insert(0, p)
import pack_script  # noqa: E402
import train_gpt as tg  # noqa: E402
from logparse import LogFormatError, RunLog, parse_log  # noqa: E402

LIMIT_BYTES = 16_000_000
TIME_LIMIT_S = 600.0
TRACK = "track_10min_16mb"
RECORDS_DIR = os.path.join(REPO, "records", TRACK)
TEMPLATE = os.path.join(TOOLS, "record_template.md")
PER_RUN_HPARAMS = ("run_id", "seed", "output_dir")  # may differ between the seeds of one record
FLOAT_TOL = 5e-9
IMPORT_TIMEOUT_S = 120
# FineWeb's validation set (the first 50,000 documents) is about 47.9M tokens with SP8192 and 62M with SP1024;
# any tokenizer between them lands in this range, a sample or a proxy set far below it.
FINEWEB_VAL_TOKENS = (40_000_000, 70_000_000)
REQUIREMENTS = """# What train_gpt.py imports. On a GPU machine install the CUDA build of torch.
# The runs of this record used torch {torch}.
torch>=2.5
numpy
sentencepiece
brotli
"""
# what requirements.txt adds for the document-attention kernel the runs logged (`varlen:` on the start-up line):
# train_gpt.py picks the fastest one installed, so a record names the one its speed came from
VARLEN_REQUIREMENTS = {
    # pinned: train_gpt.py calls its private _flash_attn_fwd/_bwd, tested with this version
    "flash_attn_4": "flash-attn-4==4.0.0b36  # document attention's kernel in these runs (log: varlen:flash_attn_4)",
    "flash_attn_3": "# FlashAttention-3 (flash_attn_interface, built from its hopper/ folder): document attention's "
                    "kernel in these runs (log: varlen:flash_attn_3)",
}


def requirements_text(logs: list) -> str:
    kernels = sorted({str(log.extras.get("varlen")) for log in logs} & VARLEN_REQUIREMENTS.keys())
    return REQUIREMENTS.format(torch=logs[0].torch_version) + "".join(VARLEN_REQUIREMENTS[k] + "\n" for k in kernels)


class PackageError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def r8(x):
    return None if x is None else round(float(x), 8)


# ---- what the logs say ----

def log_problems(log: RunLog) -> list[str]:
    """Everything that stops one log from backing a record."""
    name, out = log.path, []
    if not log.finished:
        return [f"{name}: unfinished run (no final score: final_*_roundtrip_exact, then legal_ttt_exact with "
                f"TTT_MODE): it cannot be a record"]
    for what in ("model_bytes", "code_bytes", "total_bytes"):
        if getattr(log, what) is None:
            out.append(f"{name}: no {what} line")
    if log.total_bytes is not None and log.model_bytes is not None and log.code_bytes is not None:
        if log.model_bytes + log.code_bytes != log.total_bytes:
            out.append(f"{name}: total {log.total_bytes} is not code {log.code_bytes} + model {log.model_bytes}")
        if log.total_bytes > LIMIT_BYTES:
            out.append(f"{name}: total {log.total_bytes:,} bytes exceeds the {LIMIT_BYTES:,}-byte limit by "
                       f"{log.total_bytes - LIMIT_BYTES:,}")
    for err in log.errors:
        out.append(f"{name}: the run logged an error: {err}")
    if log.train_time_ms is not None and log.train_time_ms > 1000 * TIME_LIMIT_S:
        out.append(f"{name}: training took {log.train_time_ms / 1000:.1f} s, over {TIME_LIMIT_S:.0f} s")
    if log.score_eval_ms is not None and log.score_eval_ms > 1000 * TIME_LIMIT_S:
        out.append(f"{name}: final evaluation took {log.score_eval_ms / 1000:.1f} s, over {TIME_LIMIT_S:.0f} s")
    return out


def fineweb_problems(log: RunLog) -> list[str]:
    """Why a log is not a run scored on FineWeb's whole validation set ([] = it is)."""
    name, out = log.path, []
    data_path = str(log.hparams.get("data_path", ""))
    if "fineweb" not in os.path.basename(os.path.normpath(data_path)).lower():
        out.append(f"{name}: DATA_PATH={data_path} is not a FineWeb dataset folder (data/datasets/fineweb10B_sp*)")
    if log.hparams.get("val_tokens_limit", 0):
        out.append(f"{name}: VAL_TOKENS_LIMIT={log.hparams['val_tokens_limit']} scored part of the validation set")
    low, high = FINEWEB_VAL_TOKENS
    if log.val_tokens is None or not low <= log.val_tokens <= high:
        out.append(f"{name}: a validation set of {log.val_tokens or 0:,} tokens, not FineWeb's (≈47.9M with SP8192, "
                   f"≈62M with SP1024)")
    return out


def not_fineweb_note(logs: list[RunLog]) -> str:
    return (f"> **Not a FineWeb run** (packaged with --not-fineweb): scored on {logs[0].hparams.get('data_path')}, "
            f"a validation set of {logs[0].val_tokens or 0:,} tokens. Its val_bpb is not comparable with FineWeb "
            f"records.\n\n")


def logs_agree(logs: list[RunLog]) -> list[str]:
    out = []
    seeds = [l.seed for l in logs]
    dup = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
    if dup:
        out.append(f"the same seed appears in more than one log: {dup}")
    first = logs[0]
    for l in logs[1:]:
        diff = sorted(k for k in set(first.hparams) | set(l.hparams)
                      if k not in PER_RUN_HPARAMS and first.hparams.get(k) != l.hparams.get(k))
        if diff:
            out.append(f"{l.path} was run with other settings than {first.path}: "
                       + ", ".join(f"{k}={l.hparams.get(k)} vs {first.hparams.get(k)}" for k in diff[:6]))
        if l.code_bytes != first.code_bytes:
            out.append(f"{l.path} counted {l.code_bytes} code bytes, {first.path} {first.code_bytes}: not the same code")
    return out


def seed_result(log: RunLog, log_file: str, artifact_sha256: str | None) -> dict:
    return {"seed": log.seed, "run_id": log.run_id, "log": log_file,
            "val_bpb": r8(log.val_bpb), "val_loss": r8(log.val_loss),
            "pre_quant_val_bpb": r8(log.pre_quant_val_bpb), "steps": log.steps,
            "train_time_s": round(log.train_time_ms / 1000, 3) if log.train_time_ms is not None else None,
            "eval_time_s": round(log.score_eval_ms / 1000, 3) if log.score_eval_ms is not None else None,
            "bytes_model": log.model_bytes, "bytes_total": log.total_bytes, "artifact_sha256": artifact_sha256}


def derived_fields(logs: list[RunLog], log_files: list[str], shas: list) -> dict:
    """Every number of submission.json that comes from the logs."""
    runs = [seed_result(l, f, s) for l, f, s in zip(logs, log_files, shas)]
    bpb, loss = [r["val_bpb"] for r in runs], [r["val_loss"] for r in runs]
    std = (lambda v: r8(statistics.stdev(v)) if len(v) > 1 else None)
    return {"val_bpb": r8(statistics.fmean(bpb)), "val_bpb_std": std(bpb),
            "val_loss": r8(statistics.fmean(loss)), "val_loss_std": std(loss),
            "num_seeds": len(runs), "seeds": [r["seed"] for r in runs],
            "bytes_total": max(r["bytes_total"] for r in runs), "bytes_code": logs[0].code_bytes,
            "bytes_model": max(r["bytes_model"] for r in runs),
            "steps_mean": round(statistics.fmean(r["steps"] for r in runs), 1),
            "train_time_s_max": max(r["train_time_s"] for r in runs),
            "eval_time_s_max": max(r["eval_time_s"] for r in runs),
            "world_size": logs[0].world_size, "device": logs[0].device, "torch": logs[0].torch_version,
            "seed_results": runs}


def artifact_problems(logs: list[RunLog], artifacts: list[str]) -> tuple[list[str], list]:
    out, shas = [], []
    if len(artifacts) != len(logs):
        return [f"{len(artifacts)} artifact(s) for {len(logs)} log(s): give one per log, in the same order"], [None] * len(logs)
    for log, path in zip(logs, artifacts):
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                tg.decompress_artifact(f.read())
        except (OSError, tg.ArtifactError) as exc:
            out.append(f"{path}: {exc}")
            shas.append(None)
            continue
        if log.model_bytes is not None and size != log.model_bytes:
            out.append(f"{path} is {size:,} bytes, its log {log.path} says the model is {log.model_bytes:,}")
        shas.append(sha256_file(path))
    return out, shas


# ---- --check ----

def _differs(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a != b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return not math.isclose(a, b, rel_tol=0, abs_tol=FLOAT_TOL)
    return a != b


def check_folder(folder: str, artifacts: list[str] | None = None) -> list[str]:
    """Problems with an existing record folder ([] = accepted)."""
    out = []
    for f in ("submission.json", "README.md", "train_gpt.py", "requirements.txt"):
        if not os.path.isfile(os.path.join(folder, f)):
            out.append(f"{folder}: {f} is missing")
    if out:
        return out
    try:
        with open(os.path.join(folder, "submission.json"), encoding="utf-8") as f:
            sub = json.load(f)
    except ValueError as exc:
        return [f"{folder}/submission.json: not JSON: {exc}"]
    for key in ("name", "author", "github_id", "date", "blurb", "val_bpb", "seed_results", "bytes_total"):
        if key not in sub:
            out.append(f"submission.json lacks {key}")
    runs = sub.get("seed_results") or []
    if not runs:
        return out + ["submission.json has no seed_results"]
    logs, files = [], []
    for r in runs:
        path = os.path.join(folder, str(r.get("log", "")))
        try:
            logs.append(parse_log(path))
            files.append(r["log"])
        except (LogFormatError, OSError) as exc:
            out.append(f"seed {r.get('seed')}: log {r.get('log')!r}: {exc}")
    if out:
        return out
    for log in logs:
        out += [p.replace(log.path, os.path.basename(log.path)) for p in log_problems(log)]
    out += logs_agree(logs)
    if any(fineweb_problems(l) for l in logs) and sub.get("not_fineweb") is not True:
        out.append("the logs are not FineWeb runs but submission.json does not say so (\"not_fineweb\": true)")
    if any(not l.finished for l in logs):
        return out
    shas = [r.get("artifact_sha256") for r in runs]
    if artifacts:
        art_out, art_shas = artifact_problems(logs, artifacts)
        out += art_out
        for r, s in zip(runs, art_shas):
            if s is not None and r.get("artifact_sha256") not in (None, s):
                out.append(f"seed {r.get('seed')}: artifact sha256 {s[:12]}… is not the json's {str(r['artifact_sha256'])[:12]}…")
    expected = derived_fields(logs, files, shas)
    for key, value in expected.items():
        if key == "seed_results":
            continue
        if _differs(sub.get(key), value):
            out.append(f"submission.json {key} = {sub.get(key)!r}, the logs give {value!r}")
    for got, want in zip(runs, expected["seed_results"]):
        for key, value in want.items():
            if _differs(got.get(key), value):
                out.append(f"submission.json seed_results seed {want['seed']}: {key} = {got.get(key)!r}, its log gives {value!r}")
    script = os.path.join(folder, "train_gpt.py")
    size = os.path.getsize(script)
    with open(script, "rb") as f:
        if not pack_script.is_packed(f.read()):
            out.append(f"train_gpt.py ({size:,} bytes) is not a packed script: run tools/submission/pack_script.py on it")
    out += import_problems(script)
    if size != logs[0].code_bytes:
        out.append(f"train_gpt.py is {size:,} bytes, the logs counted {logs[0].code_bytes:,} bytes of code: "
                   f"not the code the runs counted")
    if sub.get("bytes_total", 0) > LIMIT_BYTES:
        out.append(f"bytes_total {sub['bytes_total']:,} exceeds {LIMIT_BYTES:,}")
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for r in expected["seed_results"]:
        if f"{r['val_bpb']:.8f}" not in readme:
            out.append(f"README.md does not show seed {r['seed']}'s val_bpb {r['val_bpb']:.8f}")
    return out


IMPORT_CHECK = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("submission", sys.argv[1])
module = sys.modules["submission"] = importlib.util.module_from_spec(spec)  # the dataclass looks itself up there
spec.loader.exec_module(module)
print("triton:" + module.triton_description())
"""


def import_problems(script: str) -> list[str]:
    """The script imported as a module (its main() does not run) with Triton really compiling its @jit kernels,
    as on every GPU machine: TRITON_INTERPRET, which hides source lookups, is unset."""
    return list(_import_problems(script, sha256_file(script)))


@functools.lru_cache(maxsize=16)
def _import_problems(script: str, sha256: str) -> tuple[str, ...]:  # one import per script content
    try:
        import triton  # noqa: F401
    except ImportError:
        return (f"cannot check that {script} imports under Triton: Triton is not installed here (pip install triton)",)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK, script], env=env, capture_output=True, text=True,
                              timeout=IMPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return (f"{script} did not import within {IMPORT_TIMEOUT_S} s",)
    if proc.returncode != 0:
        return (f"{script} fails to import under Triton: {proc.stderr.strip().splitlines()[-1]}",)
    if "triton:none" in proc.stdout:
        return (f"{script} imported without Triton, though it is installed here",)
    return ()


# ---- building ----

def sanitize(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip()).strip("_.")
    if not clean:
        raise PackageError([f"--name {name!r} has no usable characters"])
    return clean


def overrides(log: RunLog, as_env: bool = False):
    """The run's settings that differ from train_gpt.py's defaults (paths and per-run names left out); as_env: as
    shell words, with DATA_PATH and TOKENIZER_PATH first, so the command alone names everything the run used."""
    defaults = tg.Hyperparameters()
    skip = set(PER_RUN_HPARAMS) | {"data_path", "tokenizer_path"}
    diff = {k.upper(): v for k, v in log.hparams.items()
            if k not in skip and hasattr(defaults, k) and getattr(defaults, k) != v}
    if as_env:
        paths = {k.upper(): log.hparams[k] for k in ("data_path", "tokenizer_path") if k in log.hparams}
        return [f"{k}={shlex.quote(str(v))}" for k, v in {**paths, **diff}.items()]
    return ", ".join(f"`{k}={v}`" for k, v in diff.items()) if diff else "none"


def results_table(sub: dict) -> str:
    rows = ["| seed | val_bpb | val_loss | pre-quant val_bpb | steps | train time (s) | eval time (s) | model bytes | total bytes |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in sub["seed_results"]:
        pq = f"{r['pre_quant_val_bpb']:.4f}" if r["pre_quant_val_bpb"] is not None else "-"
        rows.append(f"| {r['seed']} | {r['val_bpb']:.8f} | {r['val_loss']:.8f} | {pq} | {r['steps']} | "
                    f"{r['train_time_s']:.1f} | {r['eval_time_s']:.1f} | {r['bytes_model']:,} | {r['bytes_total']:,} |")
    std = lambda v: f"{v:.8f}" if v is not None else "n/a"  # noqa: E731
    rows.append(f"| **mean** | **{sub['val_bpb']:.8f}** (std {std(sub['val_bpb_std'])}) | {sub['val_loss']:.8f} "
                f"(std {std(sub['val_loss_std'])}) | | {sub['steps_mean']} | ≤ {sub['train_time_s_max']:.1f} | "
                f"≤ {sub['eval_time_s_max']:.1f} | ≤ {sub['bytes_model']:,} | ≤ {sub['bytes_total']:,} |")
    return "\n".join(rows)


def render_readme(sub: dict, logs: list[RunLog], plot_file: str | None, template: str = TEMPLATE) -> str:
    with open(template, encoding="utf-8") as f:
        tpl = string.Template(f.read())
    first = logs[0]
    nproc = first.world_size or 1
    env = " ".join(overrides(first, as_env=True))
    command = (env + " " if env else "") + "SEED=<seed> RUN_ID=<run_id> " + (f"torchrun --standalone --nproc_per_node={nproc} train_gpt.py"
                                                if nproc > 1 else "python3 train_gpt.py")
    setup = (f"{first.world_size} process(es) on {first.device}, torch {first.torch_version}, attention "
             f"{first.attention}; {first.model_params:,} parameters; validation set of {first.val_tokens:,} "
             f"tokens, {first.val_bytes:,} bytes." if first.model_params and first.val_tokens else
             f"{first.world_size} process(es) on {first.device}, torch {first.torch_version}.")
    std = sub["val_bpb_std"]
    readme = tpl.substitute(
        name=sub["name"], blurb=sub["blurb"] or "", val_bpb=f"{sub['val_bpb']:.8f}",
        val_bpb_std=f"{std:.8f}" if std is not None else "n/a (one seed)", val_loss=f"{sub['val_loss']:.8f}",
        num_seeds=sub["num_seeds"], bytes_total=f"{sub['bytes_total']:,}",
        headroom=f"{LIMIT_BYTES - sub['bytes_total']:,}", author=sub["author"], github_id=sub["github_id"],
        date=sub["date"], results_table=results_table(sub),
        plot=f"![train loss and val_bpb]({plot_file})" if plot_file else "",
        bytes_code=f"{sub['bytes_code']:,}", bytes_model=f"{sub['bytes_model']:,}", setup=setup,
        command=command, overrides=overrides(first),
        log_files=", ".join(f"`{r['log']}`" for r in sub["seed_results"]),
        plot_file=f"- `{plot_file}`: train loss and val_bpb by step and by training time." if plot_file else "")
    if sub.get("not_fineweb"):
        title, rest = readme.split("\n", 1)
        readme = f"{title}\n\n{not_fineweb_note(logs)}{rest.lstrip(chr(10))}"
    return readme


def package(a) -> str:
    problems = []
    logs = []
    for path in a.log:
        try:
            logs.append(parse_log(path))
        except (LogFormatError, OSError) as exc:
            problems.append(str(exc))
    if problems:
        raise PackageError(problems)
    for log in logs:
        problems += log_problems(log)
        if not a.not_fineweb:
            problems += [p + " (pass --not-fineweb to package it labelled as not a FineWeb run)"
                         for p in fineweb_problems(log)]
    problems += logs_agree(logs)
    shas = [None] * len(logs)
    if a.artifact:
        art_problems, shas = artifact_problems(logs, a.artifact)
        problems += art_problems
    if a.packed:
        with open(a.packed, "rb") as f:
            packed = f.read()
        if not pack_script.is_packed(packed):
            problems.append(f"{a.packed} is not a packed script (run tools/submission/pack_script.py, or give it as --source)")
    else:
        with open(a.source, encoding="utf-8") as f:
            packed = pack_script.pack_source(f.read())
    code_bytes = len(packed)
    if logs and logs[0].code_bytes is not None and code_bytes != logs[0].code_bytes:
        problems.append(f"{a.packed or a.source} packs to {code_bytes:,} bytes, the logs counted {logs[0].code_bytes:,}: "
                        f"not the code the runs used (give the script they ran with --source or --packed)")
    date = a.date or datetime.date.today().isoformat()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        problems.append(f"--date {date!r} is not YYYY-MM-DD")
    folder_name = f"{date}_{sanitize(a.name)}"
    dest = os.path.join(a.records_dir, folder_name)
    if os.path.exists(dest) and not a.force:
        problems.append(f"{dest} exists (use --force to replace it)")
    if problems:
        raise PackageError(problems)

    log_files = [f"train_seed{l.seed}.txt" for l in logs]
    sub = {"name": a.name, "author": a.author, "github_id": a.github_id, "date": date, "track": TRACK,
           "blurb": a.blurb, **derived_fields(logs, log_files, shas)}
    if a.not_fineweb:
        sub.update(not_fineweb=True, dataset=str(logs[0].hparams.get("data_path")))
    os.makedirs(a.records_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{folder_name}.", dir=a.records_dir)
    try:
        with open(os.path.join(tmp, "train_gpt.py"), "wb") as f:
            f.write(packed)
        for log, name in zip(logs, log_files):
            shutil.copyfile(log.path, os.path.join(tmp, name))
        if a.requirements:
            shutil.copyfile(a.requirements, os.path.join(tmp, "requirements.txt"))
        else:
            with open(os.path.join(tmp, "requirements.txt"), "w", encoding="utf-8") as f:
                f.write(requirements_text(logs))
        plot_file = None
        if not a.no_plot:
            try:
                import plot_logs
                plot_logs.plot([os.path.join(tmp, n) for n in log_files], os.path.join(tmp, "train_curves.png"),
                               title=f"{a.name}: {len(logs)} seed(s)")
                plot_file = "train_curves.png"
            except ImportError as exc:
                print(f"note: no plot ({exc}); install matplotlib for train_curves.png", file=sys.stderr)
        with open(os.path.join(tmp, "submission.json"), "w", encoding="utf-8") as f:
            json.dump(sub, f, indent=2)
            f.write("\n")
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(render_readme(sub, logs, plot_file, a.template))
        check = check_folder(tmp, a.artifact)
        if check:
            raise PackageError([f"the assembled folder fails its own check: {p}" for p in check])
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", metavar="DIR", help="re-validate an existing record folder")
    ap.add_argument("--log", nargs="+", help="finished train logs, one per seed")
    ap.add_argument("--artifact", nargs="+", help=f"{tg.ARTIFACT_NAME} of each log, same order (checked, hashed; not copied)")
    ap.add_argument("--name")
    ap.add_argument("--author")
    ap.add_argument("--github-id")
    ap.add_argument("--blurb", default="")
    ap.add_argument("--date", help="YYYY-MM-DD (default today)")
    code = ap.add_mutually_exclusive_group()
    code.add_argument("--source", default=os.path.join(REPO, "train_gpt.py"), help="script to pack (default: this repo's train_gpt.py)")
    code.add_argument("--packed", help="an already packed script to copy as is")
    ap.add_argument("--requirements", help="requirements.txt to copy (default: written from the logs)")
    ap.add_argument("--records-dir", default=RECORDS_DIR)
    ap.add_argument("--template", default=TEMPLATE)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--force", action="store_true", help="replace an existing folder")
    ap.add_argument("--not-fineweb", action="store_true",
                    help="package runs not scored on FineWeb's validation set, labelled so (not a record)")
    a = ap.parse_args(argv)
    if a.check:
        problems = check_folder(a.check, a.artifact)
        if problems:
            print(f"REFUSED {a.check}:", *(f"  - {p}" for p in problems), sep="\n", file=sys.stderr)
            return 1
        with open(os.path.join(a.check, "submission.json"), encoding="utf-8") as f:
            sub = json.load(f)
        print(f"OK {a.check}: val_bpb {sub['val_bpb']:.8f} over {sub['num_seeds']} seed(s), "
              f"{sub['bytes_total']:,} bytes (headroom {LIMIT_BYTES - sub['bytes_total']:,})")
        return 0
    missing = [f"--{k.replace('_', '-')}" for k in ("log", "name", "author", "github_id") if not getattr(a, k)]
    if missing:
        ap.error(f"building a record needs {', '.join(missing)} (or use --check DIR)")
    try:
        dest = package(a)
    except PackageError as exc:
        print("REFUSED:", *(f"  - {p}" for p in exc.problems), sep="\n", file=sys.stderr)
        return 1
    print(f"wrote {dest}")
    print(f"check it again any time: python3 tools/submission/package_record.py --check {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
