"""The reproduction's paper-layout table and learning curves, from the runs recorded in ``results/runs/``.

    python results/report.py            # writes results/report/ (table.md, curves_<task>.png, ...)

The runs were made on separate MLflow stores (one per run, on machines that may be gone); this loads
each recorded run (``results/record_runs.py``) into one temporary MLflow store, with its tags,
hyperparameters, status and metric histories, and runs ``fp3o report`` on it (further arguments go to
``fp3o report``). It reports finished runs only; ``--include_unfinished`` adds the others.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric

from fp3o_lightning import report

RESULTS = Path(__file__).resolve().parent


def load_run(client: MlflowClient, experiment_id: str, directory: Path) -> None:
    """Create one MLflow run from ``directory``'s ``run.json`` and ``metrics.csv``."""
    summary = json.loads((directory / "run.json").read_text())
    run = client.create_run(experiment_id, tags=summary["tags"], run_name=directory.name)
    histories = defaultdict(list)
    with (directory / "metrics.csv").open() as file:
        for row in csv.DictReader(file):
            metric = Metric(row["key"], float(row["value"]), int(row["timestamp"]), int(row["frames"]))
            histories[row["key"]].append(metric)
    for metrics in histories.values():
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
    status = "FINISHED" if summary["status"] == "FINISHED" else "KILLED"
    client.set_terminated(run.info.run_id, status=status)


def main(argv: list[str] | None = None) -> int:
    out = RESULTS / "report"
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri)
        experiment_id = client.create_experiment("fp3o", artifact_location=str(Path(tmp) / "artifacts"))
        for directory in sorted((RESULTS / "runs").iterdir()):
            load_run(client, experiment_id, directory)
        return report.main(["--tracking_uri", uri, "--out", str(out), *(argv or [])])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
