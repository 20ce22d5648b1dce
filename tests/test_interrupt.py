"""SIGTERM or Ctrl-C during `fp3o fit` saves a resumable checkpoint; resuming continues count and run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import mlflow
import pytest
from lightning.pytorch.callbacks import Checkpoint

from fp3o_lightning.cli import main

from .test_resume import ARGS
from .test_training import ROOT

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


DDP_STOP_SCRIPT = textwrap.dedent(
    """
    import sys, lightning as L
    sys.path.insert(0, {root!r})
    from tests.conftest import small_module
    from fp3o_lightning.callbacks.interrupt import GracefulStop

    class OnlyRankZeroIsAsked(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            if trainer.global_rank == 0 and module.iteration == 2:  # as if only it had the signal
                (stop,) = [c for c in trainer.callbacks if isinstance(c, GracefulStop)]
                stop.requested = "SIGTERM"

    class Report(L.Callback):
        def on_train_end(self, trainer, module):
            with open(f"{out}.{{trainer.global_rank}}", "w") as file:
                file.write(f"{{module.iteration}} {{module.interrupted}}")

    module = small_module(total_frames=4096, checkpoint_interval=1)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
        default_root_dir={tmp!r}, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[OnlyRankZeroIsAsked(), Report()])
    trainer.fit(module)
    """
)


def test_under_ddp_every_process_stops_at_the_same_iteration(tmp_path):
    """A stop asked of one process stops them all after the same iteration: one going on alone would
    wait forever in the next collective."""
    out = tmp_path / "stopped"
    script = tmp_path / "ddp_stop.py"
    script.write_text(DDP_STOP_SCRIPT.format(root=str(ROOT), out=str(out), tmp=str(tmp_path)))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(out.parent / f"stopped.{rank}").read_text() for rank in (0, 1)] == ["2 SIGTERM"] * 2
