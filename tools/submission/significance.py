#!/usr/bin/env python3
"""The challenge's acceptance test for a new record: a one-sided Welch t-test that the new runs beat the
current record by more than THRESHOLD nats (default 0.005) at p < ALPHA (default 0.01).

  python3 tools/submission/significance.py --new-logs logs/s1337.txt logs/s42.txt logs/s2025.txt \\
      --record-json records/track_10min_16mb/<date>_<name>/submission.json
  python3 tools/submission/significance.py --new-bpb 1.0801 1.0805 1.0799 --record-stats 1.0861 0.0007 3 --ratio 2.0707

Units. The threshold is in nats; the test runs on val_loss in nats per token, of each run's score (the TTT
score, legal_ttt_exact, unless TTT_MODE=none; else the round trip). val_bpb
is bits per byte: val_loss = val_bpb · ln 2 · (validation bytes / validation tokens), so the factor
R = val_loss / val_bpb is fixed by the tokenizer and validation set (about 2.07 for SP8192 on the proxy set).
  - From logs (--new-logs, --record-logs) or a record's submission.json, each run's own val_loss is used:
    no conversion.
  - Numbers given as val_bpb (--new-bpb, --record-bpb, --record-stats ... with --record-unit bpb) are
    multiplied by R: --ratio R, or else the R of the logs given on the other side (same validation set
    assumed, and said so in the output). Without either, the tool stops and asks for --ratio.
  - --new-loss / --record-loss (and --record-unit nats) take nats per token directly.
Standard deviations are sample ones (n − 1). The record can be given as per-seed values or as MEAN STD N.

Hypotheses: H0: mean_record − mean_new ≤ THRESHOLD; H1: mean_record − mean_new > THRESHOLD.
  t = (mean_record − mean_new − THRESHOLD) / sqrt(s_record²/n_record + s_new²/n_new)
  dof = Welch–Satterthwaite; p = P(T_dof ≥ t), with the Student t CDF computed here (regularized incomplete
  beta by continued fraction), so no scipy is needed at run time.
Exit status: 0 when the improvement is significant, 1 when it is not, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from logparse import LogFormatError, parse_log  # noqa: E402

THRESHOLD_NATS = 0.005
ALPHA = 0.01


# ---- Student t distribution ----

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, dof: float) -> float:
    """P(T ≥ t) for Student's t with `dof` (not necessarily integer) degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(dof / 2.0, 0.5, dof / (dof + t * t))  # P(T ≥ |t|)
    return tail if t >= 0 else 1.0 - tail


# ---- the test ----

@dataclass
class Sample:
    label: str
    mean: float  # nats per token
    std: float  # sample std (n − 1), nats per token
    n: int
    values: list | None  # per-run nats, when known
    source: str  # where the numbers came from and how they were converted


def welch(record: Sample, new: Sample, threshold: float = THRESHOLD_NATS, alpha: float = ALPHA) -> dict:
    if record.n < 2 or new.n < 2:
        raise ValueError(f"Welch's test needs at least 2 runs a side (record n={record.n}, new n={new.n})")
    vr, vn = record.std ** 2 / record.n, new.std ** 2 / new.n
    se = math.sqrt(vr + vn)
    improvement = record.mean - new.mean
    if se == 0.0:
        t = math.inf if improvement > threshold else -math.inf
        dof = float(record.n + new.n - 2)
    else:
        t = (improvement - threshold) / se
        dof = (vr + vn) ** 2 / (vr ** 2 / (record.n - 1) + vn ** 2 / (new.n - 1))
    p = t_sf(t, dof)
    return {"record_mean": record.mean, "record_std": record.std, "record_n": record.n,
            "new_mean": new.mean, "new_std": new.std, "new_n": new.n, "improvement": improvement,
            "threshold": threshold, "se": se, "dof": dof, "t": t, "p": p, "alpha": alpha,
            "significant": bool(improvement > threshold and p < alpha)}


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _from_logs(paths: list[str], label: str) -> tuple[Sample, float]:
    logs = [parse_log(p) for p in paths]
    unfinished = [l.path for l in logs if not l.finished]
    if unfinished:
        raise ValueError(f"{label}: unfinished log(s), no final score: {', '.join(unfinished)}")
    values = [l.val_loss for l in logs]
    ratios = [l.val_loss / l.val_bpb for l in logs]
    mean, std = _stats(values)
    return Sample(label, mean, std, len(values), values, f"val_loss of {len(logs)} log(s)"), statistics.fmean(ratios)


def _from_json(path: str, label: str) -> tuple[Sample, float]:
    with open(path, encoding="utf-8") as f:
        sub = json.load(f)
    runs = sub.get("seed_results")
    if not runs:
        raise ValueError(f"{path}: no seed_results (per-seed scores) in this submission.json")
    values = [float(r["val_loss"]) for r in runs]
    ratio = statistics.fmean(float(r["val_loss"]) / float(r["val_bpb"]) for r in runs)
    mean, std = _stats(values)
    return Sample(label, mean, std, len(values), values, f"val_loss of {len(values)} seed(s) in {path}"), ratio


