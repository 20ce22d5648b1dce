"""``fp3o sweep``: command construction, dry run, and summary / exit codes with a fake runner."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from fp3o_lightning import sweep
from fp3o_lightning.sweep import INTERRUPTED, SweepError, main, parse_grid, parse_tags, plan, report_hint

CONFIG = "configs/mamujoco/halfcheetah_6x1.yaml"
FIT = [sys.executable, "-m", "fp3o_lightning.cli", "fit"]
EXTRA = ["--model.total_frames", "200000", "--trainer.enable_progress_bar", "false"]
TAGS = '--trainer.logger.init_args.tags={"sweep": "cheetah", "who": "me"}'


class FakeRunner:
    """Records the commands; fails (or raises) for the commands containing a given argument."""

    def __init__(self, fail_on: str | None = None, code: int = 1, interrupt_on: str | None = None):
        self.commands: list[list[str]] = []
        self.fail_on, self.code, self.interrupt_on = fail_on, code, interrupt_on

    def __call__(self, command) -> int:
        self.commands.append(list(command))
        if self.interrupt_on in command:
            raise KeyboardInterrupt
        return self.code if self.fail_on in command else 0


def sweep_argv(*extra_options: str) -> list[str]:
    return [
        "--config",
        CONFIG,
        "--seeds",
        "0",
        "1",
        "--grid",
        "model.algorithm=fp3o,happo",
        "--grid",
        "model.sharing=nops",
        *extra_options,
        "--",
        *EXTRA,
    ]


def expected_command(algorithm: str, seed: int, tags: bool = True) -> list[str]:
    head = [*FIT, "--config", CONFIG, f"--model.algorithm={algorithm}", "--model.sharing=nops"]
    return [*head, f"--model.seed={seed}", *([TAGS] if tags else []), *EXTRA]


def test_dry_run_prints_every_command(capsys):
    assert main(sweep_argv("--tag", "sweep=cheetah", "--tag", "who=me", "--dry_run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "fp3o sweep: 4 runs (2 setting(s) × 2 seed(s))"
    assert [shlex.split(line) for line in lines[1:]] == [
        expected_command("fp3o", 0),
        expected_command("happo", 0),
        expected_command("fp3o", 1),
        expected_command("happo", 1),
    ]


def test_tags_are_json_for_the_mlflow_logger():
    (run,) = plan([CONFIG], [3], tags={"sweep": "paper", "n": "5"})
    option, _, value = run.command[-1].partition("=")
    assert option == "--trainer.logger.init_args.tags" and json.loads(value) == {"sweep": "paper", "n": "5"}


def test_several_configs_and_no_grid():
    (run,) = plan(["a.yaml", "b.yaml"], [7])
    assert list(run.command) == [*FIT, "--config", "a.yaml", "--config", "b.yaml", "--model.seed=7"]
    assert run.label == "seed=7"


def test_grid_product_order():
    grid = parse_grid(["model.algorithm=fp3o,happo", "--model.sharing=fups, nops"])
    assert grid == [("model.algorithm", ["fp3o", "happo"]), ("model.sharing", ["fups", "nops"])]
    labels = [run.label for run in plan([CONFIG], [0, 1], grid)]
    assert labels[:4] == [
        "model.algorithm=fp3o model.sharing=fups seed=0",
        "model.algorithm=fp3o model.sharing=nops seed=0",
        "model.algorithm=happo model.sharing=fups seed=0",
        "model.algorithm=happo model.sharing=nops seed=0",
    ]
    assert len(labels) == 8 and labels[4].endswith("seed=1")


@pytest.mark.parametrize(
    "specs", [["model.algorithm"], ["=fp3o"], ["model.algorithm="], ["model.seed=1,2"], ["a=1", "a=2"]]
)
def test_invalid_grid(specs):
    with pytest.raises(SweepError):
        parse_grid(specs)


@pytest.mark.parametrize("specs", [["sweep"], ["=x"], ["seed=3"], ["algorithm=fp3o"]])
def test_invalid_tags(specs):
    with pytest.raises(SweepError):
        parse_tags(specs)


def test_cli_errors(capsys):
    with pytest.raises(SystemExit):
        main(["--config", "missing.yaml", "--dry_run"])
    assert "config file(s) not found: missing.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", CONFIG, "--", "--model.seed", "3"])
    assert "use --seeds" in capsys.readouterr().err


def test_all_runs_succeed(capsys):
    runner = FakeRunner()
    assert main(sweep_argv("--tag", "sweep=cheetah", "--tag", "who=me"), runner=runner) == 0
    assert runner.commands == [expected_command(a, s) for s in (0, 1) for a in ("fp3o", "happo")]
    out = capsys.readouterr().out
    assert "[1/4] model.algorithm=fp3o model.sharing=nops seed=0: starting" in out
    assert "[4/4] model.algorithm=happo model.sharing=nops seed=1: ok (exit 0) in " in out
    assert "fp3o sweep: 4 of 4 runs in " in out and ": 4 succeeded, 0 failed" in out
    assert "fp3o report --filter \"tags.sweep = 'cheetah' and tags.who = 'me'\"" in out


def test_failure_does_not_stop_the_sweep(capsys):
    runner = FakeRunner(fail_on="--model.algorithm=happo", code=3)
    assert main(sweep_argv(), runner=runner) == 1
    assert len(runner.commands) == 4
    out = capsys.readouterr().out
    assert "[2/4] model.algorithm=happo model.sharing=nops seed=0: FAILED (exit 3) in " in out
    assert "4 of 4 runs in" in out and "2 succeeded, 2 failed" in out
    assert out.count("  failed: model.algorithm=happo") == 2
    assert "Tables and learning curves: fp3o report" in out


def test_fail_fast_stops_at_first_failure(capsys):
    runner = FakeRunner(fail_on="--model.algorithm=happo")
    assert main(sweep_argv("--fail_fast"), runner=runner) == 1
    assert len(runner.commands) == 2
    out = capsys.readouterr().out
    assert "2 of 4 runs in" in out and "1 succeeded, 1 failed, 2 not started" in out


def test_interrupt_stops_the_sweep(capsys):
    runner = FakeRunner(interrupt_on="--model.seed=1")
    assert main(sweep_argv(), runner=runner) == INTERRUPTED
    assert len(runner.commands) == 3
    out = capsys.readouterr().out
    assert "[3/4] model.algorithm=fp3o model.sharing=nops seed=1: interrupted" in out
    assert "1 not started" in out


def test_run_sweep_times_each_run():
    ticks = iter([0.0, 5.0, 5.0, 70.0])
    lines: list[str] = []
    runs = plan([CONFIG], [0, 1])
    results = sweep.run_sweep(runs, FakeRunner(), echo=lines.append, clock=lambda: next(ticks))
    assert [r.seconds for r in results] == [5.0, 65.0]
    assert (
        lines[1] == "[1/2] seed=0: ok (exit 0) in 5.0s" and lines[3] == "[2/2] seed=1: ok (exit 0) in 1m05s"
    )


def test_report_hint_uses_the_runs_store_and_experiment():
    extra = ["--trainer.logger.init_args.tracking_uri=sqlite:///other.db"]
    extra += ["--trainer.logger.init_args.experiment_name", "paper runs"]
    hint = report_hint({"sweep": "p"}, extra)
    assert hint == (
        'fp3o report --tracking_uri "sqlite:///other.db" --experiment "paper runs" '
        "--filter \"tags.sweep = 'p'\""
    )
    assert report_hint({}) == "fp3o report"


def test_format_seconds():
    assert [sweep.format_seconds(s) for s in (4.0, 65, 3600 + 61)] == ["4.0s", "1m05s", "1h01m01s"]


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for option in ("--config", "--seeds", "--grid", "--tag", "--dry_run", "--fail_fast", "FIT_ARGS"):
        assert option in text
