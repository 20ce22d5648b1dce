"""Paper-style result tables and learning curves from the MLflow runs (``fp3o report``).

Runs are grouped by their ``sharing``, ``task`` and ``algorithm`` tags (set by ``FP3OModule.tag_runs``);
the *final score* of a run is the last logged value of the metric (the value at the highest step,
i.e. the most environment frames). As in the paper's Tables 1 and 2, rows are network type × task,
columns are algorithms, and a cell is the mean ± std of the final scores over seeds (population std),
or, for tasks whose runs log a win rate (SMAC-style), the median win rate ± std in percent. The best
value of each row is in bold. A second table in the same layout does the same with each run's mean of
its last ``--final_window`` logged values, which depends less on where a noisy run happened to stop.

``fp3o report`` prints the table(s) and writes ``table.md``, ``table.csv`` and one learning-curve
figure per task, ``curves_<task>.png``, to ``--out``. Beside them, with ``rliable`` (the ``ray``
extra), the IQM and mean of per-task normalised scores, FP3O's probability of improvement and the
performance profiles, with stratified bootstrap confidence intervals (``report_stats``)::

    fp3o report --filter "tags.sweep = 'paper'" --out reports/paper
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import numpy as np

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "fp3o"
DEFAULT_METRIC = "eval/return_mean"
DEFAULT_FALLBACK_METRIC = "train/episode_return"
DEFAULT_WIN_RATE_METRIC = "eval/win_rate"
#: Logged values averaged into a run's last-N mean (``--final_window``).
DEFAULT_FINAL_WINDOW = 10
#: Win rates are logged as fractions in [0, 1] and reported in percent, as in the paper's Table 2.
WIN_RATE_SCALE = 100.0

REQUIRED_TAGS = ("sharing", "task", "algorithm", "seed")
SHARING_NAMES = {"fups": "FuPS", "paps": "PaPS", "nops": "NoPS"}
ALGORITHM_NAMES = {"fp3o": "FP3O", "happo": "HAPPO", "mappo": "MAPPO", "ippo": "IPPO"}
#: The paper's task order (Table 1, then Table 2); other tasks follow alphabetically.
PAPER_TASKS = (
    "Reacher 2x1",
    "Ant 2x4",
    "Walker2d 2x3",
    "Hopper 3x1",
    "HalfCheetah 6x1",
    "ManySegmentSwimmer 8x2",
    "bane_vs_bane",
    "2c_vs_64zg",
    "3s5z",
    "5m_vs_6m",
    "corridor",
    "6h_vs_8z",
)
MAX_GRID_POINTS = 500


class ReportError(RuntimeError):
    """Nothing to report: no store, no experiment, no runs, or an invalid filter."""


class ReportWarning(UserWarning):
    """Runs left out of the report (missing tags, unfinished, duplicated seeds, missing metric)."""


@dataclass(frozen=True)
class RunInfo:
    """One MLflow run, reduced to what the report groups and selects by."""

    run_id: str
    name: str
    sharing: str
    task: str
    algorithm: str
    seed: str
    status: str
    start_time: int
    metric_keys: frozenset[str]


#: Which score of a run a statistic is over: its final score or the mean of its last N logged values.
ScoreKind = Literal["final", "last_n"]


@dataclass(frozen=True)
class SeedScore:
    """One run's scores: its seed, its final score and the mean of its last N logged values."""

    seed: str
    final: float
    last_n_mean: float


