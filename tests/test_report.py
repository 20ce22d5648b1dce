"""``fp3o report`` on a small synthetic MLflow store: exact table cells, order, bold, CSV and figures."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import scipy.stats
from mlflow import MlflowClient
from mlflow.entities import Metric

from fp3o_lightning import report, report_stats
from fp3o_lightning.report import (
    ReportWarning,
    align_curves,
    build_report,
    display_sharing,
    format_report,
    main,
)

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


def seed_steps(seed: int) -> tuple[int, ...]:
    """The frames a seed logs at: seed 2 logs at other frame counts than seeds 0 and 1."""
    return (0, 1500, 3000) if seed == 2 else STEPS


def last_two_mean(final: float, seed: int) -> float:
    """The mean of a ramp's last two logged values (``log_run``)."""
    steps = seed_steps(seed)
    return final * (steps[-2] + steps[-1]) / (2 * steps[-1])


def expected_cell(values: list[float], centre=np.mean, bold: bool = False) -> str:
    score = f"{centre(values):.1f}"
    return f"{f'**{score}**' if bold else score} ± {np.std(values):.1f}"


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
                name = f"{algorithm}-{sharing}-{task}-{seed}"
                log_run(client, experiment_id, tags, metrics, name, start_time=2_000, steps=seed_steps(seed))
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
    assert built.cells[("nops", "HalfCheetah 6x1", "happo")].scores().tolist() == [4400, 4400, 4400]
    assert built.cells[("fups", "3s5z", "mappo")].median() == pytest.approx(62.5)


def test_last_n_mean_uses_every_value_of_a_shorter_run(built):
    # the default window (10) is longer than every run's 3 or 4 values: a ramp from 0 averages half its final
    for key, finals in RETURNS.items():
        cell = built.cells[key]
        assert cell.seeds == ["0", "1", "2"]
        np.testing.assert_allclose(cell.scores("last_n"), np.array(finals) / 2)


@pytest.fixture(scope="module")
def last_two(store) -> report.Report:
    with pytest.warns(ReportWarning):
        return build_report(store, final_window=2)


def test_last_n_table_follows_each_final_table(last_two):
    markdown = format_report(last_two)
    assert "each run's mean of its last 2 logged values" in markdown.split("\n\n")[1]
    final = "Mean final `eval/return_mean` ± std over 3 seed(s)"
    last_n = (
        "Mean last-2 `eval/return_mean` (each run's mean of its last 2 logged values) ± std over 3 seed(s)"
    )
    fallback = "Mean final `train/episode_return`"
    assert markdown.index(final) < markdown.index(last_n) < markdown.index(fallback)
    expected = {
        key: [last_two_mean(final, seed) for seed, final in enumerate(finals)]
        for key, finals in RETURNS.items()
    }
    rows = table_rows(section(markdown, last_n), "| Network")
    assert rows[0] == ["Network", "Task", "FP3O", "HAPPO", "MAPPO"]
    for row, sharing in zip(rows[1:], ("fups", "nops"), strict=True):
        values = [expected[(sharing, "HalfCheetah 6x1", a)] for a in ("fp3o", "happo", "mappo")]
        best = max(round(float(np.mean(v)), 1) for v in values)
        cells = [expected_cell(v, bold=round(float(np.mean(v)), 1) == best) for v in values]
        assert row == [display_sharing(sharing), "HalfCheetah 6x1", *cells]


def test_last_n_win_rate_table_is_the_median_in_percent(last_two):
    caption = "Median last-2 win rate (%, `eval/win_rate`) (each run's mean of its last 2 logged values)"
    rows = table_rows(section(format_report(last_two), caption), "| Network")
    means = {
        a: [100 * last_two_mean(final, seed) for seed, final in enumerate(WIN_RATES[("fups", "3s5z", a)])]
        for a in ("fp3o", "mappo", "ippo")
    }
    assert rows[1][2:] == [
        expected_cell(means["fp3o"], np.median, bold=True) + " (n=3)",
        expected_cell(means["mappo"], np.median) + " (n=2)",
        expected_cell(means["ippo"], np.median) + " (n=3)",
    ]


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
    assert built.cells[("nops", "HalfCheetah 6x1", "happo")].scores()[-1] == 9e9


