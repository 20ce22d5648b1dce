"""FP3O: the independence phase, then the factor-weighted dependence phase (paper Eq. 9 and 10)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tensordict import TensorDictBase
from torch import Tensor

from fp3o_lightning.keys import ALIVE
from fp3o_lightning.objectives import dependence_factor, dependence_gate, non_overlapping_selection
from fp3o_lightning.schemes.base import UpdateScheme

if TYPE_CHECKING:
    from fp3o_lightning.learner import PPOLearner


class FP3O(UpdateScheme):
    """Full-Pipeline PPO, following the paper's official ``train()`` loop.

    1. **independence phase**: ``ppo_epochs x num_minibatches`` of PPO-clip on every agent with
       factor 1, giving the middle policy ``theta_mid``;
    2. with no grad, ``r_k = pi_mid^k / pi_old^k`` on the whole batch; with ``dependence_advantage``
       ``recompute`` (the paper's code), the advantages are computed again from the returns and the
       rollout's values under the value normaliser as the independence phase left it;
    3. **non-overlapping selection**: a seeded random order of separated agents ``i_p`` and the
       selected agents ``j_p = i_(p+1 mod n)``. Each agent is selected by exactly one pipeline, so
       agent ``j_p``'s factor is the product of every other agent's middle ratio;
    4. **gate**: the dependence phase runs only if it does not lower the batch surrogate (on the
       advantages it will use);
    5. **dependence phase**: another ``ppo_epochs x num_minibatches`` from ``theta_mid`` with agent
       ``j``'s surrogate weighted by ``factor_j`` (detached); ``r_j`` is against the rollout policy.

    The critic is trained on every minibatch of both phases.
    """

    name = "fp3o"

    def update(self, learner: PPOLearner, batch: TensorDictBase) -> dict[str, Tensor]:
        old_log_prob = batch["agents", "action_log_prob"]
        independence = learner.ppo_phase(batch)
        if learner.hparams.dependence_advantage == "recompute":
            learner.recompute_advantages(batch)
        middle_log_prob, kl_old_middle = learner.measure(batch)
        separated_agent, selected_agent = non_overlapping_selection(learner.n_agents, learner.generator)
        factor = dependence_factor(middle_log_prob, old_log_prob)
        alive = batch.get(ALIVE) if learner.alive else None
        gate = dependence_gate(
            middle_log_prob, old_log_prob, batch["advantage"], learner.all_reduce_sum, alive=alive
        )
        stats = {f"{key}_independence": value for key, value in independence.items()}
        if gate:
            dependence = learner.ppo_phase(batch, factor=factor)
            stats.update({f"{key}_dependence": value for key, value in dependence.items()})
        stats.update(
            start_ratio=torch.ones_like(old_log_prob),  # the batch's log-probs are this policy's
            end_kl=learner.measure(batch)[1],
            kl_old_middle=kl_old_middle.mean(0),
            gate=torch.tensor(float(gate)),
            factor_mean=factor.mean(0),
            separated_agent=separated_agent.float(),
            selected_agent=selected_agent.float(),
        )
        return stats
