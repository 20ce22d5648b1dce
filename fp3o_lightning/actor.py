"""The policy as the collector's actor."""

from __future__ import annotations

from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.envs.utils import ExplorationType, exploration_type

from fp3o_lightning.keys import ACTION, ACTION_MASK, HIDDEN, IS_INIT, LOG_PROB, OBSERVATION
from fp3o_lightning.nets import MultiAgentPolicy


class RolloutActor(TensorDictModuleBase):
    """Reads the observation (and action mask, hidden state), writes the action and, for a recurrent
    policy, ``("next", "rnn_hidden")``; with ``log_prob`` also the action's log-probability.

    Samples under TorchRL's ``ExplorationType.RANDOM`` (as the collector sets it) and takes the
    distribution's deterministic action otherwise (the mean, or the best valid action), as a
    ``ProbabilisticActor`` does. Hand-written because ``TensorDictModule`` + ``ProbabilisticActor``
    cost several times the policy's own arithmetic per rollout step for the paper's small networks.
    Neither the distribution's parameters nor (by default) the log-probability are stored: the update
    recomputes both on the whole batch, so computing them step by step would be wasted (a sixth of
    the policy's time per step).
    """

    def __init__(self, policy: MultiAgentPolicy, masked: bool, log_prob: bool = False) -> None:
        super().__init__()
        self.policy, self.masked, self.log_prob = policy, masked, log_prob
        self.inputs = {"observation": OBSERVATION} | ({"action_mask": ACTION_MASK} if masked else {})
        if policy.recurrent:
            self.inputs |= {"hidden": HIDDEN, "is_init": IS_INIT}
        self.n_params = 1 if policy.discrete else 2
        self.in_keys = list(self.inputs.values())
        self.out_keys = [ACTION] + [LOG_PROB] * log_prob + [("next", HIDDEN)] * policy.recurrent

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        inputs = {name: tensordict.get(key) for name, key in self.inputs.items()}
        outputs = self.policy(**inputs)
        params, mask = outputs[: self.n_params], inputs.get("action_mask")
        deterministic = (exploration_type() or ExplorationType.DETERMINISTIC) != ExplorationType.RANDOM
        action = self.policy.sample(params, mask, deterministic)
        tensordict.set(ACTION, action)
        if self.log_prob:
            tensordict.set(LOG_PROB, self.policy.log_prob(params, action, mask))
        if self.policy.recurrent:
            tensordict.set(("next", HIDDEN), outputs[-1])
        return tensordict
