"""A multi-seed, multi-setting sweep as one command (``fp3o sweep``), run on Ray.

Runs ``fp3o fit`` once per combination of ``--grid`` values and ``--seeds``, each as its own process
in a Ray task (seeds outermost, so that every setting has a first seed before any has a second)::

    fp3o sweep --config configs/mamujoco/halfcheetah_6x1.yaml --seeds 0 1 2 \\
        --grid model.algorithm=fp3o,happo,mappo,ippo --grid model.sharing=nops --tag sweep=cheetah \\
        -- --model.total_frames 200000 --trainer.enable_progress_bar false

Without ``--address`` Ray starts on this machine and runs as many fits at once as there are cores
(``--cpus_per_run`` each); ``--address auto`` or ``ray://host:10001`` uses a running Ray cluster.
Every argument after ``--`` is passed to ``fp3o fit`` verbatim (after the configs, grid values and
seed, so it can override them, except the seed). ``--tag key=value`` adds MLflow tags to every run,
so that ``fp3o report --filter "tags.sweep = 'cheetah'"`` tabulates this sweep alone.

Every run is also tagged ``sweep_run=<key>``, a name derived from its configs, settings, seed, tags
and fit arguments. Running the same sweep again looks these keys up in the MLflow store: finished
runs are skipped and the others resume from their ``checkpoints/<run id>/last.ckpt``. Each run's
output goes to ``<--logs>/<key>.log``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fp3o_lightning import report
from fp3o_lightning.sweep_ray import INTERRUPTED, Job, Outcome, Resources, run_jobs

#: Tags set by ``FP3OModule.tag_runs`` from the run's settings, and the sweep's own run key.
RUN_KEY_TAG = "sweep_run"
RESERVED_TAGS = ("task", "env", "algorithm", "sharing", "seed", RUN_KEY_TAG)
TAGS_OPTION = "--trainer.logger.init_args.tags"
LOGGER_OPTION = "--trainer.logger"
FRAMES_METRIC = "train/frames"
RETURN_METRIC = "train/episode_return"
DEFAULT_LOGS = "sweep_logs"


class SweepError(ValueError):
    """An invalid sweep specification."""


@dataclass(frozen=True)
class SweepRun:
    """One ``fp3o fit`` invocation of the sweep; ``key`` names it in MLflow and its log file."""

    settings: tuple[tuple[str, str], ...]
    seed: int
    command: tuple[str, ...]
    key: str
    resume_from: str | None = None

    @property
    def label(self) -> str:
        return " ".join([*(f"{key}={value}" for key, value in self.settings), f"seed={self.seed}"])


# ------------------------------------------------------------------------------------------ parsing


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split at the first ``--``: the sweep's own options, and the arguments for ``fp3o fit``."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``model.algorithm=fp3o,happo`` → ``("model.algorithm", ["fp3o", "happo"])``, one per spec."""
    grid: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().removeprefix("--")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not choices:
            raise SweepError(f"--grid {spec!r}: expected KEY=VALUE[,VALUE…], e.g. model.algorithm=fp3o,happo")
        if key == "model.seed":
            raise SweepError("--grid model.seed: use --seeds instead.")
        if key in (k for k, _ in grid):
            raise SweepError(f"--grid {key} is given twice; list all its values in one --grid.")
        grid.append((key, choices))
    return grid


def parse_tags(specs: Sequence[str]) -> dict[str, str]:
    """``sweep=paper`` → ``{"sweep": "paper"}``; reserved tags (set by the module) are refused."""
    tags = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--tag {spec!r}: expected KEY=VALUE, e.g. sweep=paper")
        if key.strip() in RESERVED_TAGS:
            raise SweepError(f"--tag {key}: reserved, every run already has it ({', '.join(RESERVED_TAGS)}).")
        tags[key.strip()] = value.strip()
    return tags


def check_passthrough(extra: Sequence[str]) -> None:
    """The seed, the resume checkpoint and the run's tags are the sweep's: refuse them after ``--``."""
    for option, fix in (
        ("--model.seed", "use --seeds"),
        ("--ckpt_path", "the sweep resumes interrupted runs by itself; run the same sweep command again"),
        (TAGS_OPTION, "use --tag KEY=VALUE"),
    ):
        if any(arg == option or arg.startswith(option + "=") for arg in extra):
            raise SweepError(f"{option} after '--' would override the sweep's own; {fix}.")


