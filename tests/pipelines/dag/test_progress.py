"""What a person reads: the progress line format, its rendering with rate and ETA, the console filter (Ray's
chatter and duplicated worker lines dropped, the job's own lines kept; all of it in the stage log), and the
MLflow experiment kind our code creates experiments with."""

import io
import sys
import uuid
from pathlib import Path

import pytest

from pipelines import progress
from pipelines.progress import Progress, StageConsole

ROOT = Path(__file__).resolve().parents[3]

# Lines as a stage log holds them today (runs/demo/_logs/train-32.log, precompute.log, eval-64.log, ingest.log)
ESC = "\x1b[36m"
WORKER = f"{ESC}(RayTrainWorker pid=10640)\x1b[0m "
CHATTER = [
    "2026-12-05 00:35:18,176\tINFO job_manager.py:581 -- Runtime env is setting up.",
    "Running entrypoint for job demo-train-32-1796430938: python jobs/train_stage.py --config '{}'",
    "2026-12-05 00:35:23,941\tINFO streaming_executor.py:216 -- Execution plan of Dataset dataset_0: "
    "InputDataBuffer[Input] -> TaskPoolMapOperator[MapBatches(ReadStage)]",
    "2026-12-05 00:35:24,098\tINFO logging_progress.py:225 -- Total Progress: 0/?",
    "[2026-12-05 00:35:23,967 E 10052 10052] core_worker.cc:2465: Actor with class name: 'MapWorker' has ...",
    f"{ESC}(SplitCoordinator pid=10807)\x1b[0m Execution plan of Dataset train_0: InputDataBuffer[Input]",
    f"{ESC}(TrainController pid=10542)\x1b[0m Requesting resources: {{'CPU': 1.0}} * 1",
    "Loading weights: 100%|██████████| 103/103 [00:00<00:00, 11200.18it/s]",
    "/x/ray/data/dataset.py:2263: UserWarning: Use 'expr' instead of 'fn' when possible for performant filters.",
    "  warnings.warn(",
    "🏃 View run eval-32 at: http://127.0.0.1:48939/#/experiments/1/runs/3e78631d04064f51b35f0a70afa56fba",
    "Downloading starting now, check your bandwidth speed (with bwm-ng)your cpu (with htop)",
    "total   - success: 1.000 - failed to download: 0.000 - failed to resize: 0.000 - count: 2000",
    "",
]
OWN = ["ingest: 2000/2000 images downloaded to /runs/demo/ingest/2a2d (0 failed) in 3.6 s",
       "adherence over 48 images: color 0.917 (chance 0.167), shape 0.625 (chance 0.333)",
       "  grid: /runs/demo/eval-32/f02676a3e83d/grid.png"]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_line_round_trips_through_rays_prefix():
    line = progress.progress_line(done=100, total=400, unit="step", rate=2.5, note="loss 0.41")
    assert line.startswith("hdm-progress {")
    assert progress.parse(WORKER + line) == Progress(100, 400, "step", 2.5, "loss 0.41")
    assert progress.parse(progress.progress_line(done=7, total=None, unit="row")) == Progress(7, None, "row")
    assert progress.parse("hdm-progress {not json") is None
    assert progress.parse("hdm-progress {\"done\": 3}") is None  # no total/unit: not a progress line
    assert progress.parse("step 1/400 loss 2.9") is None


def test_render_rate_and_eta():
    assert progress.render("train-64", Progress(500, 1000, "step"), rate=2.0) == \
        "train-64   500/1000 steps  2.0 steps/s  ETA 4m10s"
    assert progress.render("vae", Progress(10, None, "row", note="x"), rate=None) == "vae        10 rows  x"
    assert progress.render("s", Progress(1, 100, "step"), rate=0.01).endswith("0.6 steps/min  ETA 2h45m")
    assert [progress.duration(s) for s in (0, 12.4, 61, 3600 + 125)] == ["0s", "12s", "1m01s", "1h02m"]


def test_console_drops_chatter_and_worker_duplicates():
    out = io.StringIO()
    console = StageConsole("train-32", out=out, clock=Clock())
    step = WORKER + "[train-32] step 1/400 loss 2.9752 21.4 samples/s data-wait 84.6% ETA 9.9 min"
    for line in CHATTER + [step, step] + OWN:
        console.feed(line)
    console.close()
    assert out.getvalue().splitlines() == [f"[train-32] {line}" for line in OWN]


