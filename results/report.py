"""The reproduction's paper-layout table and learning curves, from the runs recorded in ``results/runs/``.

    python results/report.py               # results/runs/ into results/report/ (table.md, curves, ...)
    python results/report.py --superseded  # results/runs_superseded/ into results/report/superseded/

The runs were made on separate MLflow stores (one per run, on machines that may be gone); this loads
each recorded run (``results/record_runs.py``) into one temporary MLflow store, with its tags,
hyperparameters, status and metric histories, and runs ``fp3o report`` on it (further arguments go to
``fp3o report``), describing the runs by their directory rather than the temporary store. It reports
finished runs only; ``--include_unfinished`` adds the others. Runs that a later change of the training
defaults superseded (``superseded_by`` in their run.json) are kept apart in ``results/runs_superseded/``.
"""

from __future__ import annotations

import argparse
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


def load_run(client: MlflowClient, experiment_id: str, directory: Path) -> dict:
    """Create one MLflow run from ``directory``'s ``run.json`` and ``metrics.csv``; returns the run.json."""
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
    return summary


def describe(source: str, summaries: list[dict]) -> str:
    """``the 3 recorded runs in results/runs/ (results/report.py)``, and the superseding commits if any."""
    superseding = sorted({s["superseded_by"] for s in summaries if s.get("superseded_by")})
    command = "results/report.py --superseded" if source == "runs_superseded" else "results/report.py"
    runs = f"{len(summaries)} recorded run{'s' if len(summaries) != 1 else ''}"
    text = f"the {runs} in results/{source}/ ({command})"
    return text + (
        f", superseded by the training defaults of {', '.join(superseding)}" if superseding else ""
    )


def main(argv: list[str] | None = None) -> int:
    """Report the runs of ``results/runs/`` (or, with ``--superseded``, ``results/runs_superseded/``)."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--superseded", action="store_true")
    args, rest = options.parse_known_args(argv or [])
    source = "runs_superseded" if args.superseded else "runs"
    out = RESULTS / "report" / "superseded" if args.superseded else RESULTS / "report"
    directories = sorted(d for d in (RESULTS / source).glob("*") if d.is_dir())
    if not directories:
        print(
            f"results/report.py: error: no recorded runs in {RESULTS / source}; record them with "
            "results/record_runs.py.",
            file=sys.stderr,
        )
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri)
        experiment_id = client.create_experiment("fp3o", artifact_location=str(Path(tmp) / "artifacts"))
        summaries = [load_run(client, experiment_id, directory) for directory in directories]
        description = describe(source, summaries)
        return report.main(["--tracking_uri", uri, "--out", str(out), "--description", description, *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
