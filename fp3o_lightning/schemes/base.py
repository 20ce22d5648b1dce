"""What every update scheme receives and returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from tensordict import TensorDictBase
from torch import Tensor

if TYPE_CHECKING:
    from fp3o_lightning.module import FP3OModule


class UpdateScheme(ABC):
    """One policy iteration's update of the actors (and critic) on a rollout batch.

    ``batch`` is flat (``[B]``) with ``("agents", "observation")``, ``("agents", "action")``,
    ``("agents", "action_log_prob")`` (the rollout's), ``"state"``, ``"advantage"`` (normalised,
    ``[B, 1]``), ``"value_target"`` and ``"value"`` (normalised units). Schemes drive the module's
    ``ppo_phase`` and return scalar/vector tensors to log, keyed by metric name.
    """

    name: str

    @abstractmethod
    def update(self, module: FP3OModule, batch: TensorDictBase) -> dict[str, Tensor]: ...
