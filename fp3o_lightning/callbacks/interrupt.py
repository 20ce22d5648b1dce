"""SIGTERM or Ctrl-C during ``fit``: finish the iteration, save a resumable checkpoint, stop cleanly."""

from __future__ import annotations

import signal
import threading
from functools import partial
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
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {
                signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint),
                signal.SIGTERM: signal.signal(signal.SIGTERM, partial(self._on_sigterm, trainer)),
            }

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = "Ctrl-C"
        rank_zero_info("\nCtrl-C: finishing this iteration and saving a checkpoint (Ctrl-C again to abort)")

    def _on_sigterm(self, trainer: L.Trainer, signum: int, frame: Any) -> None:
        """Lightning's handler (it logs the signal and passes it on to DDP's worker processes), then a
        request for a clean stop. Lightning's flag is cleared here rather than at the iteration's end,
        as its loops check it at points after this callback's hooks (a signal there would raise, lose
        the iteration and mark the run FAILED)."""
        previous = self._previous.get(signal.SIGTERM)
        if callable(previous):
            previous(signum, frame)
        trainer._signal_connector.received_sigterm = False
        self.requested = self.requested or "SIGTERM"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._stop_if_requested(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A signal during the evaluation that follows an iteration stops right after it, not one
        iteration later."""
        if trainer.state.fn == "fit":
            self._stop_if_requested(trainer, pl_module)

    def _stop_if_requested(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.received_sigterm:  # only Lightning's handler ran (fit outside the main thread)
            self.requested = "SIGTERM"
            trainer._signal_connector.received_sigterm = False  # we stop cleanly instead of raising
        # Under DDP every process stops at the same boundary if any was asked to (one all-reduce an
        # iteration): a process that went on alone would wait forever in the next collective.
        if not trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False):
            return
        self.requested = self.requested or "SIGTERM"  # another process received it
        if trainer.should_stop:
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
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
