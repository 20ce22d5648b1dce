"""A multi-seed, multi-setting sweep as one command (``fp3o sweep``).

Runs ``fp3o fit`` once per combination of ``--grid`` values and ``--seeds``, sequentially, each as its
own process (seeds outermost, so that every setting has a first seed before any has a second)::

    fp3o sweep --config configs/mamujoco/halfcheetah_6x1.yaml --seeds 0 1 2 \\
        --grid model.algorithm=fp3o,happo,mappo,ippo --grid model.sharing=nops --tag sweep=cheetah \\
        -- --model.total_frames 200000 --trainer.enable_progress_bar false

Every argument after ``--`` is passed to ``fp3o fit`` verbatim (after the configs, grid values and
seed, so it can override them, except the seed). ``--tag key=value`` adds MLflow tags to every run,
so that ``fp3o report --filter "tags.sweep = 'cheetah'"`` tabulates this sweep alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Runs one command and returns its exit code (``subprocess.run`` by default; tests pass a fake).
Runner = Callable[[Sequence[str]], int]

#: Tags set by ``FP3OModule.tag_runs`` from the run's settings; a sweep tag would be overwritten.
RESERVED_TAGS = ("task", "env", "algorithm", "sharing", "seed")
TAGS_OPTION = "--trainer.logger.init_args.tags"
INTERRUPTED = 130


class SweepError(ValueError):
    """An invalid sweep specification."""


@dataclass(frozen=True)
class SweepRun:
    """One ``fp3o fit`` invocation of the sweep."""

    settings: tuple[tuple[str, str], ...]
    seed: int
    command: tuple[str, ...]

    @property
    def label(self) -> str:
        return " ".join([*(f"{key}={value}" for key, value in self.settings), f"seed={self.seed}"])


@dataclass(frozen=True)
class RunResult:
    """How one run ended: its exit code (``INTERRUPTED`` for Ctrl-C) and wall time in seconds."""

    run: SweepRun
    returncode: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


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
    """The seed is the sweep's: refuse ``--model.seed`` after ``--``."""
    if any(arg == "--model.seed" or arg.startswith("--model.seed=") for arg in extra):
        raise SweepError("--model.seed after '--' would override the sweep's seeds; use --seeds.")


# ------------------------------------------------------------------------------------------ planning