@dataclass
class Cell:
    """The scores of one (sharing, task, algorithm) group, one per seed in seed order, and their curves."""

    sharing: str
    task: str
    algorithm: str
    metric: str
    percent: bool
    runs: list[SeedScore] = field(default_factory=list)
    curves: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def n_seeds(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[str]:
        return [r.seed for r in self.runs]

    def scores(self, kind: ScoreKind = "final") -> np.ndarray:
        """One score per seed: the final scores or the last-N means."""
        return np.array([r.final if kind == "final" else r.last_n_mean for r in self.runs])

    def mean(self, kind: ScoreKind = "final") -> float:
        return float(np.mean(self.scores(kind)))

    def std(self, kind: ScoreKind = "final") -> float:
        """The population std over seeds."""
        return float(np.std(self.scores(kind)))

    def median(self, kind: ScoreKind = "final") -> float:
        return float(np.median(self.scores(kind)))

    def score(self, kind: ScoreKind = "final") -> float:
        """The statistic shown and compared: the median for win rates, the mean otherwise."""
        return self.median(kind) if self.percent else self.mean(kind)


@dataclass
class Report:
    """All cells, keyed by (sharing, task, algorithm), and the metric used for each task."""

    cells: dict[tuple[str, str, str], Cell]
    task_metrics: dict[str, str]
    description: str = ""
    requested_metric: str = DEFAULT_METRIC
    final_window: int = DEFAULT_FINAL_WINDOW

    @property
    def sharings(self) -> list[str]:
        return sorted({key[0] for key in self.cells}, key=sharing_order)

    @property
    def tasks(self) -> list[str]:
        return sorted({key[1] for key in self.cells}, key=task_order)

    @property
    def algorithms(self) -> list[str]:
        return sorted({key[2] for key in self.cells}, key=algorithm_order)


# ---------------------------------------------------------------------------------------- ordering


def sharing_order(sharing: str) -> tuple[int, str]:
    """FuPS, PaPS, NoPS, then any other network type alphabetically."""
    names = list(SHARING_NAMES)
    return (names.index(sharing), "") if sharing in names else (len(names), sharing)


def algorithm_order(algorithm: str) -> tuple[int, str]:
    """FP3O, HAPPO, MAPPO, IPPO, then any other algorithm alphabetically."""
    names = list(ALGORITHM_NAMES)
    return (names.index(algorithm), "") if algorithm in names else (len(names), algorithm)


def task_order(task: str) -> tuple[int, str]:
    """The paper's task order, then any other task alphabetically (case-insensitive)."""
    return (PAPER_TASKS.index(task), "") if task in PAPER_TASKS else (len(PAPER_TASKS), task.lower())


def seed_order(seed: str) -> tuple[int, int, str]:
    """Numeric seeds in numeric order (2 before 10), then any other label alphabetically."""
    return (0, int(seed), "") if seed.isdigit() else (1, 0, seed)


def display_sharing(sharing: str) -> str:
    return SHARING_NAMES.get(sharing, sharing)


def display_algorithm(algorithm: str) -> str:
    return ALGORITHM_NAMES.get(algorithm, algorithm.upper())


# ------------------------------------------------------------------------------------- reading runs


def check_store(tracking_uri: str) -> None:
    """Refuse to report from a local sqlite file that does not exist (MLflow would create it)."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        path = tracking_uri[len("sqlite:///") :]
        if path and path != ":memory:" and not Path(path).exists():
            raise ReportError(
                f"No MLflow store at {path!r} (--tracking_uri {tracking_uri}). Create runs with "
                "`fp3o fit --config …` or `fp3o sweep …` in this directory, or point --tracking_uri at the "
                "store they were logged to."
            )


def experiment_ids(client, names: Sequence[str]) -> list[str]:
    """The ids of the named, active experiments; a missing name is an error listing the known ones."""
    ids = []
    for name in names:
        experiment = client.get_experiment_by_name(name)
        if experiment is None or experiment.lifecycle_stage == "deleted":
            known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise ReportError(f"No MLflow experiment named {name!r} (known experiments: {known}).")
        ids.append(experiment.experiment_id)
    return ids


def search_runs(client, ids: Sequence[str], filter_string: str = "") -> list:
    """All active runs of the experiments matching the filter (one search, paged by MLflow)."""
    from mlflow.exceptions import MlflowException

    runs, token = [], None
    try:
        while True:
            page = client.search_runs(list(ids), filter_string, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs
    except MlflowException as error:
        raise ReportError(f"Invalid --filter {filter_string!r}: {error.message}") from None


def run_info(run) -> RunInfo | None:
    """The run's grouping tags and metric names, or None when a required tag is missing."""
    tags = run.data.tags
    if any(not tags.get(tag) for tag in REQUIRED_TAGS):
        return None
    return RunInfo(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id,
        sharing=tags["sharing"],
        task=tags["task"],
        algorithm=tags["algorithm"],
        seed=tags["seed"],
        status=run.info.status,
        start_time=run.info.start_time or 0,
        metric_keys=frozenset(run.data.metrics),
    )


def _warn_skipped(names: Iterable[str], reason: str) -> None:
    names = sorted(names)
    if names:
        warnings.warn(
            f"Skipped {len(names)} run(s) {reason}: {', '.join(names)}", ReportWarning, stacklevel=3
        )


def usable_runs(runs: Sequence, include_unfinished: bool = False) -> list[RunInfo]:
    """Tagged runs, finished unless asked otherwise, one per (sharing, task, algorithm, seed).

    Reruns of a seed keep the newest run (finished ones first). Each kind of skip warns once.
    """
    infos, untagged = [], []
    for run in runs:
        info = run_info(run)
        if info is None:
            untagged.append(run.info.run_name or run.info.run_id)
        else:
            infos.append(info)
    _warn_skipped(untagged, f"without the tags {', '.join(REQUIRED_TAGS)}")
    if not include_unfinished:
        _warn_skipped(
            (f"{i.name} ({i.status})" for i in infos if i.status != "FINISHED"),
            "that are not FINISHED (pass --include_unfinished to report them)",
        )
        infos = [i for i in infos if i.status == "FINISHED"]
    newest: dict[tuple[str, ...], RunInfo] = {}
    for info in sorted(infos, key=lambda i: (i.status == "FINISHED", i.start_time)):
        key = (info.sharing, info.task, info.algorithm, info.seed)
        newest[key] = info
    kept = {id(i) for i in newest.values()}
    _warn_skipped((i.name for i in infos if id(i) not in kept), "that repeat a seed (the newest run is kept)")
    return list(newest.values())


def choose_task_metrics(
    infos: Sequence[RunInfo], metric: str, fallback_metric: str | None, win_rate_metric: str | None
) -> dict[str, str]:
    """One metric per task, so that a row's cells and a task's curves compare like with like.

    The win rate if any run of the task logs it; else ``metric`` if every run logs it; else the
    fallback if any run logs it; else ``metric``.
    """
    by_task: dict[str, list[frozenset[str]]] = defaultdict(list)
    for info in infos:
        by_task[info.task].append(info.metric_keys)
    chosen = {}
    for task, keys in by_task.items():
        if win_rate_metric and any(win_rate_metric in k for k in keys):
            chosen[task] = win_rate_metric
        elif all(metric in k for k in keys):
            chosen[task] = metric
        elif fallback_metric and any(fallback_metric in k for k in keys):
            partial = sum(metric in k for k in keys)
            if partial:
                warnings.warn(
                    f"Only {partial} of {len(keys)} runs of task {task!r} log {metric}; "
                    f"reporting {fallback_metric} for this task instead.",
                    ReportWarning,
                    stacklevel=2,
                )
            chosen[task] = fallback_metric
        else:
            chosen[task] = metric
    return chosen


def latest_per_step(history: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """MLflow metrics as increasing steps and values, the latest value (by timestamp) of a repeated step."""
    last = {m.step: m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))}
    return np.array(list(last), dtype=float), np.array(list(last.values()), dtype=float)