def test_csv_numbers(built, tmp_path):
    report.write_csv(built, tmp_path / "table.csv")
    with open(tmp_path / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "sharing",
        "task",
        "algorithm",
        "mean",
        "std",
        "median",
        "n_seeds",
        "metric",
        "last_n_mean",
        "last_n_std",
    ]
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
    halves = np.array([3900, 4000, 4200]) / 2  # the mean of all 3 or 4 values of a ramp from 0
    assert float(happo["last_n_mean"]) == pytest.approx(halves.mean())
    assert float(happo["last_n_std"]) == pytest.approx(halves.std())
    mappo = by_key[("fups", "3s5z", "mappo")]
    assert (float(mappo["mean"]), float(mappo["std"]), float(mappo["median"])) == (62.5, 12.5, 62.5)
    assert mappo["n_seeds"] == "2" and mappo["metric"] == "eval/win_rate (%)"
    assert by_key[("nops", "Hopper 3x1", "fp3o")]["metric"] == "train/episode_return"


def test_seeds_are_in_numeric_order_then_other_labels():
    assert sorted(["10", "x", "2", "0"], key=report.seed_order) == ["0", "2", "10", "x"]


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
    assert main(["--tracking_uri", store, "--out", str(out), "--reps", "200"]) == 0
    captured = capsys.readouterr()
    assert f"Runs: experiment(s) fp3o at {store}. " in (out / "table.md").read_text()
    assert "| FuPS    | HalfCheetah 6x1 | **4100.0** ± 81.6" in captured.out
    assert captured.err.count("untagged-run") == 1 and "fp3o report: warning:" in captured.err
    assert (out / "table.md").read_text() in captured.out
    assert (out / "stats.md").read_text() in captured.out
    names = {
        "table.md",
        "table.csv",
        "curves_HalfCheetah_6x1.png",
        "curves_Hopper_3x1.png",
        "curves_3s5z.png",
        "stats.md",
        "stats.csv",
        "profiles.csv",
        *(
            f"{figure}_{sharing}.png"
            for figure in ("aggregates", "profiles", "improvement")
            for sharing in ("fups", "nops")
        ),
    }
    assert {p.name for p in out.iterdir()} == names
    assert all((out / n).stat().st_size > 0 for n in names)


def test_description_replaces_the_store_in_table_md(store, tmp_path, capsys):
    argv = ["--tracking_uri", store, "--out", str(tmp_path), "--reps", "10", "--final_window", "3"]
    assert main([*argv, "--description", "the runs of the paper sweep"]) == 0
    capsys.readouterr()
    text = (tmp_path / "table.md").read_text()
    assert text.splitlines()[2].startswith("Runs: the runs of the paper sweep. The final score")
    assert "sqlite" not in text and "last-3" in text
    assert "sqlite" not in (tmp_path / "stats.md").read_text()


def test_filter_selects_runs(store, tmp_path):
    with pytest.warns(ReportWarning):  # the crashed run still matches
        built = build_report(store, filter_string="tags.task = 'HalfCheetah 6x1'")
    assert built.tasks == ["HalfCheetah 6x1"]
    assert math.isclose(built.cells[("fups", "HalfCheetah 6x1", "fp3o")].mean(), 4100)


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
        (["--final_window", "0"], "--final_window 0: give a positive number of logged values"),
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
    options = ("--tracking_uri", "--experiment", "--filter", "--metric", "--fallback_metric", "--out")
    for option in (*options, "--final_window", "--description"):
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


# ------------------------------------------------------------------------------ rliable statistics


def synthetic_report(finals: dict[tuple[str, str, str], list[float]]) -> report.Report:
    """Cells of final scores, seeds 0, 1, …; the last-N means are not used by the statistics."""
    cells = {
        key: report.Cell(
            *key,
            metric="m",
            percent=False,
            runs=[report.SeedScore(str(i), v, 0.0) for i, v in enumerate(values)],
        )
        for key, values in finals.items()
    }
    return report.Report(cells, {key[1]: "m" for key in finals})


def test_bounds_are_min_max_over_all_runs_of_a_task_or_the_references(built, tmp_path):
    bounds = report_stats.task_bounds(built)
    assert bounds["HalfCheetah 6x1"] == (3000, 5100) and bounds["Hopper 3x1"] == (1000, 4000)
    references = tmp_path / "refs.csv"
    references.write_text(
        "task,low,high\nHopper 3x1,0,5000\nHalfCheetah 6x1,-100,6000\n3s5z,0,100\nother,1,2\n"
    )
    assert report_stats.task_bounds(built, report_stats.read_references(references))["3s5z"] == (0, 100)
    references.write_text("task,low,high\nHopper 3x1,0,5000\n")
    with pytest.raises(
        report.ReportError, match="no row for HalfCheetah 6x1, 3s5z; add 'task,low,high' rows"
    ):
        report_stats.task_bounds(built, report_stats.read_references(references))
    references.write_text("task,low,high\nHopper 3x1,5,5\n")
    with pytest.raises(report.ReportError, match="low equals high for Hopper 3x1"):
        report_stats.read_references(references)


