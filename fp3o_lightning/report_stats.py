"""Aggregate scores across tasks and seeds with ``rliable`` (Agarwal et al., 2021), for ``fp3o report``.

For each network type, the final scores of every (task, algorithm) are normalised per task, to
``(score - low) / (high - low)`` with ``low``/``high`` the min and max over all runs of the task
(all network types and algorithms) or given reference scores, and arranged as a runs × tasks matrix
per algorithm, over the tasks every algorithm of the matrices has (``complete_block``). Each algorithm
keeps as many seeds as it has on each of these tasks (the fewest over its tasks; algorithms may differ);
``stats.md`` lists every run left out, and why. From these, with stratified bootstrap 95% confidence
intervals:

- the interquartile mean (IQM) and the mean of the normalised scores;
- the probability that the improver (FP3O) beats each other algorithm on a random task;
- the performance profile: the fraction of runs with a normalised score above each threshold.

Written as ``stats.md``, ``stats.csv``, ``profiles.csv`` and, per network type,
``aggregates_<type>.png``, ``improvement_<type>.png`` and ``profiles_<type>.png``.
"""

from __future__ import annotations

import csv
import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fp3o_lightning.report import (
    Report,
    ReportError,
    ReportWarning,
    algorithm_order,
    display_algorithm,
    display_sharing,
    markdown_table,
    task_order,
)

DEFAULT_REPS = 2000
CONFIDENCE = 0.95
TAUS = np.linspace(0.0, 1.0, 21)
AGGREGATES = ("IQM", "Mean")

#: (low, high) of each task's normalisation.
Bounds = dict[str, tuple[float, float]]


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its confidence interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class LeftOut:
    """A run the aggregate statistics leave out, and why."""

    task: str
    algorithm: str
    seed: str
    reason: str

    def __str__(self) -> str:
        return f"{self.task}, {display_algorithm(self.algorithm)}, seed {self.seed}: {self.reason}"


@dataclass
class SharingStats:
    """The aggregate statistics of one network type's algorithms over its common tasks."""

    sharing: str
    tasks: list[str]
    seeds: dict[str, int]  # algorithm → seeds per task in its matrix
    left_out: list[LeftOut]
    aggregates: dict[str, dict[str, Estimate]]  # algorithm → IQM/Mean
    improvement: dict[str, Estimate]  # baseline → P(improver > baseline)
    profiles: dict[str, tuple[np.ndarray, np.ndarray]]  # algorithm → (fractions, 2 × taus CI)
    improver: str


# ----------------------------------------------------------------------------------- normalisation


def read_references(path: str | Path) -> Bounds:
    """Reference scores from a CSV with the columns ``task,low,high`` (e.g. random and expert scores)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"task", "low", "high"} <= set(rows[0]):
        raise ReportError(f"--reference_scores {path}: expected a CSV with the header task,low,high")
    bounds = {row["task"]: (float(row["low"]), float(row["high"])) for row in rows}
    same = [task for task, (low, high) in bounds.items() if high == low]
    if same:
        raise ReportError(f"--reference_scores {path}: low equals high for {', '.join(same)}")
    return bounds


def task_bounds(report: Report, references: Bounds | None = None) -> Bounds:
    """Each task's (low, high): the reference scores if given (all tasks needed), else min–max of its runs."""
    if references is not None:
        missing = [task for task in report.tasks if task not in references]
        if missing:
            raise ReportError(
                f"--reference_scores has no row for {', '.join(missing)}; add 'task,low,high' rows for them "
                "or leave out --reference_scores to normalise by each task's min and max."
            )
        return {task: references[task] for task in report.tasks}
    bounds = {}
    for task in report.tasks:
        finals = np.concatenate([c.scores() for k, c in report.cells.items() if k[1] == task])
        bounds[task] = (float(finals.min()), float(finals.max()))
    return bounds


def normalise(scores: np.ndarray, low: float, high: float) -> np.ndarray:
    """Min–max normalisation; a task whose runs all score the same maps to 0."""
    return (scores - low) / (high - low) if high != low else np.zeros_like(scores)