def metric_curve(client, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The run's metric history as increasing steps and values (the latest value per step)."""
    return latest_per_step(client.get_metric_history(run_id, key))


def last_n_mean(values: np.ndarray, n: int) -> float:
    """The mean of the last ``n`` values (of all of them when there are fewer)."""
    return float(np.mean(values[-n:]))


# ----------------------------------------------------------------------------------------- building


def build_report(
    tracking_uri: str = DEFAULT_TRACKING_URI,
    experiments: Sequence[str] = (DEFAULT_EXPERIMENT,),
    filter_string: str | None = None,
    metric: str = DEFAULT_METRIC,
    fallback_metric: str | None = DEFAULT_FALLBACK_METRIC,
    win_rate_metric: str | None = DEFAULT_WIN_RATE_METRIC,
    include_unfinished: bool = False,
    final_window: int = DEFAULT_FINAL_WINDOW,
    description: str | None = None,
) -> Report:
    """Read the runs and compute every cell's final scores, last-``final_window`` means and learning
    curves. ``description`` says which runs these are (default: the experiments, store and filter).

    Raises ``ReportError`` when there is nothing to report, and warns (``ReportWarning``) about
    skipped runs.
    """
    from mlflow import MlflowClient

    if final_window < 1:
        raise ReportError(f"--final_window {final_window}: give a positive number of logged values, e.g. 10.")
    check_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    searched = f"experiment(s) {', '.join(experiments)} at {tracking_uri}" + (
        f" with filter {filter_string!r}" if filter_string else ""
    )
    runs = search_runs(client, experiment_ids(client, experiments), filter_string or "")
    if not runs:
        raise ReportError(f"No runs found in {searched}. {_HOW_TO_CREATE_RUNS}")
    infos = usable_runs(runs, include_unfinished)
    task_metrics = choose_task_metrics(infos, metric, fallback_metric, win_rate_metric)
    _warn_skipped(
        (i.name for i in infos if task_metrics[i.task] not in i.metric_keys),
        "without the metric reported for their task",
    )
    reported = [i for i in infos if task_metrics[i.task] in i.metric_keys]
    cells = _collect_cells(client, reported, task_metrics, win_rate_metric, final_window)
    if not cells:
        raise ReportError(f"None of the {len(runs)} runs found in {searched} can be reported (see warnings).")
    used = {task: m for task, m in task_metrics.items() if any(k[1] == task for k in cells)}
    return Report(cells, used, description or searched, metric, final_window)


def _collect_cells(
    client,
    infos: Sequence[RunInfo],
    task_metrics: dict[str, str],
    win_rate_metric: str | None,
    final_window: int,
) -> dict[tuple[str, str, str], Cell]:
    cells: dict[tuple[str, str, str], Cell] = {}
    for info in sorted(infos, key=lambda i: (i.sharing, i.task, i.algorithm, seed_order(i.seed))):
        key = (info.sharing, info.task, info.algorithm)
        used = task_metrics[info.task]
        percent = used == win_rate_metric
        steps, values = metric_curve(client, info.run_id, used)
        if not len(steps):
            continue
        values = values * WIN_RATE_SCALE if percent else values
        cell = cells.setdefault(key, Cell(*key, metric=used, percent=percent))
        cell.runs.append(SeedScore(info.seed, float(values[-1]), last_n_mean(values, final_window)))
        cell.curves.append((steps, values))
    return cells


_HOW_TO_CREATE_RUNS = (
    "Create runs with `fp3o fit --config configs/…yaml` (one run) or `fp3o sweep --config … --seeds 0 1 2 "
    "--grid model.algorithm=fp3o,happo,mappo,ippo` (a multi-seed sweep), or check --tracking_uri, "
    "--experiment and --filter."
)


# ------------------------------------------------------------------------------------------- tables


def metric_label(metric: str, percent: bool) -> str:
    return f"{metric} (%)" if percent else metric


def format_cell(cell: Cell | None, kind: ScoreKind, bold: bool, show_n: bool) -> str:
    """``1234.5 ± 67.8``, the score in bold when it is the row's best, ``(n=3)`` when asked."""
    if cell is None:
        return "–"
    score = f"{cell.score(kind):.1f}"
    text = f"{f'**{score}**' if bold else score} ± {cell.std(kind):.1f}"
    return f"{text} (n={cell.n_seeds})" if show_n else text


def sections(report: Report) -> list[tuple[str, list[str]]]:
    """The tasks grouped by metric, one table each: the requested metric, other metrics, win rates."""
    groups: dict[str, list[str]] = defaultdict(list)
    for task in report.tasks:
        groups[report.task_metrics[task]].append(task)
    order = sorted(groups, key=lambda m: (_section_percent(report, groups[m]), m != report.requested_metric))
    return [(m, groups[m]) for m in order]


def _section_percent(report: Report, tasks: Sequence[str]) -> bool:
    return any(c.percent for k, c in report.cells.items() if k[1] in tasks)


def section_rows(report: Report, tasks: Sequence[str], kind: ScoreKind = "final") -> list[list[str]]:
    """Header and rows of one table: network type × task, one column per algorithm, cells over the
    seeds' final scores or last-N means."""
    algorithms = [a for a in report.algorithms if any(k[2] == a and k[1] in tasks for k in report.cells)]
    cells = [c for k, c in report.cells.items() if k[1] in tasks]
    show_n = len({c.n_seeds for c in cells}) > 1
    rows = [["Network", "Task", *map(display_algorithm, algorithms)]]
    for sharing in report.sharings:
        first = True
        for task in tasks:
            row_cells = [report.cells.get((sharing, task, a)) for a in algorithms]
            if not any(row_cells):
                continue
            best = max(round(c.score(kind), 1) for c in row_cells if c)
            texts = [
                format_cell(c, kind, c is not None and round(c.score(kind), 1) == best, show_n)
                for c in row_cells
            ]
            rows.append([display_sharing(sharing) if first else "", task, *texts])
            first = False
    return rows


def section_caption(report: Report, metric: str, tasks: Sequence[str], kind: ScoreKind = "final") -> str:
    """What the section's table shows, e.g. ``Mean final `eval/return_mean` ± std over 3 seed(s)``."""
    cells = [c for k, c in report.cells.items() if k[1] in tasks]
    percent = _section_percent(report, tasks)
    seeds = {c.n_seeds for c in cells}
    over = f"{seeds.pop()} seed(s)" if len(seeds) == 1 else "seeds (n per cell)"
    statistic = "Median" if percent else "Mean"
    score = "final" if kind == "final" else f"last-{report.final_window}"
    quantity = f"win rate (%, `{metric}`)" if percent else f"`{metric}`"
    what = f"{statistic} {score} {quantity}"
    if kind == "last_n":
        what += f" (each run's mean of its last {report.final_window} logged values)"
    what += f" ± std over {over}"
    if metric != report.requested_metric and not percent:
        what += f" (fallback: not every run logs `{report.requested_metric}`)"
    return f"{what}; best of each row in bold."


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with padded columns, readable as plain text too."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), separator, *map(line, rows[1:])])


def format_report(report: Report) -> str:
    """The Markdown text of ``table.md``: per metric, a captioned table of the final scores and one of
    the last-N means."""
    parts = [
        f"# FP3O results\n\nRuns: {report.description}. The final score of a run is the last "
        "logged value of the metric (highest frame count); below each table of final scores, the same "
        f"over each run's mean of its last {report.final_window} logged values, which depends less on "
        "where a run stopped. std is the population std over seeds.\n"
    ]
    for metric, tasks in sections(report):
        for kind in ("final", "last_n"):
            caption = section_caption(report, metric, tasks, kind)
            parts.append(f"{caption}\n\n{markdown_table(section_rows(report, tasks, kind))}\n")
    return "\n".join(parts)


def write_csv(report: Report, path: Path) -> None:
    """One line per cell: sharing, task, algorithm, mean, std, median of the final scores, n_seeds,
    metric (win rates in %), and the mean and std over seeds of the last-N means."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
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
        )
        for sharing in report.sharings:
            for task in report.tasks:
                for algorithm in report.algorithms:
                    cell = report.cells.get((sharing, task, algorithm))
                    if cell:
                        writer.writerow(
                            [
                                sharing,
                                task,
                                algorithm,
                                cell.mean(),
                                cell.std(),
                                cell.median(),
                                cell.n_seeds,
                                metric_label(cell.metric, cell.percent),
                                cell.mean("last_n"),
                                cell.std("last_n"),
                            ]
                        )


# ------------------------------------------------------------------------------------------ figures


def align_curves(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate seeds onto a common grid of frames (where all seeds have data); rows are seeds."""
    low = max(steps[0] for steps, _ in curves)
    high = min(steps[-1] for steps, _ in curves)
    grid = np.unique(np.concatenate([steps[(steps >= low) & (steps <= high)] for steps, _ in curves]))
    if len(grid) > MAX_GRID_POINTS:
        grid = np.linspace(low, high, MAX_GRID_POINTS)
    if not len(grid):  # seeds' frame ranges do not overlap: fall back to the longest-starting seed's end
        grid = np.array([high])
    return grid, np.stack([np.interp(grid, steps, values) for steps, values in curves])


def figure_name(task: str) -> str:
    return f"curves_{re.sub(r'[^A-Za-z0-9._-]+', '_', task)}.png"


def plot_task(report: Report, task: str, path: Path) -> None:
    """One subplot per network type, one line per algorithm: mean over seeds, shaded ± 1 std."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sharings = [s for s in report.sharings if any(k[:2] == (s, task) for k in report.cells)]
    fig = Figure(figsize=(max(6.0, 4.5 * len(sharings)), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sharings), sharey=True, squeeze=False)[0]
    colors = {a: f"C{i}" for i, a in enumerate(report.algorithms)}
    metric = report.task_metrics[task]
    for ax, sharing in zip(axes, sharings, strict=True):
        for algorithm in report.algorithms:
            cell = report.cells.get((sharing, task, algorithm))
            if cell is None:
                continue
            grid, values = align_curves(cell.curves)
            mean, std = values.mean(axis=0), values.std(axis=0)
            label = f"{display_algorithm(algorithm)} (n={cell.n_seeds})"
            marker = "o" if len(grid) == 1 else None  # a lone point would not show as a line
            ax.plot(grid, mean, color=colors[algorithm], label=label, marker=marker)
            ax.fill_between(grid, mean - std, mean + std, color=colors[algorithm], alpha=0.2, linewidth=0)
        ax.set_title(display_sharing(sharing))
        ax.set_xlabel("environment frames")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    percent = any(c.percent for k, c in report.cells.items() if k[1] == task)
    axes[0].set_ylabel(metric_label(metric, percent))
    fig.suptitle(f"{task}\nmean over seeds, shaded ± 1 std", fontsize="medium")  # long task labels
    fig.savefig(path, dpi=110)


def plot_curves(report: Report, out: Path) -> list[Path]:
    """Write ``curves_<task>.png`` for every task; returns the paths."""
    paths = []
    for task in report.tasks:
        path = Path(out) / figure_name(task)
        plot_task(report, task, path)
        paths.append(path)
    return paths


def write_report(report: Report, out: Path | str) -> list[Path]:
    """Write ``table.md``, ``table.csv`` and the curve figures to ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(format_report(report))
    write_csv(report, out / "table.csv")
    return [out / "table.md", out / "table.csv", *plot_curves(report, out)]


# ---------------------------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fp3o report",
        description="Paper-style tables (rows: network type × task, columns: algorithms, cells: final score "
        "mean ± std over seeds, or median win rate ± std, then the same over each run's last-N mean) and "
        "learning curves from the MLflow runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tracking_uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking URI of the runs.")
    p.add_argument(
        "--experiment",
        nargs="+",
        default=[DEFAULT_EXPERIMENT],
        help="MLflow experiment name(s) to read runs from.",
    )
    p.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.sweep = 'paper'\".")
    p.add_argument(
        "--metric",
        default=DEFAULT_METRIC,
        help="Metric whose last logged value (highest frame step) is a run's final score.",
    )
    p.add_argument(
        "--final_window",
        type=int,
        default=DEFAULT_FINAL_WINDOW,
        metavar="N",
        help="The second table's score of a run: the mean of its last N logged values of the metric "
        "(all of them if it has fewer).",
    )
    p.add_argument(
        "--fallback_metric",
        default=DEFAULT_FALLBACK_METRIC,
        help="Metric reported for a task when some of its runs lack --metric ('' for none).",
    )
    p.add_argument(
        "--win_rate_metric",
        default=DEFAULT_WIN_RATE_METRIC,
        help="Win-rate metric (a fraction); tasks logging it report the median win rate in %% "
        "('' to disable).",
    )
    p.add_argument(
        "--include_unfinished",
        action="store_true",
        help="Also report runs that are not FINISHED (running, failed or killed).",
    )
    p.add_argument(
        "--description",
        metavar="TEXT",
        help="Which runs these are, for table.md's 'Runs:' line (default: the experiments, tracking URI "
        "and filter searched).",
    )
    p.add_argument(
        "--out",
        default="reports",
        help="Directory for table.md, table.csv, curves_<task>.png and the rliable statistics "
        "(stats.md, stats.csv, profiles.csv, aggregates_/improvement_/profiles_<network type>.png).",
    )
    p.add_argument(
        "--reference_scores",
        metavar="CSV",
        help="Normalise each task's scores by the given reference scores, a CSV with the header "
        "task,low,high (default: by the min and max over all runs of the task).",
    )
    p.add_argument(
        "--improver",
        default="fp3o",
        help="The algorithm whose probability of improving on each other algorithm is reported.",
    )
    p.add_argument("--reps", type=int, default=2000, help="Bootstrap resamples of the confidence intervals.")
    return p


