#!/usr/bin/env python3
"""Plot train_gpt.py logs: train loss and val_bpb against steps and against training wall-clock, one PNG.

  python3 tools/submission/plot_logs.py logs/seed1337.txt logs/seed42.txt -o curves.png [--title TEXT] [--size 12x8 --dpi 100]

Four panels: train loss by step, train loss by training time (the timed loop's clock, without evaluation),
val_bpb by step and by training time. val_bpb points come from VAL_LOSS_EVERY lines, the pre-quantization
EMA score (circle) and the run's score (star: the artifact's round trip, or its TTT score) at the last step.
The train loss axis is logarithmic so the late, flat part stays readable. Unfinished runs are plotted as far as they
got and marked "(unfinished)" in the legend. The image is WIDTH×HEIGHT inches at DPI, exactly (no cropping).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from logparse import LogFormatError, parse_log  # noqa: E402


def label_for(log) -> str:
    name = f"{log.run_id} (seed {log.seed})"
    if not log.finished:
        name += " (unfinished)"
    elif log.val_bpb is not None:
        name += f": {log.val_bpb:.4f}"
    return name


def plot(paths: list[str], out: str, title: str | None = None, size=(12.0, 8.0), dpi: int = 100) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [parse_log(p) for p in paths]
    from matplotlib.ticker import FormatStrFormatter
    fig, axes = plt.subplots(2, 2, figsize=size, dpi=dpi, sharex="col")
    (ax_ls, ax_lt), (ax_bs, ax_bt) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, log in enumerate(logs):
        c = colors[i % len(colors)]
        label = label_for(log)
        if log.train:
            steps = [p.step for p in log.train]
            secs = [p.train_time_ms / 1000 for p in log.train]
            loss = [p.train_loss for p in log.train]
            ax_ls.plot(steps, loss, color=c, lw=1.2, label=label)
            ax_lt.plot(secs, loss, color=c, lw=1.2, label=label)
        vs = [(p.step, p.train_time_ms / 1000, p.val_bpb) for p in log.val]
        if vs:
            ax_bs.plot([v[0] for v in vs], [v[2] for v in vs], color=c, marker=".", lw=1.2, label=label)
            ax_bt.plot([v[1] for v in vs], [v[2] for v in vs], color=c, marker=".", lw=1.2, label=label)
        end_step, end_s = log.steps, (log.train_time_ms or 0) / 1000
        for value, marker, what in ((log.pre_quant_val_bpb, "o", "pre-quant EMA"), (log.val_bpb, "*", "score")):
            if value is not None and end_step is not None:
                kw = dict(color=c, marker=marker, ms=9, ls="none", mfc="none" if marker == "o" else c, zorder=3)
                ax_bs.plot([end_step], [value], **kw)
                ax_bt.plot([end_s], [value], **kw)
                ax_bs.annotate(f"{value:.4f}", (end_step, value), textcoords="offset points", xytext=(6, (4 + 10 * i) if marker == "*" else (-12 - 10 * i)),
                               fontsize=8, color=c)
    ax_ls.set(title="train loss by step", xlabel="step", ylabel="train loss (nats/token)", yscale="log")
    ax_lt.set(title="train loss by training time", xlabel="training time (s)", ylabel="train loss (nats/token)", yscale="log")
    ax_bs.set(title="val_bpb by step (o pre-quant EMA, * score of the artifact)", xlabel="step", ylabel="val_bpb")
    ax_bt.set(title="val_bpb by training time (o pre-quant EMA, * score)", xlabel="training time (s)", ylabel="val_bpb")
    for ax in (ax_ls, ax_lt):
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.set_xlim(left=0)
        ax.margins(y=0.12)
        if ax is not ax_ls and ax is not ax_bs or not ax.get_legend_handles_labels()[0]:
            continue
        ax.legend(fontsize=8, loc="upper right")
        if not ax.has_data():
            ax.text(0.5, 0.5, "no points in these logs", ha="center", va="center", transform=ax.transAxes, color="gray")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+")
    ap.add_argument("-o", "--out", default="curves.png")
    ap.add_argument("--title")
    ap.add_argument("--size", default="12x8", help="WIDTHxHEIGHT in inches (default 12x8)")
    ap.add_argument("--dpi", type=int, default=100)
    a = ap.parse_args(argv)
    try:
        w, h = (float(x) for x in a.size.lower().split("x"))
    except ValueError:
        print(f"error: --size {a.size!r} is not WIDTHxHEIGHT", file=sys.stderr)
        return 2
    try:
        plot(a.logs, a.out, a.title, (w, h), a.dpi)
    except (LogFormatError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} ({round(w * a.dpi)}x{round(h * a.dpi)} px) from {len(a.logs)} log(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
