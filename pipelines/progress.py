"""Progress a job reports and what a person sees of a stage's log.

A job prints machine-readable progress lines (`emit`), one owner of the format:

    hdm-progress {"done": 100, "total": 400, "unit": "step", "rate": 2.1, "note": "loss 0.41"}

(`rate`, units per second measured by the job, and `note` are optional; `total` is null when unknown). A job
whose work runs in other processes (Ray Data actors, img2dataset's) reports from its driver with a `Reporter`
thread that polls a count every few seconds. The DAG
runner feeds every line of a stage's job log to a `StageConsole`, which keeps the console readable: progress
lines become one line per stage with its rate and ETA (updated in place with \\r on a terminal, else at most one
line per tenth of the total or per 30 s); Ray's own chatter (its loggers, Ray Data's execution plans and
progress, Ray Train's controller, library progress bars and warnings) and every line of a Ray actor or worker
are dropped unless `verbose`, and a worker line Ray prints twice is shown once. The stage log file keeps
every line (pipelines/dag/jobs.py `tail`).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

PREFIX = "hdm-progress "
STEP_FRACTION, STEP_S = 0.1, 30.0  # off a terminal: a line per tenth of the total, or per 30 s

ANSI = re.compile(r"\x1b\[[0-9;]*m")
ACTOR = re.compile(r"^\((?P<actor>[\w.()-]+) pid=\d+(?:, ip=[\d.]+)?\) ?")  # Ray's prefix of an actor's line
CHATTER = re.compile("|".join([
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING)\s",  # Ray's Python loggers
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWE] \d+ \d+\] ",  # Ray's core (C++) log
    r"^Running entrypoint for job ",  # Ray's job manager
    (r"^(Starting execution of Dataset|Execution plan of Dataset|Progress bars disabled|✔️ +Dataset"
     r"|Total Progress:|Active & requested resources)"),  # Ray Data, printed without its logger's prefix
    r"\d+%\|.*\|", r"^\s*\d+it \[",  # tqdm progress bars (weights loading, img2dataset)
    r"^\S+:\d+: \w*Warning: ",  # a Python warning (its source line follows, indented: dropped too)
    r"^(🏃 View run|🧪 View experiment) ",  # MLflow's links at a run's end: the runner prints the experiment's
    (r"^(Starting the downloading of this file|Sharding file number|File sharded in|Downloading starting now"
     r"|(worker|total) +- success: )"),  # img2dataset (the ingest job prints its own summary)
]))


@dataclass(frozen=True)
class Progress:
    done: int
    total: int | None
    unit: str
    rate: float | None = None  # units per second, as the job measured it
    note: str = ""


def progress_line(*, done: int, total: int | None, unit: str, rate: float | None = None, note: str = "") -> str:
    """The progress line a job prints (PREFIX + JSON); `unit` singular (step, row, image)."""
    data = {"done": int(done), "total": None if total is None else int(total), "unit": unit}
    if rate is not None:
        data["rate"] = round(float(rate), 4)
    if note:
        data["note"] = note
    return PREFIX + json.dumps(data)


def emit(*, done: int, total: int | None, unit: str, rate: float | None = None, note: str = "") -> None:
    """Print a progress line (flushed: Ray streams the job's stdout as it comes)."""
    print(progress_line(done=done, total=total, unit=unit, rate=rate, note=note), flush=True)


class Reporter:
    """A driver thread that emits what `poll()` returns, `(done, total)`, every `every_s` seconds when it
    changed, with the rate since it started (start-up included: an ETA that errs long, never short):
    `with Reporter(poll, unit="image"): work()`. A clean exit emits a last line; an exception stops the
    thread without one (the job's error says the rest); a poll that raises ends the lines, never the job."""

    def __init__(self, poll: Callable[[], tuple[int, int | None]], *, unit: str, every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.poll, self.unit, self.every_s, self.clock = poll, unit, every_s, clock
        self.start: tuple[float, int] | None = None  # (time, done) of the first poll
        self.last: tuple[int, int | None] | None = None  # the last (done, total) emitted
        self.failed = False  # a poll raised: no more lines
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hdm-progress", daemon=True)

    def __enter__(self) -> Reporter:
        self.thread.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.stop.set()
        self.thread.join()
        if exc_type is None and not self.failed:
            self._try_report(final=True)

    def _run(self) -> None:
        if self._try_report():
            while not self.stop.wait(self.every_s) and self._try_report():
                pass

    def _try_report(self, *, final: bool = False) -> bool:
        try:
            self.report(final=final)
            return True
        except Exception as e:  # noqa: BLE001 - a failed poll costs the progress lines, never the job
            print(f"progress reporting stopped: {type(e).__name__}: {e}", flush=True)
            self.failed = True
            return False

    def report(self, *, final: bool = False) -> None:
        """Poll and emit (unless nothing changed since the last line, before the final one)."""
        done, total = self.poll()
        now = self.clock()
        if self.start is None:
            self.start = (now, done)
        if (done, total) == self.last and not final:
            return
        self.last = (done, total)
        t0, done0 = self.start
        emit(done=done, total=total, unit=self.unit, rate=(done - done0) / (now - t0) if now > t0 else None)


def parse(line: str) -> Progress | None:
    """The progress a log line reports (after Ray's actor prefix and colours), else None; a malformed one
    is None too (shown in the log only)."""
    at = line.find(PREFIX)
    if at < 0:
        return None
    try:
        data = json.loads(line[at + len(PREFIX):])
        return Progress(done=int(data["done"]), total=None if data.get("total") is None else int(data["total"]),
                        unit=str(data["unit"]), rate=None if data.get("rate") is None else float(data["rate"]),
                        note=str(data.get("note", "")))
    except (ValueError, KeyError, TypeError):
        return None


def duration(seconds: float) -> str:
    """4m10s, 12s, 1h02m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def render(stage: str, p: Progress, *, rate: float | None) -> str:
    """`train-64   500/1000 steps  2.1 steps/s  ETA 4m10s  loss 0.41`."""
    units = p.unit if p.unit.endswith("s") else p.unit + "s"
    parts = [f"{stage:<10} {p.done}/{p.total} {units}" if p.total else f"{stage:<10} {p.done} {units}"]
    if rate:
        parts.append(f"{rate:.1f} {units}/s" if rate >= 0.1 else f"{60 * rate:.1f} {units}/min")
        if p.total:
            parts.append(f"ETA {duration(max(0, p.total - p.done) / rate)}")
    if p.note:
        parts.append(p.note)
    return "  ".join(parts)


def show(line: str, *, verbose: bool) -> tuple[str | None, bool]:
    """(what the console shows of a job's log line, or None; whether it came from a Ray actor/worker)."""
    text = ANSI.sub("", line)
    actor = ACTOR.match(text)
    if actor:
        text = text[actor.end():]
    if verbose:
        return text, actor is not None
    if actor or not text.strip() or CHATTER.search(text):
        return None, actor is not None
    return text, False


class StageConsole:
    """What the console shows of one stage's job log: `feed` each line; `close` ends an in-place line."""

    def __init__(self, stage: str, *, out: TextIO, verbose: bool = False, tty: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.out, self.verbose, self.tty, self.clock = stage, out, verbose, tty, clock
        self.recent: deque[str] = deque(maxlen=32)  # an actor's recent lines: Ray may print one twice
        self.first: tuple[float, int] | None = None  # (time, done) of the first progress seen
        self.shown: tuple[float, int] | None = None  # (time, tenth of the total) of the last progress shown
        self.open = False  # a progress line written in place, not yet ended
        self.after_warning = False

    def feed(self, line: str) -> None:
        progress = parse(line)
        if progress is not None:
            self._progress(progress)
            return
        if self._warning_source(line):
            return
        text, from_actor = show(line, verbose=self.verbose)
        if text is None or from_actor and self._repeated(ANSI.sub("", line)):  # the key keeps the actor's pid
            return
        self._line(f"[{self.stage}] {text}")

    def close(self) -> None:
        if self.open:
            self.out.write("\n")
            self.out.flush()
            self.open = False

    def _warning_source(self, line: str) -> bool:
        """True for the indented source line Python prints after a warning (dropped with it)."""
        text = ACTOR.sub("", ANSI.sub("", line))
        follows, self.after_warning = self.after_warning, bool(re.match(r"^\S+:\d+: \w*Warning: ", text))
        return follows and text.startswith(" ") and not self.verbose

    def _repeated(self, line: str) -> bool:
        if line in self.recent:
            return True
        self.recent.append(line)
        return False

    def _progress(self, p: Progress) -> None:
        now = self.clock()
        if self.first is None or p.done < self.first[1]:
            self.first = (now, p.done)
        rate = p.rate
        if rate is None and now > self.first[0] and p.done > self.first[1]:
            rate = (p.done - self.first[1]) / (now - self.first[0])
        text = render(self.stage, p, rate=rate)
        if self.tty:
            self.out.write("\r" + text.ljust(79))
            self.out.flush()
            self.open = True
            return
        tenth = int(p.done / p.total / STEP_FRACTION) if p.total else -1
        if self.shown is None or tenth > self.shown[1] or now - self.shown[0] >= STEP_S:
            self.shown = (now, tenth)
            self._line(text)

    def _line(self, text: str) -> None:
        self.close()
        print(text, file=self.out, flush=True)