# ------------------------------------------------------------------------------------------ planning


def run_key(
    configs: Sequence[str],
    settings: Sequence[tuple[str, str]],
    seed: int,
    tags: dict[str, str] | None = None,
    extra: Sequence[str] = (),
) -> str:
    """A readable, stable name of one run, e.g. ``fp3o-nops-s0-1a2b3c4d`` (values, seed, a hash of all)."""
    identity = json.dumps([list(configs), [list(s) for s in settings], seed, tags or {}, list(extra)])
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", "-".join([*(v for _, v in settings), f"s{seed}"]))[:80]
    return f"{slug}-{hashlib.sha1(identity.encode()).hexdigest()[:8]}"


def fit_command(
    configs: Sequence[str],
    settings: Sequence[tuple[str, str]],
    seed: int,
    tags: dict[str, str] | None = None,
    extra: Sequence[str] = (),
    threads: int = 1,
) -> list[str]:
    """``python -m fp3o_lightning.cli fit --config … --KEY=VALUE … --model.seed=S --model.num_threads=T
    --…tags={…} EXTRA…``."""
    command = [sys.executable, "-m", "fp3o_lightning.cli", "fit"]
    for config in configs:
        command += ["--config", config]
    command += [f"--{key}={value}" for key, value in settings]
    command += [f"--model.seed={seed}", f"--model.num_threads={threads}"]
    if tags:
        command.append(f"{TAGS_OPTION}={json.dumps(tags)}")
    return command + list(extra)


def plan(
    configs: Sequence[str],
    seeds: Sequence[int],
    grid: Sequence[tuple[str, Sequence[str]]] = (),
    tags: dict[str, str] | None = None,
    extra: Sequence[str] = (),
    threads: int = 1,
) -> list[SweepRun]:
    """Every (seed, grid combination), seeds outermost, grid in the order given (last key fastest)."""
    keys = [key for key, _ in grid]
    runs = []
    for seed in seeds:
        for values in itertools.product(*(choices for _, choices in grid)):
            settings = tuple(zip(keys, values, strict=True))
            key = run_key(configs, settings, seed, tags, extra)
            run_tags = {**(tags or {}), RUN_KEY_TAG: key}
            command = fit_command(configs, settings, seed, run_tags, extra, threads)
            runs.append(SweepRun(settings, seed, tuple(command), key))
    return runs


def invalid_runs(runs: Sequence[SweepRun]) -> list[tuple[str, str]]:
    """The planned runs whose ``fp3o fit`` configuration does not parse or check, with the error of each
    (``fp3o_lightning.cli.check_fit_args``: nothing is built or started)."""
    from fp3o_lightning.cli import check_fit_args
    from fp3o_lightning.errors import ConfigError

    invalid = []
    for run in runs:
        try:
            check_fit_args(list(run.command[run.command.index("fit") + 1 :]))
        except ConfigError as error:
            invalid.append((run.label, str(error)))
    return invalid


# -------------------------------------------------------------------------------- previous attempts


def option_value(args: Sequence[str], option: str) -> str | None:
    """The last value of ``--option=value`` or ``--option value`` in ``args``."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(option + "="):
            value = arg[len(option) + 1 :]
        elif arg == option and i + 1 < len(args):
            value = args[i + 1]
    return value


@dataclass(frozen=True)
class Store:
    """The MLflow store and experiment the sweep's fits log to."""

    tracking_uri: str
    experiment: str

    artifact_location: str | None = None

    @classmethod
    def of(cls, extra: Sequence[str]) -> Store | None:
        """The fits' store (``fp3o fit``'s default unless overridden after ``--``); None without MLflow."""
        from fp3o_lightning.cli import trainer_defaults

        logger = option_value(extra, LOGGER_OPTION)
        if logger is not None and logger.lower() in ("false", "null", "none"):
            return None
        defaults = trainer_defaults()["logger"]["init_args"]
        uri, experiment, artifacts = (
            option_value(extra, f"{LOGGER_OPTION}.init_args.{name}") or defaults[name]
            for name in ("tracking_uri", "experiment_name", "artifact_location")
        )
        return cls(uri, experiment, artifacts)

    def prepare(self) -> None:
        """Create the store and experiment once, before concurrent fits would race to create them."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        if client.get_experiment_by_name(self.experiment) is None:
            client.create_experiment(self.experiment, artifact_location=self.artifact_location)

    def runs(self) -> dict[str, list]:
        """The store's sweep runs by run key, newest first ({} while the store or experiment is missing)."""
        from mlflow import MlflowClient

        try:
            report.check_store(self.tracking_uri)
            client = MlflowClient(tracking_uri=self.tracking_uri)
            ids = report.experiment_ids(client, [self.experiment])
        except report.ReportError:
            return {}
        found: dict[str, list] = {}
        for run in report.search_runs(client, ids, f"tags.{RUN_KEY_TAG} LIKE '%'"):
            found.setdefault(run.data.tags[RUN_KEY_TAG], []).append(run)
        for runs in found.values():
            runs.sort(key=lambda r: r.info.start_time or 0, reverse=True)
        return found


