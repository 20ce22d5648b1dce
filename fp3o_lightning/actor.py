"""The policy as the collector's actor."""

from __future__ import annotations

from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.envs.utils import ExplorationType, exploration_type

from fp3o_lightning.keys import (
    ACTION,
    ACTION_MASK,
    HIDDEN,
    IS_INIT,
    LOC,
    LOG_PROB,
    LOGITS,
    OBSERVATION,
    SCALE,
)
from fp3o_lightning.nets import MultiAgentPolicy


class RolloutActor(TensorDictModuleBase):
    """Reads the observation (and action mask, hidden state), writes the action, its log-prob, the
    distribution's parameters and, for a recurrent policy, ``("next", "rnn_hidden")``.

    Samples under TorchRL's ``ExplorationType.RANDOM`` (as the collector sets it) and takes the
    distribution's deterministic action otherwise (the mean, or the best valid action), as a
    ``ProbabilisticActor`` does. Hand-written because ``TensorDictModule`` + ``ProbabilisticActor``
    cost several times the policy's own arithmetic per rollout step for the paper's small networks.
    """

    def __init__(self, policy: MultiAgentPolicy, masked: bool) -> None:
        super().__init__()
        self.policy, self.masked = policy, masked
        self.inputs = {"observation": OBSERVATION} | ({"action_mask": ACTION_MASK} if masked else {})
        if policy.recurrent:
            self.inputs |= {"hidden": HIDDEN, "is_init": IS_INIT}
        self.param_keys = (LOGITS,) if policy.discrete else (LOC, SCALE)
        self.in_keys = list(self.inputs.values())
        self.out_keys = [ACTION, LOG_PROB, *self.param_keys]
        if policy.recurrent:
            self.out_keys.append(("next", HIDDEN))

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        inputs = {name: tensordict.get(key) for name, key in self.inputs.items()}
        outputs = self.policy(**inputs)
        params = outputs[: len(self.param_keys)]
        distribution = self.policy.make_distribution(params, inputs.get("action_mask"))
        if (exploration_type() or ExplorationType.DETERMINISTIC) == ExplorationType.RANDOM:
            action = distribution.sample()
        else:
            action = distribution.deterministic_sample
        tensordict.set(ACTION, action)
        tensordict.set(LOG_PROB, distribution.log_prob(action))
        for key, value in zip(self.param_keys, params, strict=True):
            tensordict.set(key, value)
        if self.policy.recurrent:
            tensordict.set(("next", HIDDEN), outputs[-1])
        return tensordict
