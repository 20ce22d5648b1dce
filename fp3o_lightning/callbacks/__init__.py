"""Lightning callbacks: checkpoints by iteration and by evaluation return; graceful interruption."""

from fp3o_lightning.callbacks.checkpoints import BestEvalCheckpoint, IterationCheckpoint, RunCheckpoint
from fp3o_lightning.callbacks.interrupt import GracefulStop

__all__ = ["BestEvalCheckpoint", "GracefulStop", "IterationCheckpoint", "RunCheckpoint"]