def complete_block(report: Report, sharing: str) -> tuple[list[str], list[str]]:
    """The algorithms and tasks of the largest complete block of this network type's cells (every
    algorithm has every task; ties: more algorithms), since rliable's matrices cannot have holes."""
    have = {(k[1], k[2]) for k in report.cells if k[0] == sharing}
    algorithms = [a for a in report.algorithms if any(h[1] == a for h in have)]
    best: tuple[list[str], list[str]] = ([], [])
    for size in range(len(algorithms), 0, -1):
        for subset in itertools.combinations(algorithms, size):
            tasks = [t for t in report.tasks if all((t, a) in have for a in subset)]
            if len(tasks) * size > len(best[0]) * len(best[1]):
                best = (list(subset), tasks)
    return best


def _outside_block_reason(
    have: set[tuple[str, str]], task: str, algorithm: str, tasks: Sequence[str], algorithms: Sequence[str]
) -> str:
    """Why the cell (task, algorithm) is outside the complete block of ``tasks`` × ``algorithms``."""
    if task in tasks:
        missing = [t for t in tasks if (t, algorithm) not in have]
        return f"{display_algorithm(algorithm)} has no run on {', '.join(missing)}"
    lacking = [display_algorithm(a) for a in algorithms if (task, a) not in have]
    return f"no {', '.join(lacking)} run on {task}"


def score_matrices(
    report: Report, sharing: str, bounds: Bounds
) -> tuple[list[str], dict[str, np.ndarray], list[LeftOut]]:
    """The tasks used, each algorithm's runs × tasks matrix of normalised scores over ``complete_block``
    (its first seeds, as many as it has on each task: rliable's matrices cannot have holes), and the
    runs left out (warned about)."""
    algorithms, tasks = complete_block(report, sharing)
    have = {(k[1], k[2]) for k in report.cells if k[0] == sharing}
    block_rule = "; the statistics need every algorithm on every task"
    left_out = [
        LeftOut(t, a, seed, _outside_block_reason(have, t, a, tasks, algorithms) + block_rule)
        for t, a in sorted(
            have - set(itertools.product(tasks, algorithms)),
            key=lambda c: (task_order(c[0]), algorithm_order(c[1])),
        )
        for seed in report.cells[(sharing, t, a)].seeds
    ]
    matrices = {}
    for a in algorithms:
        cells = [report.cells[(sharing, t, a)] for t in tasks]
        fewest = min(cells, key=lambda c: c.n_seeds)
        reason = (
            f"{display_algorithm(a)} has {fewest.n_seeds} seed(s) on {fewest.task}; an algorithm uses as "
            "many seeds on every task"
        )
        left_out += [LeftOut(c.task, a, seed, reason) for c in cells for seed in c.seeds[fewest.n_seeds :]]
        matrices[a] = np.stack(
            [normalise(c.scores()[: fewest.n_seeds], *bounds[c.task]) for c in cells], axis=1
        )
    if left_out:
        warnings.warn(
            f"{display_sharing(sharing)}: the aggregate statistics leave out {len(left_out)} run(s): "
            + "; ".join(map(str, left_out)),
            ReportWarning,
            stacklevel=2,
        )
    return tasks, matrices, left_out


# ------------------------------------------------------------------------------------- statistics


