"""SIGTERM or Ctrl-C during `fp3o fit` saves a resumable checkpoint; resuming continues count and run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import mlflow
import pytest
from lightning.pytorch.callbacks import Checkpoint

from fp3o_lightning.cli import main

from .test_resume import ARGS

LONG = [*ARGS, "--model.total_frames=1500", "--model.eval_interval=0"]  # checkpoint every iteration


class Slow(L.Callback):
    """Makes each iteration last a while, so that the signal surely lands mid-run."""

    def on_train_batch_end(self, *args) -> None:
        time.sleep(1.0)


class TermAfterTheStopCheck(Checkpoint):
    """Sends this process SIGTERM at the end of iteration 2, after ``GracefulStop`` has looked for one
    (Lightning runs ``Checkpoint`` callbacks last), where Lightning's own check would raise."""

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)


class TermDuringEvaluation(L.Callback):
    """Sends this process SIGTERM while the evaluation after iteration 2 runs."""

    def on_validation_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.iteration >= 2:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_saves_a_checkpoint_and_resume_continues(tmp_path, monkeypatch, signum):
    process = subprocess.Popen(
        [sys.executable, "-m", "fp3o_lightning.cli", *LONG, "--trainer.callbacks+=tests.test_interrupt.Slow"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},  # for the Slow callback
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("checkpoints/*/iteration=2.ckpt")) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.2)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    resume = r"resume +fp3o fit .* --ckpt_path checkpoints/\w+/last\.ckpt --model\.total_frames 1500"
    assert "fp3o fit interrupted" in output and re.search(resume, output)
    (checkpoint,) = tmp_path.glob("checkpoints/*/last.ckpt")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fp3o").experiment_id])
    assert run.info.status == "KILLED"
    stopped_at = int(run.data.metrics["train/iteration"])
    assert stopped_at >= 2

    monkeypatch.chdir(tmp_path)
    main([*LONG, "--ckpt_path=last"])
    (run,) = client.search_runs([client.get_experiment_by_name("fp3o").experiment_id])
    frames = [m.step for m in client.get_metric_history(run.info.run_id, "train/iteration")]
    assert run.info.status == "FINISHED"
    assert stopped_at < 15 and sorted(set(frames)) == list(range(100, 1501, 100))  # the count continued


@pytest.mark.parametrize(
    ("callback", "options", "stopped_at"),
    [
        ("TermDuringEvaluation", ["--model.eval_interval=1"], 2),
        ("TermAfterTheStopCheck", ["--model.eval_interval=0"], 3),
    ],
    ids=["during-evaluation", "after-the-stop-check"],
)
def test_sigterm_anywhere_in_an_iteration_stops_cleanly(tmp_path, callback, options, stopped_at):
    """Lightning raises (a FAILED run, the iteration lost) when it sees SIGTERM at one of its own checks:
    after an evaluation, or after the callbacks of an iteration. The stop must be clean wherever the
    signal lands: at the next iteration boundary (right after the evaluation it interrupted)."""
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "fp3o_lightning.cli",
            *ARGS,
            "--model.total_frames=1500",
            *options,
            f"--trainer.callbacks+=tests.test_interrupt.{callback}",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-3000:]
    assert f"SIGTERM: stopped after iteration {stopped_at} " in output, output[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fp3o").experiment_id])
    assert run.info.status == "KILLED"
    assert list(tmp_path.glob(f"checkpoints/*/iteration={stopped_at}.ckpt"))
    if "--model.eval_interval=1" in options:
        evaluated = [m.step for m in client.get_metric_history(run.info.run_id, "eval/return_mean")]
        assert 200 in evaluated  # the evaluation it interrupted (after iteration 2, 200 frames) was logged
