"""Append finished reproduction runs to ``results/mamujoco_10M.csv`` from their MLflow stores.

    python results/record_runs.py --commit b70bc3d /work/runs/*/mlflow.db

One row per run that reached its ``total_frames``, with exactly the columns
``task,sharing,algorithm,seed,frames,final_eval_return,commit``: ``final_eval_return`` is the last
evaluation's ``eval/return_mean`` (the mean of its 32 episodes). A run already in the file (same task,
sharing, algorithm, seed and commit) is not written twice; unfinished runs are listed, not written.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from mlflow import MlflowClient

COLUMNS = ("task", "sharing", "algorithm", "seed", "frames", "final_eval_return", "commit")
CSV = Path(__file__).resolve().parent / "mamujoco_10M.csv"


def finished_rows(store: Path, commit: str) -> tuple[list[dict[str, str]], list[str]]:
    """The rows of the finished runs in the MLflow sqlite ``store``, and a line for each unfinished one."""
    client = MlflowClient(tracking_uri=f"sqlite:///{store.resolve()}")
    rows, unfinished = [], []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            tags, params = run.data.tags, run.data.params
            frames = int(run.data.metrics.get("train/frames", 0))
            evaluations = client.get_metric_history(run.info.run_id, "eval/return_mean")
            if frames < int(params.get("total_frames", 0)) or not evaluations:
                name = f"{tags.get('algorithm')} seed {tags.get('seed')}"
                unfinished.append(f"{store}: {name} at {frames} frames")
                continue
            last = max(evaluations, key=lambda m: m.step)
            row = {"task": tags["task"], "sharing": tags["sharing"], "algorithm": tags["algorithm"]}
            row |= {"seed": tags["seed"], "frames": str(frames), "final_eval_return": f"{last.value:.1f}"}
            rows.append(row | {"commit": commit})
    return rows, unfinished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", type=Path, help="mlflow.db files of the runs")
    parser.add_argument("--commit", required=True, help="the commit the runs' code was taken from")
    args = parser.parse_args()
    existing = list(csv.DictReader(CSV.open())) if CSV.exists() else []
    key = ("task", "sharing", "algorithm", "seed", "commit")
    known = {tuple(row[k] for k in key) for row in existing}
    new = []
    for store in args.stores:
        rows, unfinished = finished_rows(store, args.commit)
        new += [row for row in rows if tuple(row[k] for k in key) not in known]
        for line in unfinished:
            print(f"not finished: {line}")
    with CSV.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(existing + new)
    print(f"{len(new)} run(s) added to {CSV}")


if __name__ == "__main__":
    main()
