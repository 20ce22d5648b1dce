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

from fp3o_lightning.cli import main

from .test_resume import ARGS

LONG = [*ARGS, "--model.total_frames=1500", "--model.eval_interval=0"]  # checkpoint every iteration


class Slow(L.Callback):
    """Makes each iteration last a while, so that the signal surely lands mid-run."""

    def on_train_batch_end(self, *args) -> None:
        time.sleep(1.0)


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


def test_sigterm_during_evaluation_stops_cleanly(tmp_path):
    """Lightning raises after an evaluation that saw SIGTERM (a FAILED run); the stop must be clean."""
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "fp3o_lightning.cli",
            *ARGS,
            "--model.total_frames=1500",
            "--model.eval_interval=1",
            "--trainer.callbacks+=tests.test_interrupt.TermDuringEvaluation",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM: stopped after iteration 2 " in output, output[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fp3o").experiment_id])
    assert run.info.status == "KILLED"
    evaluated = [m.step for m in client.get_metric_history(run.info.run_id, "eval/return_mean")]
    assert 200 in evaluated  # the evaluation it interrupted (after iteration 2, 200 frames) was logged
    assert list(tmp_path.glob("checkpoints/*/last.ckpt"))
