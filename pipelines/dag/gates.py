"""Quality gates: a stage's metric checked once the stage has finished, against a threshold or against an
upstream stage's value; a failed gate stops the stage's dependents (pipelines/dag/runner.py).

    [stages.eval-64.gate]
    metric = "adherence_color"    # a name of pipelines/eval/metrics.py, or any metric the stage's run logs
    no_worse_than = "eval-32"     # an upstream stage: this stage may be at most `tolerance` worse than it
    tolerance = 0.05              # absolute; which way is worse: metrics.LOWER_IS_BETTER

    [stages.vae.gate]
    metric = "after/psnr"
    min = 18.0                    # and/or max = ...; every bound given must hold

A gate is not part of a stage's digest: changing it re-checks the stage's recorded metrics on the next run
without running the stage again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from pipelines.config import StrictModel
from pipelines.eval.metrics import EVAL_METRICS, LOWER_IS_BETTER

if TYPE_CHECKING:
    from pipelines.dag.spec import DagConfig


class GateSpec(StrictModel):
    metric: str = Field(min_length=1)
    min: float | None = None
    max: float | None = None
    no_worse_than: str | None = None  # a stage this one needs (directly or not)
    tolerance: float = Field(0.0, ge=0)  # how much worse than `no_worse_than`'s value still passes

    @model_validator(mode="after")
    def _bounds(self) -> GateSpec:
        if self.min is None and self.max is None and self.no_worse_than is None:
            raise ValueError(f"gate on {self.metric}: no bound; give min and/or max, or no_worse_than = "
                             "\"<an upstream stage>\" (with a tolerance)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"gate on {self.metric}: min {self.min} > max {self.max}: no value can pass")
        if "tolerance" in self.model_fields_set and self.no_worse_than is None:
            raise ValueError(f"gate on {self.metric}: tolerance applies to no_worse_than only; for a threshold "
                             "move min/max instead")
        if self.no_worse_than is not None and self.metric not in EVAL_METRICS:
            raise ValueError(f"gate on {self.metric}: no_worse_than compares evaluation metrics, whose direction "
                             f"is known ({', '.join(EVAL_METRICS)}); for {self.metric} give min and/or max")
        return self


def check_gates(config: DagConfig) -> None:
    """Config-time checks that need the whole DAG: a gated stage's run logs metrics (its kind is tracked), and
    the stage a gate compares with is upstream of it, so that its value is known when the gate is checked."""
    from pipelines.dag.spec import KINDS

    for name, spec in config.stages.items():
        gate = spec.gate
        if gate is None:
            continue
        if not KINDS[spec.kind].tracked:
            tracked = ", ".join(k for k, kind in KINDS.items() if kind.tracked)
            raise ValueError(f"stage {name!r}: a gate needs a stage whose run logs metrics (kind {tracked}); "
                             f"kind {spec.kind} logs none")
        ref = gate.no_worse_than
        if ref is None:
            continue
        if ref not in config.stages:
            raise ValueError(f"stage {name!r}: gate.no_worse_than {ref!r} is not a stage of this pipeline "
                             f"(stages: {', '.join(config.stages)})")
        if ref == name or name not in config.descendants(ref):
            raise ValueError(f"stage {name!r}: gate.no_worse_than {ref!r} is not upstream of it; add {ref!r} to "
                             f"its needs (its {gate.metric} must be known when {name!r} finishes)")


@dataclass(frozen=True)
class Verdict:
    passed: bool
    text: str  # "adherence_color 0.41 < 0.82 (eval-32's 0.87 - tolerance 0.05)"

    @property
    def tag(self) -> str:
        """The value of tracking.GATE_TAG on the stage's run."""
        return f"{'passed' if self.passed else 'failed'}: {self.text}"


def _holds(value: float, op: str, limit: float) -> bool:
    # a config's decimals are not exact in binary (0.87 - 0.05 = 0.8200000000000001): a value equal to the
    # bound up to rounding passes
    slack = 1e-9 * max(1.0, abs(limit))
    return value >= limit - slack if op == ">=" else value <= limit + slack


def check(gate: GateSpec, *, metrics: Mapping[str, float], reference: Mapping[str, float] | None = None) -> Verdict:
    """The gate on a stage whose run logged `metrics`; `reference`: the metrics of `gate.no_worse_than`. Every
    bound must hold; the text names the metric, its value and the first bound that failed (else all of them)."""
    m = gate.metric
    if m not in metrics:
        logged = sorted(metrics)
        shown = ", ".join(logged[:12]) + (", ..." if len(logged) > 12 else "") if logged else "none"
        return Verdict(False, f"{m} was not logged by the stage's run (it logged: {shown})")
    value = metrics[m]
    if math.isnan(value):
        return Verdict(False, f"{m} is nan")
    bounds: list[tuple[str, float, str]] = []  # (op, limit, the limit as the text shows it)
    if gate.min is not None:
        bounds.append((">=", gate.min, f"min {gate.min:g}"))
    if gate.max is not None:
        bounds.append(("<=", gate.max, f"max {gate.max:g}"))
    if gate.no_worse_than is not None:
        ref = gate.no_worse_than
        if reference is None or m not in reference or math.isnan(reference[m]):
            return Verdict(False, f"{ref} logged no {m} to compare with")
        lower = m in LOWER_IS_BETTER
        limit = reference[m] + gate.tolerance if lower else reference[m] - gate.tolerance
        bounds.append(("<=" if lower else ">=", limit, f"{limit:g} ({ref}'s {reference[m]:g} "
                       f"{'+' if lower else '-'} tolerance {gate.tolerance:g})"))
    texts = []
    for op, limit, shown in bounds:
        if not _holds(value, op, limit):
            return Verdict(False, f"{m} {value:g} {'<' if op == '>=' else '>'} {shown}")
        texts.append(f"{m} {value:g} {op} {shown}")
    return Verdict(True, "; ".join(texts))