def fit_command(
    configs: Sequence[str],
    settings: Sequence[tuple[str, str]],
    seed: int,
    tags: dict[str, str] | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """``python -m fp3o_lightning.cli fit --config … --KEY=VALUE … --model.seed=S [--…tags=…] EXTRA…``."""
    command = [sys.executable, "-m", "fp3o_lightning.cli", "fit"]
    for config in configs:
        command += ["--config", config]
    command += [f"--{key}={value}" for key, value in settings]
    command.append(f"--model.seed={seed}")
    if tags:
        command.append(f"{TAGS_OPTION}={json.dumps(tags)}")
    return command + list(extra)


def plan(
    configs: Sequence[str],
    seeds: Sequence[int],
    grid: Sequence[tuple[str, Sequence[str]]] = (),
    tags: dict[str, str] | None = None,
    extra: Sequence[str] = (),
) -> list[SweepRun]:
    """Every (seed, grid combination), seeds outermost, grid in the order given (last key fastest)."""
    keys = [key for key, _ in grid]
    runs = []
    for seed in seeds:
        for values in itertools.product(*(choices for _, choices in grid)):
            settings = tuple(zip(keys, values, strict=True))
            runs.append(SweepRun(settings, seed, tuple(fit_command(configs, settings, seed, tags, extra))))
    return runs


# ------------------------------------------------------------------------------------------- running


def run_subprocess(command: Sequence[str]) -> int:
    """Run one command in the foreground (its output goes to this terminal); returns the exit code."""
    return subprocess.run(list(command), check=False).returncode


def format_seconds(seconds: float) -> str:
    """``42.0s``, ``3m05s``, ``2h01m40s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def result_line(index: int, total: int, result: RunResult) -> str:
    state = "ok" if result.ok else "FAILED"
    state = "interrupted" if result.returncode == INTERRUPTED else state
    return (
        f"[{index}/{total}] {result.run.label}: {state} (exit {result.returncode}) "
        f"in {format_seconds(result.seconds)}"
    )


def run_sweep(
    runs: Sequence[SweepRun],
    runner: Runner = run_subprocess,
    fail_fast: bool = False,
    echo: Callable[[str], None] = print,
    clock: Callable[[], float] = time.perf_counter,
) -> list[RunResult]:
    """Run sequentially, echoing a line before and after each; stop on Ctrl-C (or a failure if asked)."""
    results = []
    for index, run in enumerate(runs, 1):
        echo(f"[{index}/{len(runs)}] {run.label}: starting")
        start = clock()
        try:
            code = runner(run.command)
        except KeyboardInterrupt:
            code = INTERRUPTED
        results.append(RunResult(run, code, clock() - start))
        echo(result_line(index, len(runs), results[-1]))
        if code == INTERRUPTED or (fail_fast and code != 0):
            break
    return results


def summary(results: Sequence[RunResult], planned: int, seconds: float) -> str:
    """The final lines: counts, total time, the runs that failed and the runs never started."""
    failed = [r for r in results if not r.ok]
    lines = [
        f"fp3o sweep: {len(results)} of {planned} runs in {format_seconds(seconds)}: "
        f"{len(results) - len(failed)} succeeded, {len(failed)} failed"
        + (f", {planned - len(results)} not started" if len(results) < planned else "")
    ]
    lines += [f"  failed: {r.run.label} (exit {r.returncode}): {shlex.join(r.run.command)}" for r in failed]
    return "\n".join(lines)


def _option_value(args: Sequence[str], option: str) -> str | None:
    """The last value of ``--option=value`` or ``--option value`` in ``args``."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(option + "="):
            value = arg[len(option) + 1 :]
        elif arg == option and i + 1 < len(args):
            value = args[i + 1]
    return value


def _shell_quote(text: str) -> str:
    return f'"{text}"' if re.fullmatch(r"[\w .,:/='<>-]*", text) else shlex.quote(text)


def report_hint(tags: dict[str, str], extra: Sequence[str] = ()) -> str:
    """The ``fp3o report`` command for this sweep's runs (same store, experiment and tags)."""
    command = ["fp3o report"]
    for option, name in (("tracking_uri", "tracking_uri"), ("experiment_name", "experiment")):
        value = _option_value(extra, f"--trainer.logger.init_args.{option}")
        if value is not None:
            command.append(f"--{name} {_shell_quote(value)}")
    if tags:
        condition = " and ".join(f"tags.{key} = '{value}'" for key, value in tags.items())
        command.append(f"--filter {_shell_quote(condition)}")
    return " ".join(command)


# ----------------------------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fp3o sweep",
        usage="fp3o sweep --config CONFIG [--config …] [--seeds S …] [--grid KEY=V1,V2 …] "
        "[--tag KEY=VALUE …] [--dry_run] [--fail_fast] [-- FIT_ARGS …]",
        description="Run `fp3o fit` once per seed × combination of --grid values, sequentially, each in its "
        "own process. Arguments after '--' are passed to every `fp3o fit` verbatim, last (they override "
        "the configs and grid values). Exit code: 0 if every run succeeded, 1 if any failed, 130 if "
        "interrupted.",
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
    p.add_argument("--dry_run", action="store_true", help="Print the commands without running them.")
    p.add_argument("--fail_fast", action="store_true", help="Stop at the first failed run.")
    return p


def main(argv: list[str] | None = None, runner: Runner = run_subprocess) -> int:
    """``fp3o sweep``: run (or with ``--dry_run`` print) every command; returns the exit code."""
    own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(own)
    try:
        grid, tags = parse_grid(args.grid), parse_tags(args.tag)
        check_passthrough(extra)
    except SweepError as error:
        p.error(str(error))
    missing = [c for c in args.config if not Path(c).is_file()]
    if missing:
        p.error(f"config file(s) not found: {', '.join(missing)}")
    runs = plan(args.config, args.seeds, grid, tags, extra)
    combos = len(runs) // len(args.seeds)
    print(f"fp3o sweep: {len(runs)} runs ({combos} setting(s) × {len(args.seeds)} seed(s))", flush=True)
    if args.dry_run:
        print("\n".join(shlex.join(run.command) for run in runs))
        return 0
    start = time.perf_counter()
    results = run_sweep(runs, runner, args.fail_fast, echo=lambda line: print(line, flush=True))
    print(summary(results, len(runs), time.perf_counter() - start))
    print(f"Tables and learning curves: {report_hint(tags, extra)}")
    if any(r.returncode == INTERRUPTED for r in results):
        return INTERRUPTED
    return 0 if all(r.ok for r in results) and len(results) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
