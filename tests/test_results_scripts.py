"""``results/record_runs.py`` and ``results/report.py``: a run recorded from its MLflow store is rebuilt
into the paper-layout table and curves with the same final score."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from fp3o_lightning.report import latest_per_step

RESULTS = Path(__file__).resolve().parents[1] / "results"
TOTAL_FRAMES = 12_000


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, RESULTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_store(path: Path, frames: int, layout: str = "gymnasium", env_params: bool = True) -> Path:
    """An MLflow store with one Hopper 3x1 run tagged as ``FP3OModule.tag_runs`` did at commit 3b131c7 (the
    plain task whatever the observation layout), evaluating every 1000 frames up to ``frames``."""
    client = MlflowClient(tracking_uri=f"sqlite:///{path}")
    experiment = client.create_experiment("fp3o", artifact_location=str(path.parent / "artifacts"))
    tags = {"task": "Hopper 3x1", "sharing": "nops", "algorithm": "fp3o", "seed": "2", "env": "mamujoco"}
    run = client.create_run(experiment, tags=tags)
    client.log_param(run.info.run_id, "total_frames", TOTAL_FRAMES)
    if env_params:
        env = {"name": "mamujoco", "scenario": "Hopper", "agent_conf": "3x1", "observation_layout": layout}
        for key, value in env.items():
            client.log_param(run.info.run_id, f"env/{key}", value)
    for step in range(1000, frames + 1, 1000):
        client.log_metric(run.info.run_id, "train/frames", step, step=step, timestamp=step)
        client.log_metric(run.info.run_id, "eval/return_mean", step / 10, step=step, timestamp=step)
    return path


@pytest.fixture
def scripts(tmp_path, monkeypatch):
    """``record_runs`` and ``report`` writing into ``tmp_path`` instead of ``results/``."""
    record_runs, report = load("record_runs"), load("report")
    for module in (record_runs, report):
        monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(record_runs, "CSV", tmp_path / "table.csv")
    return record_runs, report


def the_run(store: Path):
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("fp3o").experiment_id])
    return client, run


@pytest.mark.parametrize("frames", [TOTAL_FRAMES, TOTAL_FRAMES - 1000], ids=["finished", "unfinished"])
def test_a_recorded_run_is_rebuilt_into_the_table(tmp_path, scripts, frames):
    record_runs, report = scripts
    client, run = the_run(make_store(tmp_path / "mlflow.db", frames))
    row, line = record_runs.record(client, run, commit="abc1234")
    summary = json.loads((tmp_path / "runs" / "hopper3x1_nops_fp3o_s2" / "run.json").read_text())
    assert summary["frames"] == frames and summary["commit"] == "abc1234"
    if frames < TOTAL_FRAMES:
        assert row is None and summary["status"] == "UNFINISHED" and "not finished" in line
        return
    assert row == {
        "task": "Hopper 3x1",
        "sharing": "nops",
        "algorithm": "fp3o",
        "seed": "2",
        "frames": str(TOTAL_FRAMES),
        "final_eval_return": "1200.0",
        "commit": "abc1234",
        "last10_eval_mean": f"{np.mean(np.arange(3, 13) * 100):.1f}",  # evaluations 3 to 12 of 12
        "superseded_by": "",
    }
    assert list(row) == list(record_runs.COLUMNS)
    assert report.main([]) == 0
    table = list(csv.DictReader((tmp_path / "report" / "table.csv").open()))
    assert float(table[0]["mean"]) == 1200 and float(table[0]["last_n_mean"]) == 750
    markdown = (tmp_path / "report" / "table.md").read_text()
    assert "Runs: the 1 recorded run in results/runs/ (results/report.py). " in markdown
    assert "sqlite" not in markdown and "sqlite" not in (tmp_path / "report" / "stats.md").read_text()
    assert (tmp_path / "report" / "curves_Hopper_3x1.png").stat().st_size > 0


def test_the_task_comes_from_the_env_params_not_the_tag(tmp_path, scripts):
    record_runs, _ = scripts
    client, run = the_run(make_store(tmp_path / "mlflow.db", TOTAL_FRAMES, layout="official"))
    row, line = record_runs.record(client, run, commit="3b131c7")
    assert row["task"] == "Hopper 3x1 official-obs"
    summary = json.loads((tmp_path / "runs" / "hopper3x1official-obs_nops_fp3o_s2" / "run.json").read_text())
    assert summary["tags"]["task"] == "Hopper 3x1 official-obs"
    assert "tagged task 'Hopper 3x1'" in line
    assert not (tmp_path / "runs" / "hopper3x1_nops_fp3o_s2").exists()


def test_an_experiment_is_recorded_apart_from_the_table(tmp_path, scripts):
    """``--experiment LABEL``: the run goes to ``experiments/<run>_LABEL/`` and gets no table row, so it
    cannot take the place of the table run with the same task, algorithm and seed."""
    record_runs, _ = scripts
    client, run = the_run(make_store(tmp_path / "mlflow.db", TOTAL_FRAMES))
    row, line = record_runs.record(client, run, commit="3b131c7", experiment="epochs10")
    directory = tmp_path / "experiments" / "hopper3x1_nops_fp3o_s2_epochs10"
    summary = json.loads((directory / "run.json").read_text())
    assert row is None and summary["experiment"] == "epochs10" and summary["status"] == "FINISHED"
    assert "final evaluation 1200.0" in line and "not in the table" in line
    assert (directory / "metrics.csv").read_text().count("eval/return_mean") == TOTAL_FRAMES // 1000
    assert not (tmp_path / "runs").exists()


def test_a_run_without_env_params_names_the_fix(tmp_path, scripts):
    record_runs, _ = scripts
    client, run = the_run(make_store(tmp_path / "mlflow.db", TOTAL_FRAMES, env_params=False))
    with pytest.raises(ValueError, match="logs no env/... params, so its task cannot be derived"):
        record_runs.record(client, run, commit="abc1234")


def test_superseded_runs_are_reported_apart(tmp_path, scripts, capsys):
    record_runs, report = scripts
    client, run = the_run(make_store(tmp_path / "mlflow.db", TOTAL_FRAMES))
    record_runs.record(client, run, commit="b70bc3d")
    assert report.main(["--superseded"]) == 1
    assert "no recorded runs in" in capsys.readouterr().err
    (tmp_path / "runs").rename(tmp_path / "runs_superseded")
    recorded = tmp_path / "runs_superseded" / "hopper3x1_nops_fp3o_s2" / "run.json"
    recorded.write_text(json.dumps(json.loads(recorded.read_text()) | {"superseded_by": "3b131c7"}))
    assert report.main(["--superseded", "--reps", "10"]) == 0
    markdown = (tmp_path / "report" / "superseded" / "table.md").read_text()
    assert (
        "Runs: the 1 recorded run in results/runs_superseded/ (results/report.py --superseded), superseded "
        "by the training defaults of 3b131c7. " in markdown
    )
    assert not (tmp_path / "report" / "table.md").exists()


def test_the_recorded_csv_matches_the_recorded_runs():
    record_runs = load("record_runs")
    rows = list(csv.DictReader((RESULTS / "mamujoco_10M.csv").open()))
    assert rows and list(rows[0]) == list(record_runs.COLUMNS)
    for row in rows:
        source = "runs_superseded" if row["superseded_by"] else "runs"
        directory = RESULTS / source / record_runs.run_directory(row)
        summary = json.loads((directory / "run.json").read_text())
        assert summary.get("superseded_by", "") == row["superseded_by"]
        assert summary["tags"]["task"] == row["task"] and summary["commit"] == row["commit"]
        history = [
            Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["frames"]))
            for r in csv.DictReader((directory / "metrics.csv").open())
            if r["key"] == "eval/return_mean"
        ]
        _, evaluations = latest_per_step(history)
        assert float(row["final_eval_return"]) == pytest.approx(evaluations[-1], abs=0.05)
        assert float(row["last10_eval_mean"]) == pytest.approx(evaluations[-10:].mean(), abs=0.05)


def test_training_time_leaves_out_the_stops_between_sessions():
    record_runs = load("record_runs")
    minute = 60_000
    stamps = [0, minute, 2 * minute, 2 * minute + 3 * 3_600_000, 3 * minute + 3 * 3_600_000]
    assert record_runs.training_hours(stamps) == pytest.approx(3 * minute / 3.6e6)


def test_stability_counts_the_late_evaluations_whose_episodes_agree(tmp_path):
    """``results/stability.py``: over the evaluations after ``after`` frames (a frame logged twice by a
    resumed run counts once, with its later value), the share with a return std under ``agree``, the
    std and mean of their returns, and the mean training return over the last ``last`` frames."""
    rows = [("key", "frames", "value", "timestamp")]
    for frames, mean, std in [(1, 0, 900), (2, 100, 10), (3, 300, 500), (4, 200, 20)]:
        rows += [("eval/return_mean", frames, mean, frames), ("eval/return_std", frames, std, frames)]
        rows += [("train/episode_return", frames, 10 * frames, frames)]
    rows += [("eval/return_mean", 3, 600, 99), ("eval/return_std", 3, 5, 99)]  # frame 3 again, resumed
    directory = tmp_path / "run"
    directory.mkdir()
    with (directory / "metrics.csv").open("w", newline="") as file:
        csv.writer(file).writerows(rows)
    stability = load("stability")
    result = stability.stability(directory, after=1, agree=50, last=2)
    assert result["evaluations"] == 3 and result["agreeing"] == 1.0
    assert result["mean"] == 300 and result["std_between"] == pytest.approx(np.std([100, 600, 200], ddof=1))
    assert result["training_return"] == 35  # frames 3 and 4
    stability.plot([directory], after=1, path=tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
