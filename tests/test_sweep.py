"""``fp3o sweep``: planning, run keys, resume decisions, output, and the Ray runner on stand-in commands."""

from __future__ import annotations

import json
import shlex
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from fp3o_lightning import sweep
from fp3o_lightning.sweep import SweepError, main, parse_grid, parse_tags, pending_runs, plan, report_hint
from fp3o_lightning.sweep_ray import INTERRUPTED, Job, Outcome, Resources, capacity, execute, run_jobs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/mamujoco/halfcheetah_6x1.yaml")
QUICKSTART = str(ROOT / "configs/quickstart.yaml")
FIT = [sys.executable, "-m", "fp3o_lightning.cli", "fit"]
EXTRA = ["--model.total_frames", "200000", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Every test runs in an empty directory: no MLflow store, checkpoints or logs of earlier runs."""
    monkeypatch.chdir(tmp_path)


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


def mlflow_run(status: str, run_id: str = "r1", start_time: int = 0) -> SimpleNamespace:
    return SimpleNamespace(info=SimpleNamespace(status=status, run_id=run_id, start_time=start_time))


# ------------------------------------------------------------------------------------------ planning


def test_dry_run_prints_every_command(capsys):
    assert main(sweep_argv("--tag", "sweep=cheetah", "--tag", "who=me", "--dry_run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0]
        == "fp3o sweep: 4 runs (2 setting(s) × 2 seed(s)): 0 finished already, 0 to resume, 4 to start"
    )
    comments, commands = lines[1::2], [shlex.split(line) for line in lines[2::2]]
    expected = [("fp3o", 0), ("happo", 0), ("fp3o", 1), ("happo", 1)]
    for comment, command, (algorithm, seed) in zip(comments, commands, expected, strict=True):
        head = [*FIT, "--config", CONFIG, f"--model.algorithm={algorithm}", "--model.sharing=nops"]
        assert command[: len(head)] == head
        assert command[len(head) : len(head) + 2] == [f"--model.seed={seed}", "--model.num_threads=1"]
        option, _, value = command[len(head) + 2].partition("=")
        tags = json.loads(value)
        assert option == "--trainer.logger.init_args.tags"
        assert tags == {"sweep": "cheetah", "who": "me", "sweep_run": tags["sweep_run"]}
        assert tags["sweep_run"].startswith(f"{algorithm}-nops-s{seed}-")
        assert comment == f"# {tags['sweep_run']}: model.algorithm={algorithm} model.sharing=nops seed={seed}"
        assert command[len(head) + 3 :] == EXTRA


def test_run_keys_are_stable_and_distinct():
    runs = plan([CONFIG], [0, 1], parse_grid(["model.algorithm=fp3o,happo"]), extra=EXTRA)
    again = plan([CONFIG], [0, 1], parse_grid(["model.algorithm=fp3o,happo"]), extra=EXTRA, threads=2)
    assert [r.key for r in runs] == [r.key for r in again]  # threads do not change what a run computes
    assert len({r.key for r in runs}) == 4
    other = plan([CONFIG], [0], parse_grid(["model.algorithm=fp3o"]), extra=["--model.total_frames", "1"])
    assert other[0].key != runs[0].key and other[0].key.startswith("fp3o-s0-")
    assert "--model.num_threads=2" in again[0].command


def test_several_configs_and_no_grid():
    (run,) = plan(["a.yaml", "b.yaml"], [7])
    assert list(run.command[:9]) == [*FIT, "--config", "a.yaml", "--config", "b.yaml", "--model.seed=7"]
    assert run.label == "seed=7" and run.key.startswith("s7-")


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


@pytest.mark.parametrize("specs", [["sweep"], ["=x"], ["seed=3"], ["algorithm=fp3o"], ["sweep_run=x"]])
def test_invalid_tags(specs):
    with pytest.raises(SweepError):
        parse_tags(specs)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--config", "missing.yaml", "--dry_run"], "config file(s) not found: missing.yaml"),
        (["--config", CONFIG, "--", "--model.seed", "3"], "use --seeds"),
        (["--config", CONFIG, "--", "--ckpt_path=last"], "run the same sweep command again"),
        (["--config", CONFIG, "--", "--trainer.logger.init_args.tags", "{}"], "use --tag"),
        (["--config", CONFIG, "--cpus_per_run", "0"], "--cpus_per_run must be > 0"),
        (["--config", CONFIG, "--max_concurrent", "0"], "--max_concurrent must be at least 1"),
        (["--config", CONFIG, "--gpus_per_run", "1.5"], "whole number of GPUs"),
    ],
)
def test_cli_errors(capsys, argv, expected):
    with pytest.raises(SystemExit):
        main(argv)
    assert expected in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- resume


def test_pending_runs_skip_finished_and_resume_from_the_newest_checkpoint(tmp_path):
    first, second, third = plan([CONFIG], [0, 1, 2])
    checkpoint = tmp_path / "checkpoints" / "killed" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    previous = {
        first.key: [mlflow_run("FAILED", "new-without-ckpt", 2), mlflow_run("FINISHED", "done", 1)],
        second.key: [mlflow_run("FAILED", "crashed-early", 2), mlflow_run("KILLED", "killed", 1)],
    }
    pending = pending_runs([first, second, third], previous)
    assert [r.key for r in pending] == [second.key, third.key]
    assert pending[0].resume_from == "checkpoints/killed/last.ckpt"
    assert pending[0].command == (*second.command, "--ckpt_path=checkpoints/killed/last.ckpt")
    assert pending[1] == third


def test_store_follows_the_fit_arguments():
    assert sweep.Store.of(["--trainer.logger", "false"]) is None
    store = sweep.Store.of(
        [
            "--trainer.logger.init_args.tracking_uri=sqlite:///x.db",
            "--trainer.logger.init_args.experiment_name",
            "e",
        ]
    )
    assert (store.tracking_uri, store.experiment) == ("sqlite:///x.db", "e")
    assert sweep.Store.of([]).tracking_uri.endswith("/mlflow.db")
    assert sweep.Store.of([]).runs() == {}  # no store yet: nothing finished, and none created
    assert not Path("mlflow.db").exists()


def test_store_finds_runs_by_key_newest_first():
    store = sweep.Store.of([])
    store.prepare()
    from mlflow import MlflowClient

    client = MlflowClient(store.tracking_uri)
    experiment = client.get_experiment_by_name(store.experiment).experiment_id
    for start, key in ((1, "a"), (2, "a"), (3, "b")):
        client.create_run(experiment, start_time=start, tags={"sweep_run": key})
    client.create_run(experiment, tags={"other": "x"})
    found = store.runs()
    assert sorted(found) == ["a", "b"]
    assert [r.info.start_time for r in found["a"]] == [2, 1]


# ------------------------------------------------------------------------------------------- output


def test_outcome_lines_and_summary():
    job = Job("fp3o-s0-abc", ("fit",), "/logs/fp3o-s0-abc.log")
    failed = Outcome(job, 3, 65.0, "line 1\nTraceback: boom\n")
    assert sweep.outcome_line(Outcome(job, 0, 5.0), 1, 3) == "[1/3] fp3o-s0-abc: ok in 5.0s"
    assert (
        sweep.outcome_line(Outcome(job, INTERRUPTED, 5.0), 2, 3) == "[2/3] fp3o-s0-abc: interrupted in 5.0s"
    )
    assert sweep.outcome_line(failed, 3, 3).splitlines() == [
        "[3/3] fp3o-s0-abc: FAILED (exit 3) in 1m05s; the end of /logs/fp3o-s0-abc.log:",
        "    | line 1",
        "    | Traceback: boom",
    ]
    text = sweep.summary([Outcome(job, 0, 5.0), failed], planned=5, skipped=1, seconds=70.0)
    assert text.splitlines()[0] == (
        "fp3o sweep: 2 of 5 runs in 1m10s: 1 succeeded, 1 failed or interrupted, 1 already finished, "
        "2 not started"
    )
    assert "  not ok: fp3o-s0-abc (exit 3), log /logs/fp3o-s0-abc.log" in text
    assert "Run the same command again" in text


def test_progress_table_without_store():
    table = sweep.progress_table([("fp3o-s0-abc", "running", 75.0), ("b", "ok", 4.0)], store=None)
    assert [line.split() for line in table.splitlines()] == [
        ["run", "state", "frames", "return", "time"],
        ["fp3o-s0-abc", "running", "–", "–", "1m15s"],
        ["b", "ok", "–", "–", "4.0s"],
    ]


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
    options = ("--config", "--seeds", "--grid", "--tag", "--address", "--max_concurrent", "--cpus_per_run")
    for option in (*options, "--gpus_per_run", "--logs", "--dry_run", "--fail_fast", "FIT_ARGS"):
        assert option in text


# ---------------------------------------------------------------------------------------------- Ray


@pytest.mark.parametrize(
    ("resources", "cluster", "slots"),
    [
        (Resources(), {"CPU": 2.0}, 2),
        (Resources(cpus_per_run=0.5, max_concurrent=3), {"CPU": 2.0}, 3),
        (Resources(cpus_per_run=1, gpus_per_run=0.5), {"CPU": 16.0, "GPU": 1.0}, 2),
    ],
)
def test_capacity(resources, cluster, slots):
    assert capacity(resources, cluster) == slots


def test_capacity_without_gpus_names_the_fix():
    with pytest.raises(RuntimeError, match="lower --cpus_per_run / --gpus_per_run or add nodes"):
        capacity(Resources(gpus_per_run=1), {"CPU": 2.0})


def python_job(name: str, code: str, tmp_path: Path) -> Job:
    return Job(name, (sys.executable, "-c", code), str(tmp_path / "logs" / f"{name}.log"))


#: Sleeps until SIGTERM, then (like ``fp3o fit``) finishes its "iteration", writes a file and exits 0.
GRACEFUL = """
import signal, sys, time
def stop(*_):
    time.sleep(0.5)
    open("stopped", "w").write("checkpoint")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("running", flush=True)
time.sleep(120)
"""

#: Waits until the log named ``log`` says "running" (at most 60 s), then fails with exit status 3.
FAIL_WHEN_RUNNING = """
import pathlib, time
log = pathlib.Path({log!r})
for _ in range(600):
    if log.exists() and "running" in log.read_text():
        break
    time.sleep(0.1)
print("boom")
raise SystemExit(3)
"""


def test_ray_fail_fast_stops_the_running_job_cleanly(tmp_path):
    """A failure reports its log's end; with fail_fast the concurrent job gets one SIGTERM, finishes its
    checkpoint and is reported interrupted; the queued job never starts."""
    graceful = python_job("graceful", GRACEFUL, tmp_path)
    # The failure waits for the other job's SIGTERM handler (its "running"), not for a fixed time: a loaded
    # machine may start it late.
    fail = python_job("fail", FAIL_WHEN_RUNNING.format(log=graceful.log), tmp_path)
    queued = python_job("queued", "open('queued-ran', 'w')", tmp_path)
    started, ended = [], []
    outcomes, interrupted = run_jobs(
        [fail, graceful, queued],
        Resources(num_cpus=2),
        on_start=lambda job: started.append(job.key),
        on_end=ended.append,
        on_tick=lambda running: None,
        tick_s=60,
        fail_fast=True,
    )
    assert not interrupted and started == ["fail", "graceful"] and outcomes == ended
    by_key = {o.job.key: o for o in outcomes}
    assert by_key["fail"].returncode == 3 and "boom" in by_key["fail"].tail
    assert by_key["graceful"].returncode == INTERRUPTED
    assert Path("stopped").read_text() == "checkpoint" and not Path("queued-ran").exists()
    assert "running" in Path(graceful.log).read_text()


def test_a_stop_file_stops_the_running_fit_cleanly(tmp_path, monkeypatch):
    """Without Ray: the driver's stop file makes the task send SIGTERM; the fit finishes its checkpoint
    and the task reports it interrupted."""
    monkeypatch.chdir(tmp_path)
    job, stop = python_job("graceful", GRACEFUL, tmp_path), tmp_path / "graceful.stop"
    threading.Timer(2.0, stop.touch).start()
    code, seconds, tail = execute(job, str(tmp_path), str(stop))
    assert code == INTERRUPTED and seconds < 60 and "running" in tail
    assert Path("stopped").read_text() == "checkpoint"


@pytest.mark.slow
def test_quickstart_sweep_runs_then_skips_finished_runs(capsys):
    """Two seeds of a tiny quickstart sweep on Ray, then the same command again: nothing left to do."""
    fit_args = ["--", "--model.total_frames", "1000", "--trainer.enable_progress_bar", "false"]
    argv = ["--config", QUICKSTART, "--seeds", "0", "1"]
    assert main([*argv, *fit_args], num_cpus=2) == 0
    out = capsys.readouterr().out
    assert "2 of 2 runs in" in out and "2 succeeded" in out
    assert len(list(Path("checkpoints").glob("*/last.ckpt"))) == 2
    assert main([*argv, "--dry_run", *fit_args]) == 0
    assert "2 finished already, 0 to resume, 0 to start" in capsys.readouterr().out