def test_statistics_use_the_largest_complete_block_of_cells(built):
    # FuPS: IPPO has only 3s5z, HAPPO lacks it; NoPS: MAPPO lacks Hopper
    assert report_stats.complete_block(built, "fups") == (
        ["fp3o", "happo", "mappo"],
        ["Hopper 3x1", "HalfCheetah 6x1"],
    )
    assert report_stats.complete_block(built, "nops") == (
        ["fp3o", "happo"],
        ["Hopper 3x1", "HalfCheetah 6x1"],
    )
    with pytest.warns(ReportWarning, match="FuPS: the aggregate statistics leave out 8 run") as record:
        tasks, matrices, left_out = report_stats.score_matrices(
            built, "fups", report_stats.task_bounds(built)
        )
    assert "3s5z, IPPO, seed 2: no HAPPO run on 3s5z" in str(record[0].message)
    assert tasks == ["Hopper 3x1", "HalfCheetah 6x1"]
    assert {a: m.shape for a, m in matrices.items()} == {a: (3, 2) for a in ("fp3o", "happo", "mappo")}
    np.testing.assert_allclose(matrices["fp3o"][:, 1], np.array([1000, 1100, 1200]) / 2100)
    np.testing.assert_allclose(matrices["mappo"][:, 0], np.array([0, 1000, 2000]) / 3000)
    assert [(r.task, r.algorithm, r.seed) for r in left_out] == [
        ("3s5z", a, str(seed)) for a, n in (("fp3o", 3), ("mappo", 2), ("ippo", 3)) for seed in range(n)
    ]
    assert {r.reason for r in left_out} == {
        "no HAPPO run on 3s5z; the statistics need every algorithm on every task"
    }


def test_an_algorithm_outside_the_block_is_named_as_lacking_the_tasks(built):
    with pytest.warns(ReportWarning):
        _, _, left_out = report_stats.score_matrices(built, "nops", report_stats.task_bounds(built))
    assert [str(r) for r in left_out] == [
        f"HalfCheetah 6x1, MAPPO, seed {seed}: MAPPO has no run on Hopper 3x1; the statistics need every "
        "algorithm on every task"
        for seed in range(3)
    ]


def test_each_algorithm_keeps_the_seeds_it_has_on_every_task():
    finals = {("nops", "A", "fp3o"): [1, 2, 3], ("nops", "A", "happo"): [0, 1]}
    finals |= {("nops", "B", "fp3o"): [4, 3, 2, 1], ("nops", "B", "happo"): [2, 3]}
    with pytest.warns(ReportWarning, match="leave out 1 run") as record:
        _, matrices, left_out = report_stats.score_matrices(
            synthetic_report(finals), "nops", {"A": (0, 4), "B": (0, 4)}
        )
    assert matrices["fp3o"].tolist() == [[0.25, 1.0], [0.5, 0.75], [0.75, 0.5]]
    assert matrices["happo"].tolist() == [[0.0, 0.5], [0.25, 0.75]]
    assert [str(r) for r in left_out] == [
        "B, FP3O, seed 3: FP3O has 3 seed(s) on A; an algorithm uses as many seeds on every task"
    ]
    assert "B, FP3O, seed 3" in str(record[0].message)


def test_statistics_of_algorithms_with_different_numbers_of_seeds(tmp_path):
    finals = {("nops", "A", "fp3o"): [90, 80, 70], ("nops", "B", "fp3o"): [60, 50]}
    finals |= {("nops", "A", "happo"): [10], ("nops", "B", "happo"): [20]}
    with pytest.warns(ReportWarning, match="leave out 1 run"):
        (stats,) = report_stats.compute_stats(
            synthetic_report(finals), {"A": (0, 100), "B": (0, 100)}, reps=50
        )
    assert stats.seeds == {"fp3o": 2, "happo": 1}
    assert stats.aggregates["fp3o"]["Mean"].value == pytest.approx(0.7)  # seeds 0 and 1 of each task
    assert stats.aggregates["happo"]["Mean"].value == pytest.approx(0.15)
    assert stats.improvement["happo"] == report_stats.Estimate(1.0, 1.0, 1.0)
    report_stats.write_stats([stats], tmp_path, "by the reference scores")
    markdown = (tmp_path / "stats.md").read_text()
    rows = table_rows(markdown, "| Algorithm")
    assert [r[:2] for r in rows] == [["Algorithm", "Seeds"], ["FP3O", "2"], ["HAPPO", "1"]]
    assert (
        "Runs left out (1):\n- A, FP3O, seed 2: FP3O has 2 seed(s) on B; an algorithm uses as many seeds on "
        "every task" in markdown
    )
    with open(tmp_path / "stats.csv") as f:
        seeds = {(r["algorithm"], r["statistic"]): r["seeds"] for r in csv.DictReader(f)}
    assert seeds[("fp3o", "Mean")] == "2" and seeds[("happo", "IQM")] == "1"


