"""Lightning callbacks: checkpoints by iteration and by evaluation return; graceful interruption; the
iteration progress bar."""

from fp3o_lightning.callbacks.checkpoints import BestEvalCheckpoint, IterationCheckpoint, RunCheckpoint
from fp3o_lightning.callbacks.interrupt import GracefulStop
from fp3o_lightning.callbacks.progress import IterationProgressBar

__all__ = [
    "BestEvalCheckpoint",
    "GracefulStop",
    "IterationCheckpoint",
    "IterationProgressBar",
    "RunCheckpoint",
]
