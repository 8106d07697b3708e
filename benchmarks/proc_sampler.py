"""Sampling /proc: memory and CPU of this process and its descendants (e.g. the local Ray cluster a benchmark
started), and how much CPU other people's processes took meanwhile. Linux only."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cluster import cpu_marks  # noqa: E402

PAGE, TICK = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds) of every process."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
    return table


def _descendants(table: dict[int, tuple[int, float]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    pids, todo = [], [root]
    while todo:
        pids.append(todo.pop())
        todo.extend(children.get(pids[-1], []))
    return pids


def _memory(pid: int, pss: bool) -> tuple[int, int, int]:
    """(RSS, RssShmem, PSS or 0) in bytes; RssShmem is mostly the pages of Ray's object store (/dev/shm) the
    process has touched, counted again in every process that maps them."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        status = {k: v for k, _, v in (line.partition(":") for line in lines)}
        rss, shmem = (int(status[k].split()[0]) * 1024 for k in ("VmRSS", "RssShmem"))
        if not pss:
            return rss, shmem, 0
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        return rss, shmem, next((int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:")), 0)
    except (OSError, ValueError, KeyError):
        return 0, 0, 0


class ProcSampler(threading.Thread):
    """Every `interval` s: summed RSS (and PSS) of this process and all its descendants, and their CPU time
    (kept per pid, so processes that exit still count); on stop, the machine's busy time over the same span
    tells how much CPU other people's processes took meanwhile."""

    def __init__(self, interval: float = 0.2, pss: bool = False):
        super().__init__(daemon=True)
        self.interval, self.pss, self.stop_event = interval, pss, threading.Event()
        self.peak_rss = self.peak_pss = self.peak_private = self.samples = self.max_procs = 0
        self.at_peak: list[tuple[int, int, str]] = []
        self.cpu0: dict[int, float] = {pid: cpu for pid, (_, cpu) in _process_table().items()}
        self.cpu: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.series: list[tuple[float, int, int]] = []  # (seconds since start, RSS sum, RSS - RssShmem sum)
        self.wall0, self.busy0 = time.perf_counter(), cpu_marks()[1]

    def sample(self) -> None:
        table = _process_table()
        pids = _descendants(table, os.getpid())
        for pid in pids:
            self.cpu[pid] = table[pid][1] - self.cpu0.get(pid, 0.0)
            name = _name(pid)  # Ray renames a worker after the task or actor it runs
            if name and (pid not in self.names or not name.startswith("ray::IDLE")):
                self.names[pid] = name
        with_pss = self.pss and self.samples % 5 == 0  # smaps_rollup costs ms per Ray process: once a second
        per = {pid: _memory(pid, with_pss) for pid in pids}
        rss, shmem, pss = (sum(v[i] for v in per.values()) for i in range(3))
        self.samples, self.max_procs = self.samples + 1, max(self.max_procs, len(per))
        self.series.append((time.perf_counter() - self.wall0, rss, rss - shmem))
        self.peak_pss, self.peak_private = max(self.peak_pss, pss), max(self.peak_private, rss - shmem)
        if rss > self.peak_rss:
            self.peak_rss = rss
            self.at_peak = sorted(((v[0], pid, _name(pid)) for pid, v in per.items()), reverse=True)[:5]

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> dict:
        self.stop_event.set()
        self.join()
        self.sample()
        wall, busy = time.perf_counter() - self.wall0, cpu_marks()[1] - self.busy0
        ours = sum(self.cpu.values())
        top = sorted(((cpu, pid, self.names.get(pid, "?")) for pid, cpu in self.cpu.items()), reverse=True)
        return {"wall": wall, "ours": ours / wall, "others": max(0.0, busy - ours) / wall, "top": top[:6]}

    def quarter_peaks(self, column: int) -> str:
        """Peak of a series column (1: RSS, 2: RSS - RssShmem) in each quarter of the run, in MiB."""
        end = self.series[-1][0]
        quarters = [[x[column] for x in self.series if q * end / 4 <= x[0] <= (q + 1) * end / 4] for q in range(4)]
        return " / ".join(f"{max(values, default=0) / 2**20:.0f}" for values in quarters)


def _name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        if cmd.startswith("ray::"):
            return cmd[:60].strip()
        return (Path(f"/proc/{pid}/comm").read_text().strip() + ": " + cmd[:60]).strip()
    except OSError:
        return ""