def last_checkpoint(mlflow_runs: Sequence) -> str | None:
    """``checkpoints/<run id>/last.ckpt`` of the newest of these MLflow runs that has one."""
    from fp3o_lightning.callbacks.checkpoints import CHECKPOINT_ROOT

    for run in mlflow_runs:
        path = Path(CHECKPOINT_ROOT) / run.info.run_id / "last.ckpt"
        if path.is_file():
            return str(path)
    return None


def pending_runs(runs: Sequence[SweepRun], previous: dict[str, list]) -> list[SweepRun]:
    """The runs still to do: finished ones dropped, interrupted ones resuming from their checkpoint."""
    pending = []
    for run in runs:
        attempts = previous.get(run.key, [])
        if any(a.info.status == "FINISHED" for a in attempts):
            continue
        checkpoint = last_checkpoint(attempts)
        if checkpoint:
            run = replace(run, command=(*run.command, f"--ckpt_path={checkpoint}"), resume_from=checkpoint)
        pending.append(run)
    return pending


# ----------------------------------------------------------------------------------------- progress


def format_seconds(seconds: float) -> str:
    """``42.0s``, ``3m05s``, ``2h01m40s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def latest_metrics(mlflow_runs: Sequence) -> tuple[str, str]:
    """Frames and last training return of the newest of a run's MLflow attempts, as text."""
    metrics = mlflow_runs[0].data.metrics if mlflow_runs else {}
    frames = f"{metrics[FRAMES_METRIC]:.0f}" if FRAMES_METRIC in metrics else "–"
    last_return = f"{metrics[RETURN_METRIC]:.1f}" if RETURN_METRIC in metrics else "–"
    return frames, last_return


