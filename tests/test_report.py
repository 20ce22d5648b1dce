"""``fp3o report`` on a small synthetic MLflow store: exact table cells, order, bold, CSV and figures."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from fp3o_lightning import report
from fp3o_lightning.report import ReportWarning, align_curves, build_report, format_report, main

STEPS = (0, 1000, 2000, 3000)
#: Final scores per (sharing, task, algorithm), one per seed 0, 1, 2, …
RETURNS = {  # eval/return_mean (train/episode_return is logged too, at other values)
    ("fups", "HalfCheetah 6x1", "fp3o"): [4000, 4100, 4200],
    ("fups", "HalfCheetah 6x1", "happo"): [3900, 4000, 4200],
    ("fups", "HalfCheetah 6x1", "mappo"): [3000, 3100, 3200],
    ("nops", "HalfCheetah 6x1", "fp3o"): [4500, 4800, 5100],
    ("nops", "HalfCheetah 6x1", "happo"): [4400, 4400, 4400],
    ("nops", "HalfCheetah 6x1", "mappo"): [4800, 4800, 4800],
}
TRAIN_ONLY = {  # only train/episode_return: the fallback metric
    ("fups", "Hopper 3x1", "fp3o"): [3000, 3500, 4000],
    ("fups", "Hopper 3x1", "happo"): [3600, 3600, 3600],
    ("fups", "Hopper 3x1", "mappo"): [1000, 2000, 3000],
    ("nops", "Hopper 3x1", "fp3o"): [3400, 3500, 3600],
    ("nops", "Hopper 3x1", "happo"): [3000, 3100, 3200],
}
WIN_RATES = {  # eval/win_rate as fractions (and eval/return_mean)
    ("fups", "3s5z", "fp3o"): [1.0, 0.9375, 0.96875],
    ("fups", "3s5z", "mappo"): [0.5, 0.75],
    ("fups", "3s5z", "ippo"): [0.0, 0.0, 0.0],
}


def log_run(client, experiment_id, tags, metrics, name, start_time=None, status="FINISHED", steps=STEPS):
    """A run whose metrics ramp linearly to their final values; the last step is logged first."""
    run = client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=name)
    batch = []
    for key, final in metrics.items():
        for t, step in enumerate(reversed(steps)):  # increasing timestamps, decreasing steps
            batch.append(Metric(key, final * step / steps[-1], 1_000 + t, step))
    client.log_batch(run.info.run_id, metrics=batch)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def populate(client, experiment_id):
    for table, metric_keys in (
        (RETURNS, ("eval/return_mean",)),
        (TRAIN_ONLY, ("train/episode_return",)),
        (WIN_RATES, ("eval/win_rate",)),
    ):
        for (sharing, task, algorithm), finals in table.items():
            for seed, final in enumerate(finals):
                tags = {"sharing": sharing, "task": task, "algorithm": algorithm, "seed": str(seed)}
                metrics = {key: final for key in metric_keys} | {"train/episode_return": final - 500}
                if table is TRAIN_ONLY:
                    metrics["train/episode_return"] = final
                if table is WIN_RATES:
                    metrics["eval/return_mean"] = 20.0
                # seed 2 logs at other frame counts than seeds 0 and 1
                steps = (0, 1500, 3000) if seed == 2 else STEPS
                name = f"{algorithm}-{sharing}-{task}-{seed}"
                log_run(client, experiment_id, tags, metrics, name, start_time=2_000, steps=steps)
    nops_happo = {"sharing": "nops", "task": "HalfCheetah 6x1", "algorithm": "happo", "seed": "0"}
    # an older run of the same seed (replaced by the newer one) and a crashed one (not FINISHED)
    log_run(client, experiment_id, nops_happo, {"eval/return_mean": 1.0}, "old-rerun", start_time=1_000)
    log_run(
        client,
        experiment_id,
        nops_happo | {"seed": "7"},
        {"eval/return_mean": 9e9},
        "crashed",
        status="FAILED",
    )
    log_run(client, experiment_id, {}, {"eval/return_mean": 1.0}, "untagged-run")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """The tracking URI of a synthetic store with experiment ``fp3o`` (populated) and ``empty``."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    populate(client, client.create_experiment("fp3o"))
    client.create_experiment("empty")
    return uri


@pytest.fixture(scope="module")
def built(store) -> report.Report:
    with pytest.warns(ReportWarning):
        return build_report(store)