def _estimates(
    score_dict: Mapping[str, object], func, reps: int, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from rliable import library as rly

    with warnings.catch_warnings():  # arch's notice that rliable's random_state argument will change
        warnings.filterwarnings("ignore", "random_state is deprecated", FutureWarning)
        return rly.get_interval_estimates(
            score_dict,
            func,
            reps=reps,
            confidence_interval_size=CONFIDENCE,
            random_state=np.random.RandomState(seed),
        )


def sharing_stats(
    report: Report, sharing: str, bounds: Bounds, improver: str, reps: int, seed: int
) -> SharingStats:
    """IQM, mean, probabilities of improvement and performance profiles of one network type."""
    from rliable import library as rly
    from rliable import metrics

    tasks, matrices, left_out = score_matrices(report, sharing, bounds)
    points, intervals = _estimates(
        matrices, lambda s: np.array([metrics.aggregate_iqm(s), metrics.aggregate_mean(s)]), reps, seed
    )
    aggregates = {
        a: {
            name: Estimate(float(points[a][i]), *map(float, intervals[a][:, i]))
            for i, name in enumerate(AGGREGATES)
        }
        for a in matrices
    }
    improvement = {}
    if improver in matrices and len(matrices) > 1:
        pairs = {b: [matrices[improver], matrices[b]] for b in matrices if b != improver}
        p_points, p_intervals = _estimates(pairs, metrics.probability_of_improvement, reps, seed)
        improvement = {b: Estimate(float(p_points[b]), *p_intervals[b].ravel()) for b in pairs}
    profile_points, profile_intervals = _estimates(
        matrices, lambda s: rly.score_distributions(s, TAUS), reps, seed
    )
    profiles = {a: (profile_points[a], profile_intervals[a]) for a in matrices}
    seeds = {a: m.shape[0] for a, m in matrices.items()}
    return SharingStats(sharing, tasks, seeds, left_out, aggregates, improvement, profiles, improver)


def compute_stats(
    report: Report,
    references: Bounds | None = None,
    improver: str = "fp3o",
    reps: int = DEFAULT_REPS,
    seed: int = 0,
) -> list[SharingStats]:
    """The statistics of every network type."""
    if improver not in report.algorithms:
        warnings.warn(
            f"No probability of improvement: --improver {improver} has no runs here (algorithms: "
            f"{', '.join(report.algorithms)}).",
            ReportWarning,
            stacklevel=2,
        )
    bounds = task_bounds(report, references)
    return [sharing_stats(report, s, bounds, improver, reps, seed) for s in report.sharings]


# ------------------------------------------------------------------------------------------ output


def stats_rows(stats: SharingStats) -> list[list[str]]:
    """Header and one row per algorithm: seeds per task, IQM and mean [95% CI], P(improver > algorithm)
    [95% CI]."""
    improver = display_algorithm(stats.improver)
    header = ["Algorithm", "Seeds", *(f"{name} [95% CI]" for name in AGGREGATES)]
    if stats.improvement:
        header.append(f"P({improver} > algorithm) [95% CI]")
    rows = [header]
    for algorithm, estimates in stats.aggregates.items():
        row = [
            display_algorithm(algorithm),
            str(stats.seeds[algorithm]),
            *(str(estimates[name]) for name in AGGREGATES),
        ]
        if stats.improvement:
            row.append(str(stats.improvement[algorithm]) if algorithm in stats.improvement else "–")
        rows.append(row)
    return rows


def format_stats(stats: Sequence[SharingStats], normalisation: str) -> str:
    """The Markdown text of ``stats.md``: per network type, its tasks, a table and the runs left out."""
    parts = [
        "# Aggregate statistics (rliable)\n\n"
        f"Final scores normalised per task ({normalisation}); interquartile mean (IQM) and mean over all "
        f"runs and tasks, and the probability of improvement, with {CONFIDENCE:.0%} stratified bootstrap "
        "confidence intervals (Agarwal et al., 2021). Each algorithm uses the same number of seeds on every "
        "task (Seeds: the fewest it has on any, its first seeds on each); the runs left out are listed below "
        "each table.\n"
    ]
    for s in stats:
        left_out = "".join(f"\n- {run}" for run in s.left_out) or " none."
        parts.append(
            f"## {display_sharing(s.sharing)}: {len(s.tasks)} task(s)\n\nTasks: {', '.join(s.tasks)}.\n\n"
            f"{markdown_table(stats_rows(s))}\n\nRuns left out ({len(s.left_out)}):{left_out}\n"
        )
    return "\n".join(parts)


def write_stats_csv(stats: Sequence[SharingStats], path: Path) -> None:
    """One line per (network type, algorithm, statistic): estimate, CI bounds, tasks and the algorithm's
    seeds per task (for P(improver > algorithm), the baseline's)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["sharing", "algorithm", "statistic", "estimate", "ci_low", "ci_high", "tasks", "seeds"]
        )
        for s in stats:
            rows = [(a, name, e) for a, estimates in s.aggregates.items() for name, e in estimates.items()]
            rows += [(b, f"P({s.improver} > algorithm)", e) for b, e in s.improvement.items()]
            for algorithm, name, e in rows:
                writer.writerow(
                    [s.sharing, algorithm, name, e.value, e.low, e.high, len(s.tasks), s.seeds[algorithm]]
                )


def write_profiles_csv(stats: Sequence[SharingStats], path: Path) -> None:
    """The performance profiles: fraction of runs with a normalised score above each threshold tau."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sharing", "algorithm", "tau", "fraction", "ci_low", "ci_high"])
        for s in stats:
            for algorithm, (fractions, ci) in s.profiles.items():
                for i, tau in enumerate(TAUS):
                    writer.writerow([s.sharing, algorithm, f"{tau:g}", fractions[i], ci[0, i], ci[1, i]])


