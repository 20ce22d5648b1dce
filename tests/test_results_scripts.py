"""``results/record_runs.py`` and ``results/report.py``: a run recorded from its MLflow store is rebuilt
into the paper-layout table and curves with the same final score."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

RESULTS = Path(__file__).resolve().parents[1] / "results"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, RESULTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_store(path: Path, total_frames: int, frames: int) -> Path:
    """An MLflow store with one run tagged as ``FP3OModule.tag_runs`` does, logging up to ``frames``."""
    client = MlflowClient(tracking_uri=f"sqlite:///{path}")
    experiment = client.create_experiment("fp3o", artifact_location=str(path.parent / "artifacts"))
    tags = {"task": "Hopper 3x1", "sharing": "nops", "algorithm": "fp3o", "seed": "2", "env": "mamujoco"}
    run = client.create_run(experiment, tags=tags)
    client.log_param(run.info.run_id, "total_frames", total_frames)
    for step in range(1000, frames + 1, 1000):
        client.log_metric(run.info.run_id, "train/frames", step, step=step, timestamp=step)
        client.log_metric(run.info.run_id, "eval/return_mean", step / 10, step=step, timestamp=step)
    return path


@pytest.mark.parametrize("frames", [3000, 2000], ids=["finished", "unfinished"])
def test_a_recorded_run_is_rebuilt_into_the_table(tmp_path, monkeypatch, frames):
    record_runs, report = load("record_runs"), load("report")
    for module in (record_runs, report):
        monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(record_runs, "CSV", tmp_path / "table.csv")
    store = make_store(tmp_path / "mlflow.db", total_frames=3000, frames=frames)
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("fp3o").experiment_id])
    row, line = record_runs.record(client, run, commit="abc1234")
    summary = json.loads((tmp_path / "runs" / "hopper3x1_nops_fp3o_s2" / "run.json").read_text())
    assert summary["frames"] == frames and summary["commit"] == "abc1234"
    if frames < 3000:
        assert row is None and summary["status"] == "UNFINISHED" and "not finished" in line
        return
    assert row == {
        "task": "Hopper 3x1",
        "sharing": "nops",
        "algorithm": "fp3o",
        "seed": "2",
        "frames": "3000",
        "final_eval_return": "300.0",
        "commit": "abc1234",
    }
    assert report.main([]) == 0
    table = list(csv.reader((tmp_path / "report" / "table.csv").open()))
    assert any("300" in cell for line in table for cell in line)
    assert (tmp_path / "report" / "curves_Hopper_3x1.png").stat().st_size > 0


def test_training_time_leaves_out_the_stops_between_sessions():
    record_runs = load("record_runs")
    minute = 60_000
    stamps = [0, minute, 2 * minute, 2 * minute + 3 * 3_600_000, 3 * minute + 3 * 3_600_000]
    assert record_runs.training_hours(stamps) == pytest.approx(3 * minute / 3.6e6)
