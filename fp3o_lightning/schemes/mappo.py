"""MAPPO and IPPO: one PPO-clip phase on all agents at once."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tensordict import TensorDictBase
from torch import Tensor

from fp3o_lightning.schemes.base import UpdateScheme

if TYPE_CHECKING:
    from fp3o_lightning.learner import PPOLearner


class MAPPO(UpdateScheme):
    """MAPPO (Yu et al. 2022): ``ppo_epochs x num_minibatches`` of PPO-clip on every agent and the
    centralised critic ``V(s)``."""

    name = "mappo"

    def update(self, learner: PPOLearner, batch: TensorDictBase) -> dict[str, Tensor]:
        stats = learner.ppo_phase(batch)
        stats.update(
            start_ratio=torch.ones_like(batch["agents", "action_log_prob"]),  # see UpdateScheme
            end_kl=learner.measure(batch)[1],
        )
        return stats


class IPPO(MAPPO):
    """IPPO (de Witt et al. 2020): MAPPO with a decentralised critic, each agent's value from its
    own observation."""

    name = "ippo"
    local_critic = True
