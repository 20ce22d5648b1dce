"""Record the reproduction runs from their MLflow stores into ``results/``.

    python results/record_runs.py --commit b70bc3d /work/runs/*/mlflow.db

For every run (finished or not), ``results/runs/<run>/`` gets ``metrics.csv`` (the history of
``RECORDED_METRICS``: key, frames, value, timestamp in ms) and ``run.json`` (tags, hyperparameters,
status, frames, training wall time), so that the table and the learning curves can be rebuilt on any
machine (``results/report.py``). A run's task is derived from its ``env/...`` params
(``fp3o_lightning.envs.task_name``), not taken from its ``task`` tag: runs from ``3b131c7`` tagged
MaMuJoCo runs with the official observation layout with the plain task (``Hopper 3x1`` for
``Hopper 3x1 official-obs``); run.json's tags get the derived task.

Each finished run (``total_frames`` reached) also gets one row in ``results/mamujoco_10M.csv``, with
exactly the columns ``COLUMNS``: ``final_eval_return`` is the last evaluation's ``eval/return_mean`` (the
mean of its 32 episodes), ``last10_eval_mean`` the mean of the last 10 evaluations' returns, and
``superseded_by`` is empty (a later commit whose default change makes the run no longer count is
written there by hand, and the run's directory moved to ``results/runs_superseded/``). A run already in
the file (same task, sharing, algorithm, seed and commit) is not written twice.

An experiment, a run that changes a paper setting (``--experiment epochs10`` for one with
``--model.ppo_epochs 10``), goes to ``results/experiments/<run>_<label>/`` instead, with no row in the table.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from mlflow import MlflowClient

from fp3o_lightning.envs import task_name
from fp3o_lightning.report import last_n_mean, latest_per_step

COLUMNS = (
    "task",
    "sharing",
    "algorithm",
    "seed",
    "frames",
    "final_eval_return",
    "commit",
    "last10_eval_mean",
    "superseded_by",
)
RESULTS = Path(__file__).resolve().parent
CSV = RESULTS / "mamujoco_10M.csv"
RECORDED_METRICS = (
    "train/frames",
    "train/episode_return",
    "train/fps",
    "eval/return_mean",
    "eval/return_std",
)
#: A gap between two logged iterations longer than this is a stop (the run was resumed later).
STOP_GAP_MS = 10 * 60 * 1000
#: Evaluations averaged into ``last10_eval_mean``.
LAST_EVALUATIONS = 10


def run_directory(tags: dict[str, str]) -> str:
    """``halfcheetah6x1_nops_fp3o_s0``-style name of a run's directory."""
    task = tags["task"].lower().replace(" ", "")
    return f"{task}_{tags['sharing']}_{tags['algorithm']}_s{tags['seed']}"


def run_task(run) -> str:
    """The run's task from its ``env/...`` params (``env/scenario``, ``env/agent_conf``,
    ``env/observation_layout``, ...), as ``fp3o fit`` names it."""
    env = {
        key.removeprefix("env/"): value for key, value in run.data.params.items() if key.startswith("env/")
    }
    if not env:
        raise ValueError(
            f"Run {run.info.run_id} logs no env/... params, so its task cannot be derived; record runs "
            "logged by `fp3o fit`, which logs the model's env options as params."
        )
    return task_name(env)


def training_hours(timestamps: list[int]) -> float:
    """Hours between the first and the last logged iteration, without the stops between sessions."""
    steps = sorted(timestamps)
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    return sum(gap for gap in gaps if gap < STOP_GAP_MS) / 3.6e6


def record(
    client: MlflowClient, run, commit: str, experiment: str | None = None
) -> tuple[dict[str, str] | None, str]:
    """Write the run's ``metrics.csv`` and ``run.json``; its CSV row if it finished (and is not an
    ``experiment``), and a summary line."""
    params = run.data.params
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")} | {"task": run_task(run)}
    history = {key: client.get_metric_history(run.info.run_id, key) for key in RECORDED_METRICS}
    frames = int(max((m.value for m in history["train/frames"]), default=0))
    finished = frames >= int(params.get("total_frames", 0)) and history["eval/return_mean"]
    directory = RESULTS / "runs" / run_directory(tags)
    if experiment is not None:
        directory = RESULTS / "experiments" / f"{run_directory(tags)}_{experiment}"
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "metrics.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("key", "frames", "value", "timestamp"))
        for key, metrics in history.items():
            ordered = sorted(metrics, key=lambda m: m.step)
            writer.writerows((key, m.step, m.value, m.timestamp) for m in ordered)
    hours = training_hours([m.timestamp for m in history["train/frames"]])
    summary = {
        "tags": tags,
        "params": params,
        "status": "FINISHED" if finished else "UNFINISHED",
        "frames": frames,
        "training_hours": round(hours, 3),
        "commit": commit,
    } | ({"experiment": experiment} if experiment is not None else {})
    (directory / "run.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    line = f"{directory.name}: {frames} frames, {hours:.2f} h of training"
    if tags["task"] != run.data.tags.get("task"):
        line += f" (tagged task {run.data.tags.get('task')!r}; its env params make it {tags['task']!r})"
    if not finished:
        return None, f"{line} (not finished)"
    _, evaluations = latest_per_step(history["eval/return_mean"])
    final, last10 = evaluations[-1], last_n_mean(evaluations, LAST_EVALUATIONS)
    line += f", final evaluation {final:.1f}, mean of the last {LAST_EVALUATIONS} {last10:.1f}"
    if experiment is not None:
        return None, f"{line} (an experiment: not in the table)"
    row = {"task": tags["task"], "sharing": tags["sharing"], "algorithm": tags["algorithm"]}
    row |= {"seed": tags["seed"], "frames": str(frames), "final_eval_return": f"{final:.1f}"}
    row |= {"commit": commit, "last10_eval_mean": f"{last10:.1f}", "superseded_by": ""}
    return row, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", type=Path, help="mlflow.db files of the runs")
    parser.add_argument("--commit", required=True, help="the commit the runs' code was taken from")
    parser.add_argument(
        "--experiment", metavar="LABEL", help="record into results/experiments/<run>_LABEL/, not the table"
    )
    args = parser.parse_args()
    existing = list(csv.DictReader(CSV.open())) if CSV.exists() else []
    key = ("task", "sharing", "algorithm", "seed", "commit")
    known = {tuple(row[k] for k in key) for row in existing}
    new = []
    for store in args.stores:
        client = MlflowClient(tracking_uri=f"sqlite:///{store.resolve()}")
        for experiment in client.search_experiments():
            for run in client.search_runs([experiment.experiment_id]):
                row, line = record(client, run, args.commit, args.experiment)
                print(line)
                if row is not None and tuple(row[k] for k in key) not in known:
                    new.append(row)
                    known.add(tuple(row[k] for k in key))
    with CSV.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(existing + new)
    print(f"{len(new)} run(s) added to {CSV}")


if __name__ == "__main__":
    main()