def test_iqm_mean_improvement_and_profiles():
    rng = np.random.default_rng(0)
    finals = {("fups", task, "fp3o"): list(rng.uniform(60, 100, 5)) for task in ("A", "B")}
    finals |= {("fups", task, "happo"): list(rng.uniform(0, 40, 5)) for task in ("A", "B")}
    finals |= {("fups", task, "mappo"): finals[("fups", task, "fp3o")] for task in ("A", "B")}
    (stats,) = report_stats.compute_stats(synthetic_report(finals), {"A": (0, 100), "B": (0, 100)}, reps=200)
    assert stats.tasks == ["A", "B"] and stats.seeds == {"fp3o": 5, "happo": 5, "mappo": 5}
    assert stats.left_out == []
    fp3o_scores = np.array([finals[("fups", t, "fp3o")] for t in ("A", "B")]) / 100
    iqm, mean = stats.aggregates["fp3o"]["IQM"], stats.aggregates["fp3o"]["Mean"]
    assert mean.value == pytest.approx(fp3o_scores.mean())
    assert iqm.value == pytest.approx(scipy.stats.trim_mean(fp3o_scores.ravel(), 0.25))
    assert iqm.low <= iqm.value <= iqm.high and iqm.low < iqm.high
    assert stats.improvement["happo"] == report_stats.Estimate(1.0, 1.0, 1.0)  # FP3O beats every HAPPO run
    assert stats.improvement["mappo"].value == pytest.approx(0.5)  # same scores: a coin toss
    fractions, ci = stats.profiles["happo"]
    assert fractions[0] == 1.0 and fractions[-1] == 0.0 and np.all(np.diff(fractions) <= 0)
    assert np.all(ci[0] <= fractions + 1e-12) and np.all(fractions <= ci[1] + 1e-12)


def test_stats_outputs(built, tmp_path):
    with pytest.warns(ReportWarning):
        stats = report_stats.compute_stats(built, reps=100)
    paths = report_stats.write_stats(stats, tmp_path, "min–max over its runs")
    markdown = (tmp_path / "stats.md").read_text()
    assert "## FuPS: 2 task(s)" in markdown and "## NoPS: 2 task(s)" in markdown
    assert "Runs left out (8):\n- 3s5z, FP3O, seed 0: no HAPPO run on 3s5z" in markdown
    assert "Runs left out (3):\n- HalfCheetah 6x1, MAPPO, seed 0: MAPPO has no run on Hopper 3x1" in markdown
    rows = table_rows(section(markdown, "## NoPS"), "| Algorithm")
    assert rows[0] == ["Algorithm", "Seeds", "IQM [95% CI]", "Mean [95% CI]", "P(FP3O > algorithm) [95% CI]"]
    assert [r[:2] for r in rows[1:]] == [["FP3O", "3"], ["HAPPO", "3"]] and rows[1][4] == "–"
    with open(tmp_path / "stats.csv") as f:
        lines = list(csv.DictReader(f))
    nops = {(r["algorithm"], r["statistic"]): r for r in lines if r["sharing"] == "nops"}
    assert set(nops) == {(a, s) for a in ("fp3o", "happo") for s in ("IQM", "Mean")} | {
        ("happo", "P(fp3o > algorithm)")
    }
    assert float(nops[("fp3o", "Mean")]["estimate"]) == pytest.approx(
        stats[1].aggregates["fp3o"]["Mean"].value
    )
    with open(tmp_path / "profiles.csv") as f:
        assert len(list(csv.DictReader(f))) == len(report_stats.TAUS) * (3 + 2)
    assert all(p.stat().st_size > 0 for p in paths)


def test_main_with_missing_reference_scores_names_the_fix(store, tmp_path, capsys):
    references = tmp_path / "refs.csv"
    references.write_text("task,low,high\nHopper 3x1,0,5000\n")
    argv = ["--tracking_uri", store, "--out", str(tmp_path / "out"), "--reference_scores", str(references)]
    assert main(argv) == 1
    assert "--reference_scores has no row for HalfCheetah 6x1, 3s5z" in capsys.readouterr().err
