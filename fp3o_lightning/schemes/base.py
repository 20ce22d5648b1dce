"""What every update scheme receives and returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from tensordict import TensorDictBase
from torch import Tensor

if TYPE_CHECKING:
    from fp3o_lightning.learner import PPOLearner


class UpdateScheme(ABC):
    """One policy iteration's update of the actors (and critic) on a rollout batch.

    ``batch`` is flat (``[B]``) with ``("agents", "observation")``, ``("agents", "action")``,
    ``("agents", "action_log_prob")`` (the rollout's), the rollout Gaussian's ``("agents", "loc")``
    and ``("agents", "scale")``, ``"state"``, ``"advantage"`` (normalised, ``[B, 1]`` for a team
    critic, ``[B, n_agents]`` for one value per agent), ``"value"`` (the critic's, normalised units) and
    ``"value_target"`` (GAE's return, denormalised: the value loss normalises it when it is used).
    The log-probs and the Gaussian's parameters are the current policy's (``compute_advantages`` recomputes
    them on the whole batch), so an update that starts from it starts at a ratio of exactly 1, without
    measuring it again.

    Schemes drive a ``PPOLearner`` (``learner.ppo_phase``, ``learner.measure``) and return tensors to
    log, keyed by metric name, including the diagnostics ``start_ratio`` and ``end_kl`` (``[B, n_agents]``):
    each agent's ratio to the rollout policy when its update starts, and KL(old || new) when it ends.
    """

    name: ClassVar[str]
    #: IPPO's decentralised critic ``V^i(o^i)`` instead of the centralised ``V(s)``.
    local_critic: ClassVar[bool] = False

    @abstractmethod
    def update(self, learner: PPOLearner, batch: TensorDictBase) -> dict[str, Tensor]: ...
