#!/usr/bin/env python3
"""Parse the logs that train_gpt.py writes (logs/<RUN_ID>.txt): one shared reader for every submission tool.

  python3 tools/submission/logparse.py logs/RUN.txt [...]      # prints each log's main fields as JSON

A log's first line holds every hyperparameter as `name=value`; the lines after it are `key:value` records
(see train_gpt.py's main()). `parse_log(path)` returns a `RunLog`. A log cut short (a run that died or is
still running) parses: the fields it never reached are None and `finished` is False. A file that is not one
of our logs raises `LogFormatError` naming the file and what is wrong. A newer train_gpt.py that logs more
does not break the tools: `key:value` fields added to a known line, or lines made only of such fields, go to
`RunLog.extras`; any other line it does not know is kept in `RunLog.unknown_lines`. The last line of a file
that does not end in a newline was cut mid-write and is not parsed (it goes to `unknown_lines`).

The run's score (`val_bpb`, `val_loss`, `score_eval_ms`) is the exact round trip of the artifact, or, in a run
with TTT_MODE sgd or lora, the test-time-training score that follows it (`legal_ttt_exact`): such a run is
finished only once that line is written.
"""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

# Keys the first line must have for the file to count as one of our logs.
REQUIRED_HPARAMS = ("run_id", "seed", "vocab_size", "iterations", "train_batch_tokens")


class LogFormatError(ValueError):
    """The file is not a train_gpt.py log (or is not readable as text)."""


@dataclass
class TrainPoint:
    step: int
    total_steps: int
    train_loss: float
    train_time_ms: float
    step_avg_ms: float


@dataclass
class ValPoint:
    step: int
    total_steps: int
    val_loss: float
    val_bpb: float
    train_time_ms: float
    step_avg_ms: float


@dataclass
class RunLog:
    path: str
    hparams: dict  # name → value (int, float, bool or str, as the text reads)
    world_size: Optional[int] = None
    device: Optional[str] = None
    torch_version: Optional[str] = None
    attention: Optional[str] = None
    val_tokens: Optional[int] = None
    val_bytes: Optional[int] = None
    model_params: Optional[int] = None
    grad_accum_steps: Optional[int] = None
    micro_batch_tokens: Optional[int] = None
    compile_warmup_steps: Optional[int] = None
    compile_warmup_s: Optional[float] = None
    train: list = field(default_factory=list)  # TrainPoint, in log order
    val: list = field(default_factory=list)  # ValPoint from VAL_LOSS_EVERY, in log order
    stopped_early: bool = False
    stop_train_time_ms: Optional[float] = None
    stop_step: Optional[int] = None
    peak_mem_allocated_mib: Optional[int] = None
    peak_mem_reserved_mib: Optional[int] = None
    pre_quant_step: Optional[int] = None
    pre_quant_val_loss: Optional[float] = None
    pre_quant_val_bpb: Optional[float] = None
    pre_quant_eval_ms: Optional[float] = None
    payload_bytes: Optional[int] = None
    compressed_bytes: Optional[int] = None
    quantize_compress_s: Optional[float] = None
    quant_label: Optional[str] = None  # e.g. "int6+brotli"
    model_bytes: Optional[int] = None
    code_bytes: Optional[int] = None
    total_bytes: Optional[int] = None
    errors: list = field(default_factory=list)  # the run's own "ERROR: ..." lines (e.g. over the size limit)
    final_label: Optional[str] = None  # e.g. "int6_brotli"
    final_val_loss: Optional[float] = None  # 4 decimals, from the roundtrip line
    final_val_bpb: Optional[float] = None
    final_eval_ms: Optional[float] = None
    final_exact_val_loss: Optional[float] = None  # 8 decimals, from the last line of a finished run
    final_exact_val_bpb: Optional[float] = None
    ttt_val_loss: Optional[float] = None  # 8 decimals, from the legal_ttt_exact line of a TTT_MODE run
    ttt_val_bpb: Optional[float] = None
    ttt_eval_ms: Optional[float] = None
    extras: dict = field(default_factory=dict)  # key:value fields this parser has no slot for (e.g. fused_ce)
    truncated_last_line: bool = False  # the file does not end with a newline: cut mid-write; that line is not parsed
    unknown_lines: list = field(default_factory=list)  # (line number, text)

    # ---- derived values ----
    @property
    def ttt(self) -> bool:
        """The run scores with test-time training (TTT_MODE sgd or lora), after the plain round trip."""
        return self.hparams.get("ttt_mode", "none") != "none"

    @property
    def finished(self) -> bool:
        """A finished run ends with its score: the exact round trip, then the TTT score when TTT_MODE is set."""
        return self.final_exact_val_bpb is not None and (self.ttt_val_bpb is not None or not self.ttt)

    @property
    def seed(self):
        return self.hparams.get("seed")

    @property
    def run_id(self):
        return self.hparams.get("run_id")

    @property
    def val_bpb(self) -> Optional[float]:
        """The run's score: the TTT val_bpb in a TTT run, else the exact round trip's (None until it is logged)."""
        return self.ttt_val_bpb if self.ttt else self.final_exact_val_bpb

    @property
    def val_loss(self) -> Optional[float]:
        """Nats per token of the score (None until it is logged)."""
        return self.ttt_val_loss if self.ttt else self.final_exact_val_loss

    @property
    def score_eval_ms(self) -> Optional[float]:
        """How long the evaluation that gave the score took: the TTT line's eval_time in a TTT run (artifact load
        included), else the round trip's."""
        return self.ttt_eval_ms if self.ttt else self.final_eval_ms

    @property
    def steps(self) -> Optional[int]:
        """Optimizer steps taken: from the pre-quant line, else the early stop, else the last step logged."""
        if self.pre_quant_step is not None:
            return self.pre_quant_step
        if self.stop_step is not None:
            return self.stop_step
        points = self.train + self.val
        return max(p.step for p in points) if points else None

    @property
    def train_time_ms(self) -> Optional[float]:
        """Timed training: the early-stop reading, else the latest step line's (exact when it is the last step)."""
        if self.stop_train_time_ms is not None:
            return self.stop_train_time_ms
        points = sorted(self.train + self.val, key=lambda p: (p.step, p.train_time_ms))
        return points[-1].train_time_ms if points else None

    @property
    def nats_per_bpb(self) -> Optional[float]:
        """val_loss / val_bpb = ln 2 · bytes / tokens of the validation set: turns bits per byte into nats per token."""
        if self.val_tokens and self.val_bytes:
            return math.log(2) * self.val_bytes / self.val_tokens
        if self.final_exact_val_bpb:
            return self.final_exact_val_loss / self.final_exact_val_bpb
        return None

    def summary(self) -> dict:
        keys = ("path", "run_id", "seed", "finished", "steps", "train_time_ms", "pre_quant_val_bpb", "val_loss",
                "val_bpb", "final_eval_ms", "final_exact_val_bpb", "score_eval_ms", "model_bytes", "code_bytes", "total_bytes", "world_size", "device")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(finished=self.finished, steps=self.steps, train_time_ms=self.train_time_ms, val_bpb=self.val_bpb,
                 val_loss=self.val_loss, score_eval_ms=self.score_eval_ms)
        return d