def table_rows(markdown: str, header_start: str) -> list[list[str]]:
    """The cells of the Markdown table whose header line starts with ``header_start``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|--"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def section(markdown: str, caption_start: str) -> str:
    return markdown[markdown.index(caption_start) :]


def test_returns_table_exact(built):
    text = section(format_report(built), "Mean final `eval/return_mean` ± std over 3 seed(s)")
    assert table_rows(text, "| Network") == [
        ["Network", "Task", "FP3O", "HAPPO", "MAPPO"],
        ["FuPS", "HalfCheetah 6x1", "**4100.0** ± 81.6", "4033.3 ± 124.7", "3100.0 ± 81.6"],
        ["NoPS", "HalfCheetah 6x1", "**4800.0** ± 244.9", "4400.0 ± 0.0", "**4800.0** ± 0.0"],
    ]


def test_fallback_metric_table_says_which_metric(built):
    markdown = format_report(built)
    caption = "Mean final `train/episode_return` ± std over 3 seed(s) (fallback: not every run logs"
    assert caption in markdown
    assert table_rows(section(markdown, caption), "| Network") == [
        ["Network", "Task", "FP3O", "HAPPO", "MAPPO"],
        ["FuPS", "Hopper 3x1", "3500.0 ± 408.2", "**3600.0** ± 0.0", "2000.0 ± 816.5"],
        ["NoPS", "Hopper 3x1", "**3500.0** ± 81.6", "3100.0 ± 81.6", "–"],
    ]


def test_win_rate_table_is_median_percent_with_seed_counts(built):
    markdown = format_report(built)
    caption = "Median final win rate (%, `eval/win_rate`) ± std over seeds (n per cell)"
    assert table_rows(section(markdown, caption), "| Network") == [
        ["Network", "Task", "FP3O", "MAPPO", "IPPO"],
        ["FuPS", "3s5z", "**96.9** ± 2.6 (n=3)", "62.5 ± 12.5 (n=2)", "0.0 ± 0.0 (n=3)"],
    ]


def test_sections_order_requested_metric_first_win_rates_last(built):
    markdown = format_report(built)
    positions = [
        markdown.index(f"`{m}`") for m in ("eval/return_mean", "train/episode_return", "eval/win_rate")
    ]
    assert positions == sorted(positions)


def test_report_ordering_and_metrics(built):
    assert built.sharings == ["fups", "nops"]
    assert built.tasks == ["Hopper 3x1", "HalfCheetah 6x1", "3s5z"]  # the paper's order
    assert built.algorithms == ["fp3o", "happo", "mappo", "ippo"]
    assert built.task_metrics == {
        "HalfCheetah 6x1": "eval/return_mean",
        "Hopper 3x1": "train/episode_return",
        "3s5z": "eval/win_rate",
    }


def test_final_score_is_value_at_highest_step_and_newest_rerun_wins(built):
    # the last step is logged first (earliest timestamp) in every run; seed 0 of nops/happo was rerun
    assert built.cells[("nops", "HalfCheetah 6x1", "happo")].finals == [4400, 4400, 4400]
    assert built.cells[("fups", "3s5z", "mappo")].median == pytest.approx(62.5)


def test_skipped_runs_warn_once_each_with_names(store):
    with pytest.warns(ReportWarning) as record:
        build_report(store)
    messages = [str(w.message) for w in record]
    untagged = [m for m in messages if "untagged-run" in m]
    assert len(untagged) == 1 and "without the tags sharing, task, algorithm, seed" in untagged[0]
    assert any("crashed (FAILED)" in m and "not FINISHED" in m for m in messages)
    assert any("old-rerun" in m and "repeat a seed" in m for m in messages)


def test_include_unfinished(store):
    with pytest.warns(ReportWarning):
        built = build_report(store, include_unfinished=True)
    assert built.cells[("nops", "HalfCheetah 6x1", "happo")].finals[-1] == 9e9


def test_csv_numbers(built, tmp_path):
    report.write_csv(built, tmp_path / "table.csv")
    with open(tmp_path / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["sharing", "task", "algorithm", "mean", "std", "median", "n_seeds", "metric"]
    keys = [(r["sharing"], r["task"], r["algorithm"]) for r in rows]
    assert keys[:4] == [
        ("fups", "Hopper 3x1", "fp3o"),
        ("fups", "Hopper 3x1", "happo"),
        ("fups", "Hopper 3x1", "mappo"),
        ("fups", "HalfCheetah 6x1", "fp3o"),
    ]
    assert len(rows) == len(RETURNS) + len(TRAIN_ONLY) + len(WIN_RATES)
    by_key = dict(zip(keys, rows, strict=True))
    happo = by_key[("fups", "HalfCheetah 6x1", "happo")]
    assert float(happo["mean"]) == pytest.approx(12100 / 3)
    assert float(happo["std"]) == pytest.approx(np.std([3900, 4000, 4200]))
    assert (
        float(happo["median"]) == 4000 and happo["n_seeds"] == "3" and happo["metric"] == "eval/return_mean"
    )
    mappo = by_key[("fups", "3s5z", "mappo")]
    assert (float(mappo["mean"]), float(mappo["std"]), float(mappo["median"])) == (62.5, 12.5, 62.5)
    assert mappo["n_seeds"] == "2" and mappo["metric"] == "eval/win_rate (%)"
    assert by_key[("nops", "Hopper 3x1", "fp3o")]["metric"] == "train/episode_return"


def test_align_curves_interpolates_onto_common_frames():
    curves = [
        (np.array([0.0, 1000, 2000, 3000]), np.array([0.0, 1, 2, 3])),
        (np.array([0.0, 1500, 3000, 4000]), np.array([0.0, 3, 6, 100])),
        (np.array([500.0, 3000]), np.array([1.0, 6])),
    ]
    grid, values = align_curves(curves)
    assert grid.tolist() == [500, 1000, 1500, 2000, 3000]  # the frames in the range every seed covers
    assert values[0].tolist() == [0.5, 1, 1.5, 2, 3]
    assert values[1].tolist() == [1, 2, 3, 4, 6]
    assert values[2].tolist() == [1, 2, 3, 4, 6]


def test_main_prints_and_writes_everything(store, tmp_path, capsys):
    out = tmp_path / "reports"
    assert main(["--tracking_uri", store, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "| FuPS    | HalfCheetah 6x1 | **4100.0** ± 81.6" in captured.out
    assert captured.err.count("untagged-run") == 1 and "fp3o report: warning:" in captured.err
    assert (out / "table.md").read_text() in captured.out
    names = {
        "table.md",
        "table.csv",
        "curves_HalfCheetah_6x1.png",
        "curves_Hopper_3x1.png",
        "curves_3s5z.png",
    }
    assert {p.name for p in out.iterdir()} == names
    assert all((out / n).stat().st_size > 0 for n in names)


def test_filter_selects_runs(store, tmp_path):
    with pytest.warns(ReportWarning):  # the crashed run still matches
        built = build_report(store, filter_string="tags.task = 'HalfCheetah 6x1'")
    assert built.tasks == ["HalfCheetah 6x1"]
    assert math.isclose(built.cells[("fups", "HalfCheetah 6x1", "fp3o")].mean, 4100)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--experiment", "empty"], "No runs found in experiment(s) empty at sqlite:"),
        (["--filter", "tags.sweep = 'nope'"], "with filter \"tags.sweep = 'nope'\""),
        (
            ["--experiment", "missing"],
            "No MLflow experiment named 'missing' (known experiments: Default, empty, fp3o)",
        ),
        (["--filter", "this is not a filter"], "Invalid --filter"),
    ],
)
def test_errors(store, tmp_path, capsys, argv, expected):
    assert main(["--tracking_uri", store, "--out", str(tmp_path), *argv]) == 1
    err = capsys.readouterr().err
    assert expected in err
    if "No runs" in expected or "with filter" in expected:
        assert "fp3o sweep" in err and "fp3o fit" in err  # how to create runs
    assert not list(tmp_path.iterdir())


def test_missing_store_is_not_created(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["--tracking_uri", uri, "--out", str(tmp_path / "out")]) == 1
    assert "No MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for option in ("--tracking_uri", "--experiment", "--filter", "--metric", "--fallback_metric", "--out"):
        assert option in text


def test_task_metric_falls_back_when_some_runs_lack_eval():
    def info(task, *keys):
        return report.RunInfo("id", "name", "nops", task, "fp3o", "0", "FINISHED", 0, frozenset(keys))

    infos = [
        info("A", "eval/return_mean", "train/episode_return"),
        info("A", "train/episode_return"),
        info("B", "eval/return_mean"),
        info("C", "eval/win_rate", "eval/return_mean"),
    ]
    with pytest.warns(ReportWarning, match="Only 1 of 2 runs of task 'A' log eval/return_mean"):
        chosen = report.choose_task_metrics(
            infos, "eval/return_mean", "train/episode_return", "eval/win_rate"
        )
    assert chosen == {"A": "train/episode_return", "B": "eval/return_mean", "C": "eval/win_rate"}
