"""How steady a recorded run's evaluations are late in training, from its ``metrics.csv``.

    python results/stability.py results/runs/hopper3x1official-obs_nops_*  [--after 6000000]

One markdown row per run directory (``results/runs/<run>/`` or ``results/experiments/<run>/``), over the
evaluations after ``--after`` frames: the share of evaluations whose episodes all agree
(``eval/return_std`` under ``--agree``; on Hopper, an evaluation in which no episode fell), the std of the
evaluation returns between evaluations (sample std), their mean, and the mean training episode return
over the last ``--last`` frames.
``--plot FILE`` draws the runs' evaluation curves into one figure, the span after ``--after`` shaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from fp3o_lightning.report import latest_per_step


def curve(metrics: pd.DataFrame, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The frames and values of ``key``, the latest logged one where a resumed run logged a frame twice."""
    return latest_per_step(metrics[metrics["key"] == key].rename(columns={"frames": "step"}).itertuples())


def stability(directory: Path, after: int, agree: float, last: int) -> dict[str, float]:
    """The run's late-training statistics (see the module's doc)."""
    metrics = pd.read_csv(directory / "metrics.csv")
    frames, returns = curve(metrics, "eval/return_mean")
    stds = curve(metrics, "eval/return_std")[1]
    late = frames > after
    training_frames, training = curve(metrics, "train/episode_return")
    return {
        "evaluations": int(late.sum()),
        "agreeing": float((stds[late] < agree).mean()),
        "std_between": float(returns[late].std(ddof=1)),
        "mean": float(returns[late].mean()),
        "training_return": float(training[training_frames > training_frames.max() - last].mean()),
    }


def plot(directories: list[Path], after: int, path: Path) -> None:
    """Each run's ``eval/return_mean`` against frames, labelled with its directory's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.5))
    for directory in directories:
        frames, returns = curve(pd.read_csv(directory / "metrics.csv"), "eval/return_mean")
        axes.plot(frames, returns, linewidth=1, label=directory.name)
    axes.axvspan(after, axes.get_xlim()[1], color="0.92", zorder=0)
    axes.set(xlabel="environment frames", ylabel="evaluation return (mean of the episodes)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="recorded run directories")
    parser.add_argument("--after", type=int, default=6_000_000, help="frames before these are left out")
    parser.add_argument("--agree", type=float, default=50.0, help="eval/return_std under this: all agree")
    parser.add_argument("--last", type=int, default=2_000_000, help="frames of the training-return mean")
    parser.add_argument("--plot", type=Path, metavar="FILE", help="also draw the runs' evaluation curves")
    args = parser.parse_args()
    print("| run | evaluations | all episodes agree | std between evaluations | mean | training return |")
    print("|---|---|---|---|---|---|")
    for directory in args.runs:
        s = stability(directory, args.after, args.agree, args.last)
        print(
            f"| {directory.name} | {s['evaluations']} | {s['agreeing']:.0%} | {s['std_between']:.0f} | "
            f"{s['mean']:.0f} | {s['training_return']:.0f} |"
        )
    if args.plot is not None:
        plot(args.runs, args.after, args.plot)


if __name__ == "__main__":
    main()
