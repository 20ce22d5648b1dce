"""SIGTERM or Ctrl-C during ``fit``: finish the iteration, save a resumable checkpoint, stop cleanly."""

from __future__ import annotations

import signal
import threading
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from fp3o_lightning.callbacks.checkpoints import IterationCheckpoint


class GracefulStop(L.Callback):
    """Turns SIGTERM and a first Ctrl-C into a clean stop at the end of the current iteration.

    The checkpoint is written at that iteration boundary (``last.ckpt``), like the periodic ones,
    so ``fp3o fit … --ckpt_path last`` continues exactly. A second Ctrl-C aborts at once. Lightning's
    own SIGTERM handling raises instead, which would lose the iteration in progress.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous_sigint: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested = None
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = "Ctrl-C"
        rank_zero_info("\nCtrl-C: finishing this iteration and saving a checkpoint (Ctrl-C again to abort)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._stop_if_requested(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A signal during the evaluation that follows an iteration stops there too: Lightning would
        otherwise raise after the evaluation and mark the run FAILED."""
        if trainer.state.fn == "fit":
            self._stop_if_requested(trainer, pl_module)

    def _stop_if_requested(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.received_sigterm:
            self.requested = "SIGTERM"
            trainer._signal_connector.received_sigterm = False  # we stop cleanly instead of raising
        if not self.requested or trainer.should_stop:
            return
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, IterationCheckpoint):
                callback.save(trainer, pl_module)
        pl_module.interrupted = self.requested
        trainer.should_stop = True
        rank_zero_info(
            f"{self.requested}: stopped after iteration {pl_module.iteration} ({pl_module.frames} frames)"
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