def progress_table(rows: Sequence[tuple[str, str, float]], store: Store | None) -> str:
    """A table of (run key, state, seconds) rows with each run's frames and last return from MLflow."""
    previous = store.runs() if store else {}
    lines = [["run", "state", "frames", "return", "time"]]
    for key, state, seconds in rows:
        lines.append([key, state, *latest_metrics(previous.get(key, [])), format_seconds(seconds)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def outcome_line(outcome: Outcome, done: int, total: int) -> str:
    """``[3/8] fp3o-nops-s0-…: ok in 2m05s``; a failed run adds its log's last lines."""
    state = "ok" if outcome.ok else f"FAILED (exit {outcome.returncode})"
    state = "interrupted" if outcome.returncode == INTERRUPTED else state
    line = f"[{done}/{total}] {outcome.job.key}: {state} in {format_seconds(outcome.seconds)}"
    if outcome.ok or outcome.returncode == INTERRUPTED:
        return line
    tail = "".join(f"    | {text}\n" for text in outcome.tail.splitlines())
    return f"{line}; the end of {outcome.job.log}:\n{tail.rstrip()}"


def summary(outcomes: Sequence[Outcome], planned: int, skipped: int, seconds: float) -> str:
    """The final lines: counts, total time, and the failed and interrupted runs with their logs."""
    failed = [o for o in outcomes if not o.ok]
    lines = [
        f"fp3o sweep: {len(outcomes)} of {planned} runs in {format_seconds(seconds)}: "
        f"{len(outcomes) - len(failed)} succeeded, {len(failed)} failed or interrupted"
        + (f", {skipped} already finished" if skipped else "")
        + (f", {planned - skipped - len(outcomes)} not started" if planned - skipped > len(outcomes) else "")
    ]
    lines += [f"  not ok: {o.job.key} (exit {o.returncode}), log {o.job.log}" for o in failed]
    if failed or planned - skipped > len(outcomes):
        lines.append("  Run the same command again to resume the unfinished runs.")
    return "\n".join(lines)


def _shell_quote(text: str) -> str:
    return f'"{text}"' if re.fullmatch(r"[\w .,:/='<>-]*", text) else shlex.quote(text)


def report_hint(tags: dict[str, str], extra: Sequence[str] = ()) -> str:
    """The ``fp3o report`` command for this sweep's runs (same store, experiment and tags)."""
    command = ["fp3o report"]
    for option, name in (("tracking_uri", "tracking_uri"), ("experiment_name", "experiment")):
        value = option_value(extra, f"{LOGGER_OPTION}.init_args.{option}")
        if value is not None:
            command.append(f"--{name} {_shell_quote(value)}")
    if tags:
        condition = " and ".join(f"tags.{key} = '{value}'" for key, value in tags.items())
        command.append(f"--filter {_shell_quote(condition)}")
    return " ".join(command)


# ----------------------------------------------------------------------------------------- running


def job(run: SweepRun, logs: str) -> Job:
    """The Ray job of a run: labelled with its key, logging to ``<logs>/<key>.log`` (absolute)."""
    return Job(run.key, run.command, str(Path(logs).absolute() / f"{run.key}.log"))


def run_sweep(
    runs: Sequence[SweepRun],
    resources: Resources,
    store: Store | None,
    logs: str = DEFAULT_LOGS,
    fail_fast: bool = False,
    progress_s: float = 60.0,
) -> tuple[list[Outcome], bool]:
    """Run the pending runs on Ray, printing a line per start and end and a progress table every
    ``progress_s`` seconds; returns the outcomes and whether Ctrl-C stopped the sweep."""
    finished: list[Outcome] = []

    def on_start(job: Job) -> None:
        print(f"started {job.key}", flush=True)

    def on_end(outcome: Outcome) -> None:
        finished.append(outcome)
        print(outcome_line(outcome, len(finished), len(runs)), flush=True)

    def on_tick(running: dict[Job, float]) -> None:
        now = time.monotonic()
        rows = [(job.key, "running", now - started) for job, started in running.items()]
        rows += [(o.job.key, "ok" if o.ok else f"exit {o.returncode}", o.seconds) for o in finished]
        print(progress_table(rows, store), flush=True)

    return run_jobs([job(r, logs) for r in runs], resources, on_start, on_end, on_tick, progress_s, fail_fast)


# ----------------------------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fp3o sweep",
        usage="fp3o sweep --config CONFIG [--config …] [--seeds S …] [--grid KEY=V1,V2 …] "
        "[--tag KEY=VALUE …] [--address ADDRESS] [--max_concurrent N] [--cpus_per_run C] "
        "[--gpus_per_run G] [--logs DIR] [--dry_run] [--fail_fast] [-- FIT_ARGS …]",
        description="Run `fp3o fit` once per seed × combination of --grid values, as Ray tasks, each in its "
        "own process. Arguments after '--' are passed to every `fp3o fit` verbatim, last (they override "
        "the configs and grid values). Running the same command again skips finished runs and resumes "
        "interrupted ones from their last.ckpt. Exit code: 0 if every run succeeded, 1 if any failed, "
        "130 if interrupted.",
    )
    p.add_argument(
        "--config",
        action="append",
        required=True,
        help="`fp3o fit` config file; repeatable (later files override earlier ones).",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        metavar="S",
        help="Seeds; each run gets --model.seed=S (default: 0).",
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="An `fp3o fit` option and its comma-separated values, e.g. model.algorithm=fp3o,happo; "
        "repeatable: the sweep runs every combination.",
    )
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="MLflow tag for every run (set through --trainer.logger.init_args.tags), e.g. sweep=paper; "
        "repeatable. Filter on it with `fp3o report --filter \"tags.sweep = 'paper'\"`.",
    )
    p.add_argument(
        "--address",
        help="Ray cluster to run on: 'auto' (the cluster this node belongs to) or ray://HEAD:10001. "
        "Default: start Ray on this machine for the sweep.",
    )
    p.add_argument(
        "--max_concurrent",
        "--max-concurrent",
        type=int,
        help="At most this many runs at once (default: as many as the CPUs and GPUs hold; 1 runs them "
        "one after another).",
    )
    p.add_argument(
        "--cpus_per_run",
        "--cpus-per-run",
        type=float,
        default=1.0,
        help="CPUs reserved per run; also its torch threads, --model.num_threads (default: 1).",
    )
    p.add_argument(
        "--gpus_per_run",
        "--gpus-per-run",
        type=float,
        default=0.0,
        help="GPUs reserved per run, fractions allowed (0.5: two runs share a GPU; default: 0). Pass the "
        "accelerator to fit after '--', e.g. -- --trainer.accelerator gpu.",
    )
    p.add_argument(
        "--logs",
        default=DEFAULT_LOGS,
        help=f"Directory of the runs' output, <key>.log (default: {DEFAULT_LOGS}).",
    )
    p.add_argument(
        "--progress_every",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="Print the progress table this often (default: 60).",
    )
    p.add_argument(
        "--dry_run", action="store_true", help="Print what would run (commands, resumes, skips) and stop."
    )
    p.add_argument(
        "--fail_fast",
        action="store_true",
        help="At the first failed run, stop the others (with a checkpoint).",
    )
    return p


