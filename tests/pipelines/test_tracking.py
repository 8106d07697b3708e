"""MLflow tracking without a server: a sqlite store keeps its artifacts beside the database."""

from __future__ import annotations

from pathlib import Path

from pipelines.tracking import StageRun


def test_sqlite_store_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlruns here
    (tmp_path / "db").mkdir()
    run = StageRun.open(tracking_uri=f"sqlite:///{tmp_path}/db/mlflow.db", experiment="exp", stage_key="k",
                        run_name="n")
    note = tmp_path / "note.txt"
    note.write_text("hi")
    run.log_artifact(note, "notes")
    stored = [p.relative_to(tmp_path) for p in tmp_path.rglob("note.txt") if p != note]
    assert stored == [Path("db", "artifacts", "exp", run.run_id, "artifacts", "notes", "note.txt")]
    again = StageRun.find(tracking_uri=f"sqlite:///{tmp_path}/db/mlflow.db", experiment="exp", stage_key="k")
    assert again.run_id == run.run_id and again.state().status == "RUNNING"
