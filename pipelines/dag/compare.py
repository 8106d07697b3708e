"""The stage comparison a pipeline's parent MLflow run gets at the end of every run: each metric of each stage
against the stages in DAG order (labelled with their resolution), as a table and a plot.

    comparison/stages.csv    one row per stage whose run logs metrics: stage, kind, resolution, status, metrics
    comparison/stages.html   the same table (MLflow's artifact view renders it)
    comparison/metrics.png   one subplot per metric, the stages on the x axis

The metrics are the runner's per-stage ones (runner._own_metrics: metrics.EVAL_METRICS, the last loss, and a
gated metric), evaluation metrics first.
"""

from __future__ import annotations

import csv
import html
import io
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipelines.dag.spec import KINDS, StagePlan
from pipelines.eval.metrics import EVAL_METRICS, LOWER_IS_BETTER
from pipelines.tracking import StageRun

FOLDER = "comparison"


class Outcome(Protocol):
    """What the comparison reads of a stage's result (runner.StageResult)."""

    status: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class Row:
    stage: str
    kind: str
    resolution: str  # "64 px", "64x32 px"; "" when the stage's params do not say
    status: str
    metrics: dict[str, float]


def resolution(kind: str, params: Mapping[str, Any]) -> str:
    """A stage's resolution from its params: a training stage's `res`, a sampling stage's width x height."""
    if kind == "train" and "res" in params:
        return f"{params['res']} px"
    width, height = params.get("width"), params.get("height")
    if width is None:
        return ""
    return f"{width} px" if height in (None, width) else f"{width}x{height} px"


def rows(stages: Sequence[StagePlan], results: Mapping[str, Outcome]) -> list[Row]:
    """One row per stage that ran or was meant to run and whose kind logs metrics, in DAG order."""
    return [Row(s.name, s.kind, resolution(s.kind, s.params), results[s.name].status, dict(results[s.name].metrics))
            for s in stages if s.name in results and (KINDS[s.kind].tracked or results[s.name].metrics)]


def metric_names(table: Sequence[Row]) -> list[str]:
    """Every metric some row has: the evaluation metrics in metrics.EVAL_METRICS' order, then the rest sorted."""
    present = {m for row in table for m in row.metrics}
    return [m for m in EVAL_METRICS if m in present] + sorted(present - set(EVAL_METRICS))


def direction(name: str) -> str:
    """" (lower is better)" / " (higher is better)" for an evaluation metric; "" for others (their way unknown)."""
    if name not in EVAL_METRICS:
        return ""
    return f" ({'lower' if name in LOWER_IS_BETTER else 'higher'} is better)"


def to_csv(table: Sequence[Row], names: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["stage", "kind", "resolution", "status", *names])
    for row in table:
        writer.writerow([row.stage, row.kind, row.resolution, row.status,
                         *(repr(row.metrics[m]) if m in row.metrics else "" for m in names)])
    return out.getvalue()


def to_html(table: Sequence[Row], names: Sequence[str], *, title: str) -> str:
    def cells(tag: str, values: Sequence[str]) -> str:
        return "".join(f"<{tag}>{html.escape(v)}</{tag}>" for v in values)

    head = cells("th", ["stage", "kind", "resolution", "status",
                        *(f"{m}{direction(m)}" for m in names)])
    body = "\n".join("<tr>" + cells("td", [r.stage, r.kind, r.resolution, r.status,
                                           *(f"{r.metrics[m]:.4g}" if m in r.metrics else "" for m in names)])
                     + "</tr>" for r in table)
    style = ("body{font-family:sans-serif}table{border-collapse:collapse}"
             "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h3>{html.escape(title)}</h3>\n"
            f"<table><tr>{head}</tr>\n{body}\n</table></body></html>\n")


def plot(table: Sequence[Row], names: Sequence[str], path: Path, *, title: str) -> None:
    """A PNG at `path`: one subplot per metric, the rows' stages (in order) on a shared x axis."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, Agg renders the PNG

    fig = Figure(figsize=(max(5.0, 1.3 * len(table)), 1.0 + 2.2 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        points = [(i, row.metrics[name]) for i, row in enumerate(table) if name in row.metrics]  # joined by lines
        ax.plot([i for i, _ in points], [v for _, v in points], "o-")
        for i, value in points:
            ax.annotate(f"{value:.3g}", (i, value), textcoords="offset points", xytext=(0, 5), ha="center",
                        fontsize=8)
        ax.margins(x=0.1, y=0.25)  # room for the value labels
        ax.set_ylabel(name)
        ax.set_title(name + direction(name), fontsize=9)
        ax.grid(alpha=0.3)
    labels = ["\n".join(filter(None, [r.stage, r.resolution, "" if r.status in ("done", "skipped") else r.status]))
              for r in table]
    axes[-1].set_xticks(range(len(table)), labels)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def log_comparison(run: StageRun, *, stages: Sequence[StagePlan], results: Mapping[str, Outcome],
                   title: str) -> list[str]:
    """The table and the plot as artifacts of `run` (the pipeline's parent run); the artifact paths, none
    when no stage has a metric."""
    table = rows(stages, results)
    names = metric_names(table)
    if not names:
        return []
    run.log_text(to_csv(table, names), f"{FOLDER}/stages.csv")
    run.log_text(to_html(table, names, title=title), f"{FOLDER}/stages.html")
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "metrics.png"
        plot(table, names, png, title=title)
        run.log_artifact(png, FOLDER)
    return [f"{FOLDER}/{name}" for name in ("stages.csv", "stages.html", "metrics.png")]
