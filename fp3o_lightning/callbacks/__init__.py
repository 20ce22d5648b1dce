"""Lightning callbacks: checkpoints by policy iteration and by evaluation return."""

from fp3o_lightning.callbacks.checkpoints import BestEvalCheckpoint, IterationCheckpoint, RunCheckpoint

__all__ = ["BestEvalCheckpoint", "IterationCheckpoint", "RunCheckpoint"]
