"""HAPPO (Kuba et al. 2022): the sequential update scheme FP3O is compared against."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tensordict import TensorDictBase
from torch import Tensor

from fp3o_lightning.schemes.base import UpdateScheme

if TYPE_CHECKING:
    from fp3o_lightning.learner import PPOLearner


class HAPPO(UpdateScheme):
    """Agents updated one at a time in a seeded random order ``i_1..i_n``.

    Agent ``i_m``'s surrogate is weighted by ``M = prod_{l<m} pi_new^{i_l} / pi_old^{i_l}``, each
    ratio measured right after that agent's update. With FuPS or PaPS the shared parameters are
    updated once per agent, in sequence — the setting the FP3O paper criticises (Appendix A), kept
    as it is. With stacked per-agent parameters, the agents not being updated do not move (their
    Adam moments are held too). The critic is updated once per iteration, after the actors.
    """

    name = "happo"

    def update(self, learner: PPOLearner, batch: TensorDictBase) -> dict[str, Tensor]:
        old_log_prob = batch["agents", "action_log_prob"]
        order = torch.randperm(learner.n_agents, generator=learner.generator)
        factor = torch.ones_like(old_log_prob[:, :1])
        start_ratio, end_kl = torch.ones_like(old_log_prob), torch.zeros_like(old_log_prob)
        clip_fraction = torch.zeros(learner.n_agents, device=old_log_prob.device)
        for agent in order.tolist():
            selected = torch.zeros(learner.n_agents, dtype=torch.bool, device=old_log_prob.device)
            selected[agent] = True
            log_prob, _ = learner.measure(batch)
            start_ratio[:, agent] = torch.exp(log_prob[:, agent] - old_log_prob[:, agent])
            phase = learner.ppo_phase(
                batch, factor=factor.expand_as(old_log_prob), agents=selected, train_critic=False
            )
            clip_fraction[agent] = phase["clip_fraction"][agent]
            log_prob, kl = learner.measure(batch)
            end_kl[:, agent] = kl[:, agent]
            factor = factor * torch.exp(log_prob[:, agent : agent + 1] - old_log_prob[:, agent : agent + 1])
        critic = learner.ppo_phase(batch, train_actor=False)
        return {
            "clip_fraction": clip_fraction,
            "value_loss": critic["value_loss"],
            "start_ratio": start_ratio,
            "end_kl": end_kl,
            "update_order": order.float(),
        }
