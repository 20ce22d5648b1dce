"""The progress bar of ``fp3o fit``: policy iterations and frames instead of Lightning's epochs."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class IterationProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting policy iterations, with the frames trained so far out of
    ``total_frames``.

    A run's iterations are the batches of its one epoch, so Lightning's "Epoch 0/0" and the logger's
    version (``v_num``) say nothing about it.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        return "Iteration"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        metrics["frames"] = f"{pl_module.frames:,}/{pl_module.hparams.total_frames:,}"
        return metrics