def plot_stats(s: SharingStats, out: Path) -> list[Path]:
    """``aggregates_<type>.png``, ``profiles_<type>.png`` and (with baselines) ``improvement_<type>.png``."""
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    names = {a: display_algorithm(a) for a in s.aggregates}
    colors = {names[a]: f"C{i}" for i, a in enumerate(s.aggregates)}
    figures = []
    fig, _ = plot_utils.plot_interval_estimates(
        {names[a]: np.array([e[n].value for n in AGGREGATES]) for a, e in s.aggregates.items()},
        {
            names[a]: np.array([[e[n].low for n in AGGREGATES], [e[n].high for n in AGGREGATES]])
            for a, e in s.aggregates.items()
        },
        metric_names=list(AGGREGATES),
        algorithms=list(names.values()),
        colors=colors,
        xlabel="Normalised score",
        row_height=0.5,
        xlabel_y_coordinate=-0.25,
    )
    figures.append(("aggregates", fig))
    fig, ax = plt.subplots(figsize=(5, 3.6), layout="constrained")
    plot_utils.plot_performance_profiles(
        {names[a]: p for a, (p, _) in s.profiles.items()},
        TAUS,
        performance_profile_cis={names[a]: ci for a, (_, ci) in s.profiles.items()},
        colors=colors,
        xlabel=r"Normalised score ($\tau$)",
        ax=ax,
    )
    ax.legend(fontsize="small")
    figures.append(("profiles", fig))
    if s.improvement:
        pairs = {f"{names[s.improver]},{names[b]}": e for b, e in s.improvement.items()}
        fig, _ = plt.subplots(figsize=(4.5, 0.6 + 0.5 * len(pairs)), layout="constrained")
        plot_utils.plot_probability_of_improvement(
            {k: e.value for k, e in pairs.items()},
            {k: np.array([e.low, e.high]) for k, e in pairs.items()},
            ax=fig.axes[0],
        )
        figures.append(("improvement", fig))
    paths = []
    for name, fig in figures:
        fig.suptitle(display_sharing(s.sharing), y=1.3 if name == "aggregates" else None, fontsize="x-large")
        paths.append(out / f"{name}_{s.sharing}.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


def write_stats(stats: Sequence[SharingStats], out: Path | str, normalisation: str) -> list[Path]:
    """Write ``stats.md``, ``stats.csv``, ``profiles.csv`` and the figures to ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.md").write_text(format_stats(stats, normalisation))
    write_stats_csv(stats, out / "stats.csv")
    write_profiles_csv(stats, out / "profiles.csv")
    return [
        out / "stats.md",
        out / "stats.csv",
        out / "profiles.csv",
        *(p for s in stats for p in plot_stats(s, out)),
    ]
