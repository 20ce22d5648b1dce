"""Checkpoints by policy iteration and by evaluation return, in one directory per MLflow run."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

CHECKPOINT_ROOT = "checkpoints"


class RunCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose default directory is ``checkpoints/<MLflow run id>``.

    Lightning's default for an MLflow logger with a sqlite store is ``./<experiment id>/<run id>``;
    one folder per run under ``checkpoints/`` is easier to find, and ``fp3o fit --ckpt_path last``
    looks there.
    """

    def __init__(self, root: str = CHECKPOINT_ROOT, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            run = next((lg.run_id for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
            if run is None:
                run = f"version_{trainer.logger.version}" if trainer.logger is not None else "run"
            self.dirpath = os.path.join(self.root, str(run))
        super().setup(trainer, pl_module, stage)


class IterationCheckpoint(RunCheckpoint):
    """Saves ``iteration=<k>.ckpt`` every ``every_n_iterations`` policy iterations, and ``last.ckpt``.

    Counted in iterations because in manual optimisation Lightning's ``global_step`` counts
    optimiser steps (one per minibatch, and their number varies with FP3O's gate).
    """

    def __init__(self, every_n_iterations: int = 50, **kwargs: Any) -> None:
        kwargs.setdefault("filename", "iteration={iteration:.0f}")
        kwargs.setdefault("auto_insert_metric_name", False)
        kwargs.setdefault("save_top_k", -1)
        kwargs.setdefault("save_last", True)
        super().__init__(**kwargs)
        self.every_n_iterations = every_n_iterations

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        iteration = pl_module.iteration
        if iteration % self.every_n_iterations == 0 or iteration == pl_module.num_iterations:
            self.save(trainer, pl_module)

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save ``iteration=<k>.ckpt`` and ``last.ckpt`` now (at an iteration boundary)."""
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        candidates["iteration"] = torch.tensor(float(pl_module.iteration))
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Saving is by iteration only."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Saving is by iteration only."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Saving is by iteration only (a resumed fit that trained nothing leaves ``last.ckpt`` as it was)."""


class BestEvalCheckpoint(RunCheckpoint):
    """Keeps the checkpoint with the best ``eval/return_mean`` (``best-iteration=<k>.ckpt``)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("monitor", "eval/return_mean")
        kwargs.setdefault("mode", "max")
        kwargs.setdefault("filename", "best-iteration={iteration:.0f}")
        kwargs.setdefault("auto_insert_metric_name", False)
        kwargs.setdefault("save_top_k", 1)
        super().__init__(**kwargs)