def main(argv: list[str] | None = None) -> int:
    """``fp3o report``: print the tables and statistics, write them and the figures to ``--out``; returns
    the exit code."""
    args = parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReportWarning)
        try:
            report = build_report(
                args.tracking_uri,
                args.experiment,
                args.filter,
                args.metric,
                args.fallback_metric or None,
                args.win_rate_metric or None,
                args.include_unfinished,
                args.final_window,
                args.description,
            )
            stats = statistics(report, args)
        except ReportError as error:
            _print_warnings(caught)
            print(f"fp3o report: error: {error}", file=sys.stderr)
            return 1
    _print_warnings(caught)
    print(format_report(report))
    paths = write_report(report, args.out)
    if stats is not None:
        from fp3o_lightning import report_stats

        print(report_stats.format_stats(stats, normalisation(args)))
        paths += report_stats.write_stats(stats, args.out, normalisation(args))
    for path in paths:
        print(f"wrote {path}")
    return 0


def normalisation(args: argparse.Namespace) -> str:
    return (
        f"by the reference scores in {args.reference_scores}"
        if args.reference_scores
        else "min–max over its runs"
    )


def statistics(report: Report, args: argparse.Namespace) -> list | None:
    """The rliable statistics (``report_stats``), or None with a note when rliable is not installed."""
    from fp3o_lightning import report_stats

    if importlib.util.find_spec("rliable") is None:  # rliable comes with the ray extra
        print(
            "fp3o report: note: no IQM/bootstrap statistics: pip install -e '.[ray]' (rliable)",
            file=sys.stderr,
        )
        return None
    if args.reps < 1:
        raise ReportError(f"--reps {args.reps}: give a positive number of bootstrap resamples, e.g. 2000.")
    references = report_stats.read_references(args.reference_scores) if args.reference_scores else None
    return report_stats.compute_stats(report, references, args.improver, args.reps)


def _print_warnings(caught: Iterable[warnings.WarningMessage]) -> None:
    for w in caught:
        if issubclass(w.category, ReportWarning):
            print(f"fp3o report: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


if __name__ == "__main__":
    sys.exit(main())