def parse_value(text: str):
    """Hyperparameter text → int, float, bool or str, the way train_gpt.py printed it."""
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_hparams(line: str, path: str) -> dict:
    parts = line.split(" ")
    if not parts or not all("=" in p for p in parts):
        raise LogFormatError(f"{path}: first line is not `name=value` hyperparameters: not a train_gpt.py log "
                             f"(it starts {line[:60]!r})")
    hparams = {}
    for p in parts:
        name, value = p.split("=", 1)
        hparams[name] = parse_value(value)
    missing = [k for k in REQUIRED_HPARAMS if k not in hparams]
    if missing:
        raise LogFormatError(f"{path}: first line lacks {', '.join(missing)}: not a train_gpt.py log")
    return hparams


_NUM = r"(-?[\d.]+(?:e-?\d+)?|nan|inf)"
_END = r"(?= |$)"  # a field ends at a space or the line's end; later fields are kept in RunLog.extras
_PATTERNS = [
    ("env", re.compile(r"^world_size:(\d+) device:(\S+) torch:(\S+)(?: attention:(\S+))?" + _END)),
    ("val_set", re.compile(r"^val_tokens:(\d+) val_bytes:(\d+)" + _END)),
    ("params", re.compile(r"^model_params:(\d+)" + _END)),
    ("accum", re.compile(r"^grad_accum_steps:(\d+) micro_batch_tokens:(\d+)" + _END)),
    ("compile", re.compile(r"^compile_warmup_steps:(\d+) compile_warmup_time:([\d.]+)s" + _END)),
    ("train", re.compile(rf"^step:(\d+)/(\d+) train_loss:{_NUM} train_time:([\d.]+)ms step_avg:([\d.]+)ms" + _END)),
    ("val", re.compile(rf"^step:(\d+)/(\d+) val_loss:{_NUM} val_bpb:{_NUM} train_time:([\d.]+)ms step_avg:([\d.]+)ms" + _END)),
    ("stop", re.compile(r"^stopping_early: \S+ train_time:([\d.]+)ms step:(\d+)/(\d+)" + _END)),
    ("mem", re.compile(r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB" + _END)),
    ("pre_quant", re.compile(rf"^pre_quant_ema step:(\d+) val_loss:{_NUM} val_bpb:{_NUM} eval_time:([\d.]+)ms" + _END)),
    ("payload", re.compile(r"^quantized payload:(\d+) bytes compressed:(\d+) bytes quantize_compress_time:([\d.]+)s" + _END)),
    ("model_bytes", re.compile(r"^Serialized model (\S+): (\d+) bytes$")),
    ("code_bytes", re.compile(r"^Code size \(packed\): (\d+) bytes$")),
    ("total_bytes", re.compile(r"^Total submission size (\S+): (\d+) bytes$")),
    ("error", re.compile(r"^ERROR: (.*)$")),
    ("final", re.compile(rf"^final_(\S+)_roundtrip val_loss:{_NUM} val_bpb:{_NUM} eval_time:([\d.]+)ms" + _END)),
    ("final_exact", re.compile(rf"^final_(\S+)_roundtrip_exact val_loss:{_NUM} val_bpb:{_NUM}" + _END)),
    ("ttt", re.compile(rf"^legal_ttt_exact val_loss:{_NUM} val_bpb:{_NUM} eval_time:([\d.]+)ms" + _END)),
]
_FIELD = re.compile(r"^([A-Za-z_][\w.]*):(\S+)$")


def _apply(log: RunLog, kind: str, g: tuple) -> None:
    if kind == "env":
        log.world_size, log.device, log.torch_version, log.attention = int(g[0]), g[1], g[2], g[3]
    elif kind == "val_set":
        log.val_tokens, log.val_bytes = int(g[0]), int(g[1])
    elif kind == "params":
        log.model_params = int(g[0])
    elif kind == "accum":
        log.grad_accum_steps, log.micro_batch_tokens = int(g[0]), int(g[1])
    elif kind == "compile":
        log.compile_warmup_steps, log.compile_warmup_s = int(g[0]), float(g[1])
    elif kind == "train":
        log.train.append(TrainPoint(int(g[0]), int(g[1]), float(g[2]), float(g[3]), float(g[4])))
    elif kind == "val":
        log.val.append(ValPoint(int(g[0]), int(g[1]), float(g[2]), float(g[3]), float(g[4]), float(g[5])))
    elif kind == "stop":
        log.stopped_early, log.stop_train_time_ms, log.stop_step = True, float(g[0]), int(g[1])
    elif kind == "mem":
        log.peak_mem_allocated_mib, log.peak_mem_reserved_mib = int(g[0]), int(g[1])
    elif kind == "pre_quant":
        log.pre_quant_step, log.pre_quant_val_loss, log.pre_quant_val_bpb, log.pre_quant_eval_ms = \
            int(g[0]), float(g[1]), float(g[2]), float(g[3])
    elif kind == "payload":
        log.payload_bytes, log.compressed_bytes, log.quantize_compress_s = int(g[0]), int(g[1]), float(g[2])
    elif kind == "model_bytes":
        log.quant_label, log.model_bytes = g[0], int(g[1])
    elif kind == "code_bytes":
        log.code_bytes = int(g[0])
    elif kind == "total_bytes":
        log.total_bytes = int(g[1])
    elif kind == "error":
        log.errors.append(g[0])
    elif kind == "final":
        log.final_label, log.final_val_loss, log.final_val_bpb, log.final_eval_ms = g[0], float(g[1]), float(g[2]), float(g[3])
    elif kind == "final_exact":
        log.final_label, log.final_exact_val_loss, log.final_exact_val_bpb = g[0], float(g[1]), float(g[2])
    elif kind == "ttt":
        log.ttt_val_loss, log.ttt_val_bpb, log.ttt_eval_ms = float(g[0]), float(g[1]), float(g[2])


def parse_text(text: str, path: str = "<text>") -> RunLog:
    lines = text.split("\n")
    truncated = bool(text) and not text.endswith("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or not lines[0].strip():
        raise LogFormatError(f"{path}: empty: not a train_gpt.py log (or the run died before writing its first line)")
    log = RunLog(path=path, hparams=parse_hparams(lines[0].rstrip("\r"), path), truncated_last_line=truncated)
    for number, raw in enumerate(lines[1:], start=2):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        if truncated and number == len(lines):
            log.unknown_lines.append((number, line))  # cut mid-write: its last number may be cut too
            continue
        for kind, pattern in _PATTERNS:
            m = pattern.match(line)
            if m:
                _apply(log, kind, m.groups())
                rest = line[m.end():].split()
                break
        else:
            rest = line.split()
            if not rest or not all(_FIELD.match(t) for t in rest):
                log.unknown_lines.append((number, line))
                continue
        for token in rest:  # fields a newer train_gpt.py added to a line, or lines of key:value fields
            f = _FIELD.match(token)
            if f:
                log.extras[f.group(1)] = parse_value(f.group(2))
            else:
                log.unknown_lines.append((number, line))
                break
    return log


def parse_log(path: str) -> RunLog:
    """Read and parse one log; LogFormatError if it is not one of ours."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise LogFormatError(f"{path}: is a directory, not a log") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise LogFormatError(f"{path}: not UTF-8 text: not a train_gpt.py log") from None
    if "\x00" in text:
        raise LogFormatError(f"{path}: holds NUL bytes: a binary file, not a train_gpt.py log")
    return parse_text(text, path)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    status = 0
    for path in argv:
        try:
            print(json.dumps(parse_log(path).summary()))
        except (LogFormatError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