def test_verbose_console_shows_everything_once():
    out = io.StringIO()
    console = StageConsole("train-32", out=out, verbose=True, clock=Clock())
    step = WORKER + "[train-32] step 1/400 loss 2.9752"
    for line in [CHATTER[2], step, step, CHATTER[8], CHATTER[9]] + OWN[:1]:
        console.feed(line)
    shown = out.getvalue().splitlines()
    assert shown == ["[train-32] " + CHATTER[2], "[train-32] [train-32] step 1/400 loss 2.9752",
                     "[train-32] " + CHATTER[8], "[train-32] " + CHATTER[9], "[train-32] " + OWN[0]]


def test_progress_off_a_terminal_is_throttled_and_measures_its_own_rate():
    out, clock = io.StringIO(), Clock()
    console = StageConsole("train-64", out=out, clock=clock)
    for done in range(0, 1001, 25):  # 10 steps per second: a tenth every 10 s; each line printed twice by Ray
        clock.t = done / 10
        line = WORKER + progress.progress_line(done=done, total=1000, unit="step")
        console.feed(line)
        console.feed(line)
    shown = out.getvalue().splitlines()
    assert len(shown) == 11, shown  # 0 %, then one per tenth
    assert shown[5] == "train-64   500/1000 steps  10.0 steps/s  ETA 50s"
    assert shown[-1].startswith("train-64   1000/1000 steps")


def test_slow_progress_off_a_terminal_shows_a_line_every_30_s():
    out, clock = io.StringIO(), Clock()
    console = StageConsole("precompute", out=out, clock=clock)
    for t in range(0, 100, 5):  # 1 % of the total every 5 s
        clock.t = t
        console.feed(progress.progress_line(done=t // 5, total=100, unit="row"))
    shown = out.getvalue().splitlines()
    assert [line.split()[1] for line in shown] == ["0/100", "6/100", "10/100", "16/100"]


def test_progress_on_a_terminal_updates_in_place():
    out, clock = io.StringIO(), Clock()
    console = StageConsole("vae", out=out, tty=True, clock=clock)
    for done in (10, 20):
        console.feed(progress.progress_line(done=done, total=40, unit="step", rate=5.0))
    console.feed("vae: saved")
    assert out.getvalue() == ("\r" + "vae        10/40 steps  5.0 steps/s  ETA 6s".ljust(79) +
                              "\r" + "vae        20/40 steps  5.0 steps/s  ETA 4s".ljust(79) + "\n[vae] vae: saved\n")


def test_reporter_emits_changes_with_its_rate_and_a_last_line(capsys):
    counts, clock = iter([(0, 40), (0, 40), (10, 40), (30, 40), (40, 40)]), Clock()
    reporter = progress.Reporter(lambda: next(counts), unit="image", clock=clock)
    for t in (0, 5, 10, 15):  # what the thread does every `every_s`
        clock.t = t
        reporter.report()
    clock.t = 20
    reporter.report(final=True)
    lines = [progress.parse(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p.done, p.total) for p in lines] == [(0, 40), (10, 40), (30, 40), (40, 40)]  # (0, 40) once
    assert [p.rate for p in lines] == [None, 1.0, 2.0, 2.0]  # since the first poll, start-up included


def test_reporter_thread_ends_with_its_block_and_survives_a_failing_poll(capsys):
    with progress.Reporter(lambda: (1, 2), unit="url", every_s=0.01) as reporter:
        pass
    assert not reporter.thread.is_alive()
    assert [progress.parse(line).done for line in capsys.readouterr().out.splitlines()] == [1, 1]  # first, last
    with pytest.raises(KeyError):
        with progress.Reporter(lambda: (1, None), unit="url") as reporter:
            raise KeyError("the job failed")
    assert not reporter.thread.is_alive()
    assert len(capsys.readouterr().out.splitlines()) == 1  # no last line after an error

    def broken() -> tuple[int, int | None]:
        raise OSError("listing failed")
    with progress.Reporter(broken, unit="url") as reporter:
        pass  # the job goes on: a poll that fails costs its progress lines only
    assert capsys.readouterr().out.splitlines() == ["progress reporting stopped: OSError: listing failed"]


@pytest.mark.integration
def test_experiments_we_create_open_on_training_runs(mlflow_server):
    from mlflow import MlflowClient

    from pipelines.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, StageRun

    sys.path.insert(0, str(ROOT / "jobs"))
    from run_pipeline import mlflow_links

    uri, name = mlflow_server["MLFLOW_TRACKING_URI"], f"kind-{uuid.uuid4().hex[:8]}"
    run = StageRun.open(tracking_uri=uri, experiment=name, stage_key="pipeline:p", run_name="p", tags={})
    run.finish("FINISHED")
    exp = MlflowClient(uri).get_experiment_by_name(name)
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND == "custom_model_development"
    links = mlflow_links(uri, experiment=name, pipeline="p", parent_run_id=run.run_id)
    assert f"{uri}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in links
    assert f"run 'p' ({run.run_id})" in links and "comparison/metrics.png" in links