def check_resources(args: argparse.Namespace) -> None:
    if args.cpus_per_run <= 0 or args.gpus_per_run < 0:
        raise SweepError("--cpus_per_run must be > 0 and --gpus_per_run >= 0.")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise SweepError("--max_concurrent must be at least 1.")
    if args.gpus_per_run > 1 and not float(args.gpus_per_run).is_integer():
        raise SweepError("--gpus_per_run above 1 must be a whole number of GPUs (Ray's rule).")


def main(argv: list[str] | None = None, num_cpus: int | None = None) -> int:
    """``fp3o sweep``: run (or with ``--dry_run`` print) the pending runs; returns the exit code.

    ``num_cpus`` limits an embedded Ray (tests)."""
    own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(own)
    try:
        grid, tags = parse_grid(args.grid), parse_tags(args.tag)
        check_passthrough(extra)
        check_resources(args)
    except SweepError as error:
        p.error(str(error))
    missing = [c for c in args.config if not Path(c).is_file()]
    if missing:
        p.error(f"config file(s) not found: {', '.join(missing)}")
    runs = plan(args.config, args.seeds, grid, tags, extra, threads=max(1, int(args.cpus_per_run)))
    invalid = invalid_runs(runs)
    if invalid:
        print(
            f"fp3o sweep: error: {len(invalid)} of the {len(runs)} planned runs are misconfigured; nothing "
            "was started:\n" + "\n".join(f"  {label}: {error}" for label, error in invalid),
            file=sys.stderr,
        )
        return 2
    store = Store.of(extra)
    pending = pending_runs(runs, store.runs() if store else {})
    resumed = sum(r.resume_from is not None for r in pending)
    combos = len(runs) // len(args.seeds)
    print(
        f"fp3o sweep: {len(runs)} runs ({combos} setting(s) × {len(args.seeds)} seed(s)): "
        f"{len(runs) - len(pending)} finished already, {resumed} to resume, {len(pending) - resumed} to start"
        + ("" if store else " (no MLflow logger: finished runs are not detected)"),
        flush=True,
    )
    if args.dry_run:
        for run in pending:
            resume = f", resumes from {run.resume_from}" if run.resume_from else ""
            print(f"# {run.key}: {run.label}{resume}\n{shlex.join(run.command)}")
        return 0
    if store:
        store.prepare()
    resources = Resources(args.address, args.cpus_per_run, args.gpus_per_run, args.max_concurrent, num_cpus)
    start = time.perf_counter()
    try:
        outcomes, interrupted = run_sweep(
            pending, resources, store, args.logs, args.fail_fast, args.progress_every
        )
    except RuntimeError as error:
        print(f"fp3o sweep: error: {error}", file=sys.stderr)
        return 1
    print(summary(outcomes, len(runs), len(runs) - len(pending), time.perf_counter() - start))
    print(f"Tables and learning curves: {report_hint(tags, extra)}")
    if interrupted:
        return INTERRUPTED
    return 0 if all(o.ok for o in outcomes) and len(outcomes) == len(pending) else 1


if __name__ == "__main__":
    sys.exit(main())
