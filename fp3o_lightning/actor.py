"""The policy as the collector's actor."""

from __future__ import annotations

import functools
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import Tensor
from torchrl.envs.utils import ExplorationType, exploration_type

from fp3o_lightning.keys import ACTION, ACTION_MASK, HIDDEN, IS_INIT, LOG_PROB, OBSERVATION
from fp3o_lightning.nets import MultiAgentPolicy


def policy_step(
    policy: MultiAgentPolicy, inputs: dict[str, Tensor], noise: Tensor | None
) -> tuple[Tensor | None, tuple[Tensor, ...]]:
    """The policy's outputs on one step's ``inputs`` and, given a Gaussian's standard ``noise``, its sample
    ``loc + scale * noise`` (what ``torch.normal(loc, scale)`` computes from the same draws)."""
    outputs = policy(**inputs)
    return (None if noise is None else outputs[0] + outputs[1] * noise), outputs


@functools.cache
def compiled_policy_step() -> Any:
    """:func:`policy_step` compiled by ``torch.compile`` (compiled once per input shape, grad mode and
    policy). Made at first use, not at import: made at import, it measured eager rollouts of every run
    slower (see ``benchmarks/train_throughput.py``). The policy is an argument rather than captured, so
    that a copy of the actor (the collector's, on another device) runs its own copy of the policy. The
    noise is drawn outside: a compiled graph draws its own random stream."""
    return torch.compile(policy_step, dynamic=False)


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

    With ``compile`` the policy's step (its networks and a Gaussian's sample, from noise drawn from the
    global generator as eagerly) runs compiled by ``torch.compile``: the same random draws, the actions
    equal to float rounding.
    """

    def __init__(
        self, policy: MultiAgentPolicy, masked: bool, log_prob: bool = False, compile: bool = False
    ) -> None:
        super().__init__()
        self.policy, self.masked, self.log_prob, self.compiled = policy, masked, log_prob, compile
        self.inputs = {"observation": OBSERVATION} | ({"action_mask": ACTION_MASK} if masked else {})
        if policy.recurrent:
            self.inputs |= {"hidden": HIDDEN, "is_init": IS_INIT}
        self.n_params = 1 if policy.discrete else 2
        self.in_keys = list(self.inputs.values())
        self.out_keys = [ACTION] + [LOG_PROB] * log_prob + [("next", HIDDEN)] * policy.recurrent

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        inputs = {name: tensordict.get(key) for name, key in self.inputs.items()}
        deterministic = (exploration_type() or ExplorationType.DETERMINISTIC) != ExplorationType.RANDOM
        action, outputs = self._step(inputs, deterministic)
        params, mask = outputs[: self.n_params], inputs.get("action_mask")
        if action is None:
            action = self.policy.sample(params, mask, deterministic)
        tensordict.set(ACTION, action)
        if self.log_prob:
            tensordict.set(LOG_PROB, self.policy.log_prob(params, action, mask))
        if self.policy.recurrent:
            tensordict.set(("next", HIDDEN), outputs[-1])
        return tensordict

    def _step(self, inputs: dict[str, Tensor], deterministic: bool) -> tuple[Tensor | None, Any]:
        """The action where the compiled step samples it (``None`` otherwise) and the policy's outputs."""
        if not self.compiled:
            return None, self.policy(**inputs)
        noise = None
        if not (self.policy.discrete or deterministic):
            observation = inputs["observation"]
            shape = (*observation.shape[:-1], self.policy.action_size)
            noise = torch.randn(shape, device=observation.device, dtype=observation.dtype)
        return compiled_policy_step()(self.policy, inputs, noise)
