"""Run a pipeline DAG: every stage a Ray job on the cluster at RAY_ADDRESS, tracked in MLflow.

    python jobs/run_pipeline.py pipelines/dag/configs/demo.toml                # run (skips finished stages)
    python jobs/run_pipeline.py pipelines/dag/configs/hdm_xut_base.toml --dry-run   # validate and plan only
    python jobs/run_pipeline.py CONFIG --from train-512                    # rerun a stage and what follows
    python jobs/run_pipeline.py CONFIG --calibrate                         # measure each train stage's speed
    python jobs/run_pipeline.py CONFIG --dry-run --price-per-gpu-hour 2.5  # the plan with measured figures

RAY_ADDRESS (or --address) is the Ray dashboard, e.g. http://127.0.0.1:8265, as for `ray job submit`.
The MLflow tracking URI comes from [pipeline.tracking] uri, else $MLFLOW_TRACKING_URI, else a sqlite
file under ~/.hdm. Exit codes: 0 every stage done or skipped; 1 a stage failed (its dependents did not
run); 2 the config is invalid (nothing ran); 3 refused: --from while a job of that stage or a later one
still runs (nothing changed); 4 MLflow unreachable (at start: nothing submitted; later: the stage job keeps
running); 130 Ctrl-C, 143 SIGTERM (the runs are marked KILLED, the stage job keeps running: a rerun attaches
to it). See docs/pipeline.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.cli import EXIT_INVALID, EXIT_REFUSED, EXIT_TRACKING  # noqa: E402

EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + the signal's number, as a shell reports it


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="pipeline TOML (pipelines/dag/configs/*.toml), or the config as a JSON object")
    ap.add_argument("--dry-run", action="store_true", help="validate every stage and print the plan; run nothing")
    ap.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun STAGE and every stage after it")
    ap.add_argument("--address", help="Ray dashboard address; given, it wins over the environment "
                    "(default $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else http://127.0.0.1:8265)")
    ap.add_argument("--storage", help="overrides [pipeline] storage (e.g. an absolute path when run as a Ray job)")
    ap.add_argument("--verbose", action="store_true", help="show every line of the stage jobs' logs (Ray's "
                    "chatter, each worker's lines) besides the progress lines; the stage logs keep them either way")
    ap.add_argument("--calibrate", action="store_true",
                    help="run a few steps of every train stage on the cluster (and the stages they need, unless "
                         "finished) and record their throughput in MLflow, which --dry-run then uses")
    ap.add_argument("--calibrate-steps", type=int, default=20, metavar="N", help="steps per train stage (default 20)")
    ap.add_argument("--price-per-gpu-hour", type=float, metavar="PRICE",
                    help="with --dry-run (or --calibrate): the cost of each stage and the total at this price")
    return ap


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from pipelines.config import describe_errors, load_config
    from pipelines.dag.estimate import format_plan
    from pipelines.dag.spec import DagConfig, plan

    args = build_parser().parse_args(argv)
    try:
        config = load_config(DagConfig, args.config, {"pipeline.storage": args.storage})
        format_plan(config, plan(config))  # validates every stage's job config too
    except ValidationError as e:
        print("\n".join(f"{args.config}: {line}" for line in describe_errors(e)), file=sys.stderr)
        return EXIT_INVALID
    except (ValueError, OSError) as e:  # ConfigError: a stage's params, one line each
        print("\n".join(f"{args.config}: {line}" for line in str(e).splitlines()), file=sys.stderr)
        return EXIT_INVALID
    if args.from_stage and args.from_stage not in config.stages:
        print(f"--from {args.from_stage!r}: no such stage (stages: {', '.join(config.stages)})", file=sys.stderr)
        return EXIT_INVALID
    if args.dry_run:
        from pipelines.dag.calibrate import lookup

        stages = plan(config)
        print(format_plan(config, stages, measured=lookup(config, stages), price_per_gpu_hour=args.price_per_gpu_hour))
        return 0
    if args.calibrate:
        return calibrate(config, args)
    return run(config, args)


def calibrate(config, args: argparse.Namespace) -> int:
    """Run the calibration DAG (pipelines/dag/calibrate.py), record what it measured, print the plan with it."""
    from pipelines.dag.calibrate import calibration_config, record
    from pipelines.dag.estimate import format_plan
    from pipelines.dag.spec import plan

    if args.calibrate_steps < 4:
        print("--calibrate-steps must be at least 4 (the first quarter is warm-up)", file=sys.stderr)
        return EXIT_INVALID
    reduced = calibration_config(config, steps=args.calibrate_steps)
    code = run(reduced, args)
    if code not in (0, 1):
        return code
    measured = record(config, calibrated=reduced, tracking_uri=config.pipeline.tracking.resolved_uri(), say=print)
    print(format_plan(config, plan(config), measured=measured, price_per_gpu_hour=args.price_per_gpu_hour))
    return code


def run(config, args: argparse.Namespace) -> int:
    """Run the pipeline; the exit code (module docstring)."""
    from pipelines.dag.jobs import StageJobRunning
    from pipelines.dag.runner import DagRunner, format_results
    from pipelines.tracking import Terminated, TrackingUnavailable, check_reachable, raise_on_sigterm

    uri = config.pipeline.tracking.resolved_uri()
    try:
        check_reachable(uri, timeout_s=10.0)
    except TrackingUnavailable as e:
        print(f"run_pipeline: MLflow tracking unreachable, nothing submitted: {e}", file=sys.stderr)
        return EXIT_TRACKING
    try:
        runner = DagRunner(config, address=args.address, verbose=args.verbose)
    except ValueError as e:  # a tracking URI the jobs may not get (spec.jobs_tracking_uri)
        print(f"run_pipeline: {e}", file=sys.stderr)
        return EXIT_INVALID
    raise_on_sigterm()  # the runner then marks its runs KILLED; the stage job keeps running
    try:
        results = runner.run(from_stage=args.from_stage)
    except StageJobRunning as e:
        print(f"run_pipeline refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except TrackingUnavailable as e:
        print(f"run_pipeline: MLflow tracking unreachable: {e}{runner.left_running()}", file=sys.stderr)
        return EXIT_TRACKING
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except Terminated:
        return EXIT_SIGTERM
    print(format_results(results), flush=True)
    if uri.startswith("http"):
        print(mlflow_links(uri, experiment=runner.experiment, pipeline=config.pipeline.name,
                           parent_run_id=runner.parent_run_id))
    for r in results:
        if "adherence_color" in r.metrics:
            print(f"{r.name}: prompt adherence {r.metrics['adherence_color']:.3f} (colour), "
                  f"{r.metrics.get('adherence_shape', float('nan')):.3f} (shape); grid {r.outputs['report']}/grid.png")
    return 0 if all(r.status in ("done", "skipped") for r in results) else 1


def mlflow_links(uri: str, *, experiment: str, pipeline: str, parent_run_id: str | None) -> str:
    """Where to look in the MLflow UI: the experiment's training runs, and the pipeline's run with the stage
    comparison. `workflowType=machine_learning` makes MLflow 3's UI show the runs, not its GenAI traces,
    whichever of the two views the browser used last."""
    from mlflow import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    if exp is None:
        return f"MLflow UI: {uri}  (experiment {experiment!r})"
    base = f"{uri.rstrip('/')}/#/experiments/{exp.experiment_id}"
    lines = [(f"MLflow UI: {base}/runs?workflowType=machine_learning  (experiment {experiment!r}: a run per "
              "stage under the pipeline's run)")]
    if parent_run_id:
        lines.append(f"  stage comparison: run {pipeline!r} ({parent_run_id}), artifacts comparison/metrics.png "
                     f"and stages.html: {base}/runs/{parent_run_id}/artifacts?workflowType=machine_learning")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