def build_sample(label: str, logs, json_path, bpb, loss, stats, unit, ratio, fallback_ratio) -> tuple[Sample, float | None]:
    """One side of the test in nats per token, and the nats-per-bpb ratio its logs give (None without logs)."""
    given = [x for x in (logs, json_path, bpb, loss, stats) if x]
    if len(given) != 1:
        raise ValueError(f"give the {label} runs exactly one way (logs, json, bpb values, loss values or stats)")
    if logs:
        return _from_logs(logs, label)
    if json_path:
        return _from_json(json_path, label)
    if loss:
        mean, std = _stats(loss)
        return Sample(label, mean, std, len(loss), list(loss), "val_loss values given (nats per token)"), None
    if stats and unit == "nats":
        mean, std, n = stats
        return Sample(label, mean, std, int(n), None, "mean/std/n given in nats per token"), None
    r = ratio or fallback_ratio
    if not r:
        raise ValueError(f"{label} runs are given in val_bpb: pass --ratio (val_loss/val_bpb of the validation "
                         f"set, ln2·bytes/tokens) or give the other side as logs")
    how = f"val_bpb × {r:.6f} ({'--ratio' if ratio else 'ratio of the other side’s logs, same validation set assumed'})"
    if bpb:
        values = [v * r for v in bpb]
        mean, std = _stats(values)
        return Sample(label, mean, std, len(values), values, how), None
    mean, std, n = stats
    return Sample(label, mean * r, std * r, int(n), None, "mean/std/n " + how), None


def report(res: dict, record: Sample, new: Sample, ratio: float | None) -> str:
    lines = [f"record: {record.source}", f"new:    {new.source}"]
    for s in (record, new):
        if s.values:
            lines.append(f"  {s.label} per-run val_loss (nats/token): " + " ".join(f"{v:.8f}" for v in s.values))
    lines += [f"record: mean {res['record_mean']:.8f}  std {res['record_std']:.8f}  n {res['record_n']}",
              f"new:    mean {res['new_mean']:.8f}  std {res['new_std']:.8f}  n {res['new_n']}",
              f"improvement (record − new): {res['improvement']:.8f} nats; threshold {res['threshold']} nats"]
    if ratio:
        lines.append(f"  in bits per byte (÷ {ratio:.6f}): improvement {res['improvement'] / ratio:.8f}, "
                     f"threshold {res['threshold'] / ratio:.8f}")
    lines += [f"Welch: se {res['se']:.8g}  dof {res['dof']:.4f}  t {res['t']:.6f}  one-sided p {res['p']:.6g}  alpha {res['alpha']}",
              ("PASS: the improvement exceeds {thr} nats at p = {p:.3g} < {a}" if res["significant"] else
               "FAIL: not shown that the improvement exceeds {thr} nats at p < {a} (p = {p:.3g})").format(
                  thr=res["threshold"], p=res["p"], a=res["alpha"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-logs", nargs="+", help="logs of the new runs (one per seed)")
    ap.add_argument("--new-bpb", nargs="+", type=float, help="val_bpb of the new runs")
    ap.add_argument("--new-loss", nargs="+", type=float, help="val_loss (nats per token) of the new runs")
    ap.add_argument("--record-logs", nargs="+", help="logs of the current record's runs")
    ap.add_argument("--record-json", help="the current record's submission.json (its seed_results)")
    ap.add_argument("--record-bpb", nargs="+", type=float, help="the record's per-seed val_bpb")
    ap.add_argument("--record-loss", nargs="+", type=float, help="the record's per-seed val_loss (nats per token)")
    ap.add_argument("--record-stats", nargs=3, type=float, metavar=("MEAN", "STD", "N"),
                    help="the record's mean, sample std and number of seeds (unit: --record-unit)")
    ap.add_argument("--record-unit", choices=("bpb", "nats"), default="bpb", help="unit of --record-stats (default bpb)")
    ap.add_argument("--ratio", type=float, help="val_loss/val_bpb (= ln2 · val bytes / val tokens) for values given in bpb")
    ap.add_argument("--threshold", type=float, default=THRESHOLD_NATS, help="required improvement in nats (default 0.005)")
    ap.add_argument("--alpha", type=float, default=ALPHA, help="significance level (default 0.01)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead of text")
    a = ap.parse_args(argv)
    try:
        new_logs_ratio = _from_logs(a.new_logs, "new")[1] if a.new_logs else None
        rec_logs_ratio = (_from_logs(a.record_logs, "record")[1] if a.record_logs else
                          _from_json(a.record_json, "record")[1] if a.record_json else None)
        new, _ = build_sample("new", a.new_logs, None, a.new_bpb, a.new_loss, None, "nats", a.ratio, rec_logs_ratio)
        record, _ = build_sample("record", a.record_logs, a.record_json, a.record_bpb, a.record_loss, a.record_stats,
                                 a.record_unit, a.ratio, new_logs_ratio)
        res = welch(record, new, a.threshold, a.alpha)
    except (ValueError, LogFormatError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ratio = a.ratio or new_logs_ratio or rec_logs_ratio
    if a.json:
        print(json.dumps({**res, "ratio_nats_per_bpb": ratio, "record_source": record.source, "new_source": new.source,
                          "record_values": record.values, "new_values": new.values}, indent=1))
    else:
        print(report(res, record, new, ratio))
    return 0 if res["significant"] else 1


if __name__ == "__main__":
    sys.exit(main())
