"""Soak test: a real ``fp3o fit`` for a wall-clock duration; checks that memory stays flat, the log clean.

Starts ``fp3o fit --config <config> --trainer.max_time DD:HH:MM:SS [extra fit args]`` in ``--out``
(so its ``mlflow.db``, ``mlartifacts/`` and ``checkpoints/`` land there), captures its stdout and
stderr to ``<out>/fit.log``, and samples its memory from ``/proc`` every few seconds into
``<out>/memory.csv`` (VmRSS and VmHWM of the process, and VmRSS summed over its process tree).
Afterwards it reads the run's MLflow metrics and prints a summary: throughput, returns, RSS over the
run, the RSS growth over the second half of training (least-squares slope) with a "memory flat"
verdict, the warnings and errors in the log, the exit code and the checkpoints; ``<out>/memory.png``
plots RSS over time. Exits non-zero when the training did::

    python benchmarks/soak.py --config configs/mamujoco/halfcheetah_6x1.yaml --minutes 30 --out /tmp/soak_hc
    python benchmarks/soak.py --config configs/mamujoco/manyagent_swimmer_8x2.yaml --minutes 10 \\
        --out /tmp/soak_swimmer -- --model.sharing paps

Arguments after ``--`` go to ``fp3o fit`` unchanged; it runs in ``--out``, so give paths in them
absolutely. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

FLAT_FRACTION = 0.02  # second-half growth below this fraction of the RSS counts as flat
LOG_KEYWORDS = ("Warning", "WARNING", "Error", "Traceback")
METRICS = ("train/frames", "train/iteration", "train/episode_return", "train/fps", "eval/return_mean")
# Python's warning format, "path/file.py:123: message", which Lightning's warnings keep without the category
WARNING_LINE = re.compile(r"^\S+\.py:\d+: ")
# a progress-bar redraw (tqdm's "Epoch 0:  12%|█▏ | 3/25 [...]", Rich's "Epoch 0/0  ━━╸  32/120 ...")
PROGRESS_BAR = re.compile(r"^\s*(Epoch \d+|Validation|Sanity Checking)\b")
BAR_TAIL = re.compile(r"/\S+\.py:\d+: |Traceback|\w*(Warning|WARNING|Error)\b")


@dataclass
class Sample:
    elapsed: float  # seconds since the child started
    rss: float  # MB, the fit process
    hwm: float  # MB, the fit process's peak RSS so far
    tree_rss: float  # MB, summed over the fit process and its descendants
    processes: int


def read_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process in MB (empty once it has gone)."""
    values: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) / 1024  # kB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return values


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from ``/proc/<pid>/task/*/children``."""
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as file:
                    stack.extend(int(child) for child in file.read().split())
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    return tree


def sample(pid: int, elapsed: float) -> Sample | None:
    status = read_status(pid)
    if "VmRSS" not in status:
        return None  # exited, or a zombie waiting to be reaped
    tree = process_tree(pid)
    tree_rss = status["VmRSS"] + sum(read_status(p).get("VmRSS", 0.0) for p in tree[1:])
    return Sample(elapsed, status["VmRSS"], status.get("VmHWM", 0.0), tree_rss, len(tree))


def max_time(minutes: float) -> str:
    """Lightning's ``DD:HH:MM:SS``."""
    seconds = round(minutes * 60)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    mins, seconds = divmod(seconds, 60)
    return f"{days:02d}:{hours:02d}:{mins:02d}:{seconds:02d}"


def fp3o_command() -> list[str]:
    """The ``fp3o`` script of this interpreter's environment, else the module."""
    script = os.path.join(os.path.dirname(sys.executable), "fp3o")
    if os.path.exists(script):
        return [script]
    found = shutil.which("fp3o")
    return [found] if found else [sys.executable, "-m", "fp3o_lightning.cli"]


def run_fit(
    command: list[str], out: str, deadline: float, interval: float
) -> tuple[int, list[Sample], float]:
    """Runs the fit, sampling its memory; returns the exit code, the samples and the start time (epoch s).

    SIGINT/SIGTERM to this script become a SIGTERM to the fit (which then stops cleanly after its
    current iteration); past ``deadline`` seconds it is sent SIGTERM, and SIGKILL 5 minutes later.
    """
    samples: list[Sample] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(os.path.join(out, "fit.log"), "wb") as log, open(os.path.join(out, "memory.csv"), "w") as mem:
        writer = csv.writer(mem)
        writer.writerow(["elapsed_s", "rss_mb", "tree_rss_mb", "hwm_mb", "processes"])
        started = time.time()
        child = subprocess.Popen(
            command, cwd=out, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )

        def stop(signum: int, frame: object) -> None:
            print(f"soak: signal {signum}, asking the fit to stop (SIGTERM)", file=sys.stderr, flush=True)
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        termed = killed = False
        try:
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=interval)  # first sample one interval in, once the program runs
                if child.poll() is not None:
                    break
                elapsed = time.time() - started
                current = sample(child.pid, elapsed)
                if current is not None:
                    samples.append(current)
                    writer.writerow(
                        [f"{current.elapsed:.1f}", f"{current.rss:.1f}", f"{current.tree_rss:.1f}"]
                        + [f"{current.hwm:.1f}", current.processes]
                    )
                    mem.flush()
                if elapsed > deadline and not termed:
                    print(f"soak: fit still running after {elapsed:.0f} s, sending SIGTERM", file=sys.stderr)
                    child.send_signal(signal.SIGTERM)
                    termed = True
                if elapsed > deadline + 300 and not killed:
                    print("soak: fit ignored SIGTERM for 5 minutes, sending SIGKILL", file=sys.stderr)
                    child.kill()
                    killed = True
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return child.returncode, samples, started


def mlflow_histories(out: str) -> tuple[object | None, dict[str, list], int]:
    """The newest run in ``<out>/mlflow.db`` and its metric histories (sorted by step), with the run count."""
    import mlflow

    path = os.path.join(out, "mlflow.db")
    if not os.path.exists(path):
        return None, {}, 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], order_by=["attributes.start_time DESC"])
    if not runs:
        return None, {}, 0
    run = runs[0]
    histories = {
        key: sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        for key in METRICS
    }
    return run, histories, len(runs)


def finite(values: list[float]) -> list[float]:
    return [v for v in values if not (math.isnan(v) or math.isinf(v))]


def rss_at(samples: list[Sample], elapsed: float) -> Sample | None:
    """The sample nearest ``elapsed``."""
    return min(samples, key=lambda s: abs(s.elapsed - elapsed)) if samples else None


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return sxy / sxx if sxx else 0.0


def scan_log(path: str) -> tuple[int, Counter]:
    """Lines of the log with a warning/error keyword or in Python's warning format, and their counts.

    Progress-bar redraws (``\\r``-separated on one line) are split apart and dropped, but for a message
    written straight after one (stderr shares the file).
    """
    with open(path, "rb") as file:
        text = file.read().decode("utf-8", errors="replace")
    hits: Counter = Counter()
    for segment in re.split(r"[\r\n]", text):  # each tqdm redraw is its own \r-separated segment
        if not segment.strip():
            continue
        if PROGRESS_BAR.search(segment):  # a redraw; keep only a message written onto its end
            tail = BAR_TAIL.search(segment)
            if tail is None:
                continue
            segment = segment[tail.start() :]
        if any(keyword in segment for keyword in LOG_KEYWORDS) or WARNING_LINE.search(segment):
            hits[segment.strip()] += 1
    return sum(hits.values()), hits


def plot(out: str, samples: list[Sample], window: tuple[float, float], half: float, title: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    minutes = [s.elapsed / 60 for s in samples]
    axes.plot(minutes, [s.rss for s in samples], label="VmRSS (fit process)")
    if any(s.processes > 1 for s in samples):
        axes.plot(minutes, [s.tree_rss for s in samples], label="VmRSS summed over process tree")
    axes.plot(minutes, [s.hwm for s in samples], linestyle=":", color="grey", label="VmHWM (peak)")
    axes.axvline(window[0] / 60, color="green", linestyle="--", linewidth=0.8, label="first iteration done")
    axes.axvspan(half / 60, window[1] / 60, color="orange", alpha=0.15, label="second half (slope)")
    axes.set_xlabel("minutes since start")
    axes.set_ylabel("MB")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path = os.path.join(out, "memory.png")
    figure.savefig(path)
    return path


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="fit config (repeatable)")
    parser.add_argument("--minutes", type=float, default=30, help="--trainer.max_time of the fit")
    parser.add_argument("--out", required=True, help="working directory of the fit and the soak's output")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument(
        "--grace-minutes", type=float, default=15, help="SIGTERM the fit this long past --minutes"
    )
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    command = fp3o_command() + ["fit"]
    for config in args.config:
        command += ["--config", os.path.abspath(config)]
    command += ["--trainer.max_time", max_time(args.minutes)] + extra
    print(f"soak: {' '.join(command)}\nsoak: in {out}, log {out}/fit.log", flush=True)

    deadline = (args.minutes + args.grace_minutes) * 60
    code, samples, started = run_fit(command, out, deadline, args.interval)
    duration = time.time() - started

    run, hist, run_count = mlflow_histories(out)
    count, hits = scan_log(os.path.join(out, "fit.log"))

    # the training window: first iteration logged -> last iteration logged (child lifetime if none)
    iterations = hist.get("train/iteration", [])
    if iterations:
        first_done = iterations[0].timestamp / 1000 - started
        last_done = iterations[-1].timestamp / 1000 - started
    else:
        first_done, last_done = 0.0, samples[-1].elapsed if samples else duration
    span = max(last_done - first_done, 0.0)
    stage = "training" if iterations else "the run (no iteration logged)"
    half = first_done + span / 2

    rows: list[tuple[str, str]] = []

    def row(name: str, value: str) -> None:
        rows.append((name, value))

    def last(key: str) -> float | None:
        values = finite([m.value for m in hist.get(key, [])])
        return values[-1] if values else None

    def first(key: str) -> float | None:
        values = finite([m.value for m in hist.get(key, [])])
        return values[0] if values else None

    def fmt(value: float | None, spec: str = ".1f") -> str:
        return "n/a" if value is None else format(value, spec)

    row("command", " ".join(os.path.basename(c) if i == 0 else c for i, c in enumerate(command)))
    row("exit code", str(code))
    row("duration", f"{duration / 60:.1f} min wall ({span / 60:.1f} min from iteration 1 to the last)")
    if run is None:
        row("MLflow run", f"none in {out}/mlflow.db")
    else:
        note = f" (newest of {run_count} runs in the store)" if run_count > 1 else ""
        row("MLflow run", f"{run.info.run_id} [{run.info.status}]{note}")
    row("iterations", fmt(last("train/iteration"), ".0f"))
    frames = last("train/frames")
    fps = finite([m.value for m in hist.get("train/fps", [])])
    fps_text = "n/a"
    if fps:
        steady = fps[1:] or fps
        mean, mean_steady = sum(fps) / len(fps), sum(steady) / len(steady)
        fps_text = f"{mean:.0f} (all iterations), {mean_steady:.0f} (from iteration 2)"
    row("frames", fmt(frames, ",.0f"))
    row("train fps (mean)", fps_text)
    if frames and duration:
        row("frames / wall s", f"{frames / duration:.0f} (whole run: start-up, evaluation, checkpoints)")
    if len(iterations) > 1 and span > 0:
        frames_hist = hist["train/frames"]
        rate = (frames_hist[-1].value - frames_hist[0].value) / span
        row("frames / s, training", f"{rate:.0f} (iteration 1 to the last, incl. logging and evaluation)")
    row("episode return", f"{fmt(first('train/episode_return'))} -> {fmt(last('train/episode_return'))}")
    evals = hist.get("eval/return_mean", [])
    steps = len({m.step for m in evals})
    evals_text = f"{len(evals)} evaluations" + (f", {steps} distinct step(s)" if steps < len(evals) else "")
    row(
        "eval return mean",
        f"{fmt(first('eval/return_mean'))} -> {fmt(last('eval/return_mean'))} ({evals_text})",
    )

    verdict = "no memory samples"
    if samples:
        tree = any(s.processes > 1 for s in samples)
        unit = "tree RSS" if tree else "RSS"

        def rss_text(point: Sample | None) -> str:
            if point is None:
                return "n/a"
            extra_text = f" (tree {point.tree_rss:.0f})" if tree else ""
            return f"{point.rss:.0f} MB{extra_text} at {point.elapsed / 60:.1f} min"

        row("RSS after iteration 1", rss_text(rss_at(samples, first_done)) if iterations else "n/a")
        for fraction in (0.25, 0.5, 0.75, 1.0):
            row(f"RSS at {fraction:.0%} of {stage}", rss_text(rss_at(samples, first_done + fraction * span)))
        row("RSS at exit (last sample)", rss_text(samples[-1]))
        row("peak RSS (VmHWM)", f"{max(s.hwm for s in samples):.0f} MB")
        if tree:
            row("peak tree RSS (sampled)", f"{max(s.tree_rss for s in samples):.0f} MB")

        second = [(s.elapsed, s.tree_rss) for s in samples if half <= s.elapsed <= last_done]
        if len(second) >= 3 and last_done > half:
            per_second = slope(second)
            growth = per_second * (last_done - half)
            level = sum(y for _, y in second) / len(second)
            threshold = FLAT_FRACTION * level
            row(
                f"{unit} growth, 2nd half",
                f"{growth:+.1f} MB over {(last_done - half) / 60:.1f} min = {per_second * 3600:+.1f} MB/h "
                f"(least squares, {len(second)} samples)",
            )
            flat = growth < threshold
            verdict = "memory flat" if flat else "MEMORY GROWING"
            row(
                "verdict",
                f"{verdict}: growth {growth:+.1f} MB {'<' if flat else '>='} threshold {threshold:.1f} MB "
                f"({FLAT_FRACTION:.0%} of mean {unit} {level:.0f} MB)",
            )
        else:
            verdict = "too few samples in the second half to judge"
            row("verdict", verdict)
        png = plot(
            out,
            samples,
            (first_done, last_done),
            half,
            f"{' '.join(os.path.basename(c) for c in args.config)}: {verdict}",
        )
    else:
        png = "n/a"
        row("verdict", verdict)

    row("log: warning/error lines", f"{count} ({len(hits)} distinct) in fit.log")
    checkpoints = []
    if run is not None:
        folder = os.path.join(out, "checkpoints", run.info.run_id)
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                size = os.path.getsize(os.path.join(folder, name)) / 1e6
                checkpoints.append(f"{name} ({size:.1f} MB)")
    row("checkpoints", ", ".join(checkpoints) if checkpoints else "none")
    row("files", f"{out}/fit.log, memory.csv, {os.path.basename(png)}")

    width = max(len(name) for name, _ in rows)
    print("\n" + "=" * 100)
    print("SOAK SUMMARY")
    print("-" * 100)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if hits:
        print("-" * 100)
        print(f"distinct warning/error lines in fit.log (count x line, first {min(len(hits), 20)}):")
        for line, n in hits.most_common(20):
            print(f"  {n:>4} x {line[:200]}")
    print("=" * 100)
    if code != 0:
        print(f"soak: the fit exited with code {code}; see {out}/fit.log", file=sys.stderr)
        return code if 0 < code < 256 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
