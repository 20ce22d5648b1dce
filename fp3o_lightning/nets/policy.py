"""Multi-agent policies with the paper's three network types (FuPS, PaPS, NoPS), for continuous
(Gaussian) or discrete (masked categorical) actions, with an MLP or a recurrent (GRU) actor."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution
from torchrl.modules import IndependentNormal, MaskedCategorical

from fp3o_lightning.nets.mlp import (
    StackedGRU,
    from_agent_major,
    gru_sequence,
    paper_mlp,
    to_agent_major,
    with_agent_id,
)

SHARING = ("fups", "paps", "nops")
ACTOR_NETWORKS = ("mlp", "rnn")
LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def gaussian_log_prob(loc: Tensor, scale: Tensor, value: Tensor) -> Tensor:
    """``IndependentNormal(loc, scale).log_prob(value)`` (the last dimension is the event).

    Written out because building the distribution objects (and validating their arguments) costs more
    than this arithmetic for the paper's small action spaces, at every rollout step and minibatch.
    """
    return (-0.5 * ((value - loc) / scale).square() - scale.log() - LOG_SQRT_2PI).sum(-1)


def gaussian_entropy(scale: Tensor) -> Tensor:
    """``IndependentNormal(loc, scale).entropy()``, written out as :func:`gaussian_log_prob` is."""
    return (scale.log() + (0.5 + LOG_SQRT_2PI)).sum(-1)


class MultiAgentPolicy(nn.Module):
    """``pi^i(a^i | o^i)`` for every agent: a trunk, an optional GRU, and an output layer.

    Network types (``sharing``):

    - ``fups``: full parameter sharing; one network whose input is the observation and the agent id;
    - ``paps``: partial sharing; shared trunk (and GRU), per-agent output layer (and per-agent std);
    - ``nops``: no sharing; every agent has its own network, as stacked parameters under vmap.

    Continuous actions: a diagonal Gaussian with state-independent std ``sigmoid(log_std / x) * y``
    (``log_std`` starts at ``x``, as in the paper's code); agents with fewer action dimensions than
    the padded size get a fixed N(0, 1) on the padding, which cancels from every ratio and KL.
    Discrete actions (``n_actions``): a categorical over the logits, masked by the environment's
    ``action_mask`` (an invalid action has probability 0 and the mode is the best valid action).

    ``agent_id`` appends the agent's one-hot id to the observation for every network type, as the
    paper's code does (FuPS always gets it: its one network needs it to tell the agents apart).

    Recurrent actors (``actor_network="rnn"``, Table 7) carry a hidden state ``[..., n_agents,
    hidden_size]`` that is zeroed where ``is_init`` marks an episode start.
    """

    def __init__(
        self,
        n_agents: int,
        observation_size: int,
        action_size: int | None = None,
        sharing: str = "nops",
        *,
        n_actions: int | None = None,
        actor_network: str = "mlp",
        hidden_size: int = 64,
        depth: int = 2,
        gain: float = 0.01,
        std_x_coef: float = 1.0,
        std_y_coef: float = 0.5,
        action_sizes: Sequence[int] | None = None,
        agent_id: bool = False,
    ) -> None:
        super().__init__()
        if sharing not in SHARING:
            raise ValueError(f"sharing={sharing!r} is not a network type; choose one of {', '.join(SHARING)}")
        if actor_network not in ACTOR_NETWORKS:
            raise ValueError(f"actor_network={actor_network!r} is unknown; choose one of {ACTOR_NETWORKS}")
        if (action_size is None) == (n_actions is None):
            raise ValueError("give either action_size (continuous actions) or n_actions (discrete actions)")
        self.n_agents, self.sharing, self.hidden_size = n_agents, sharing, hidden_size
        self.action_size = action_size  # None for discrete actions
        self.discrete, self.recurrent = n_actions is not None, actor_network == "rnn"
        self.std_x_coef, self.std_y_coef = std_x_coef, std_y_coef
        self.append_id = sharing == "fups" or agent_id
        in_features = observation_size + (n_agents if self.append_id else 0)
        trunk_stacks = n_agents if sharing == "nops" else 1
        self.trunk = paper_mlp(in_features, None, depth, hidden_size, stacks=trunk_stacks)
        width = hidden_size if depth else in_features
        self.rnn = StackedGRU(trunk_stacks, width, hidden_size) if self.recurrent else None
        width = hidden_size if self.recurrent else width
        out_features = n_actions if self.discrete else action_size
        head_stacks = 1 if sharing == "fups" else n_agents
        self.head = paper_mlp(width, out_features, 0, input_norm=False, out_gain=gain, stacks=head_stacks)
        self.register_buffer("agent_id", torch.eye(n_agents))
        if self.discrete:
            self.register_parameter("log_std", None)
            self.register_buffer("action_valid", None)
            return
        std_rows = 1 if sharing == "fups" else n_agents
        self.log_std = nn.Parameter(torch.full((std_rows, action_size), std_x_coef))
        sizes = list(action_sizes) if action_sizes is not None else [action_size] * n_agents
        valid = torch.arange(action_size) < torch.tensor(sizes).unsqueeze(-1)
        self.register_buffer("action_valid", None if bool(valid.all()) else valid)

    @property
    def distribution_keys(self) -> tuple[str, ...]:
        """Names of the tensors :meth:`forward` returns (before the next hidden state)."""
        return ("logits",) if self.discrete else ("loc", "scale")

    def forward(
        self,
        observation: Tensor,
        action_mask: Tensor | None = None,
        hidden: Tensor | None = None,
        is_init: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """One step: observations ``[..., n_agents, obs]`` to the distribution's parameters.

        Returns ``(loc, scale)`` or ``(logits,)`` (``[..., n_agents, act]``), followed by the next
        hidden state for a recurrent actor (which needs ``hidden`` and ``is_init`` ``[..., 1]``).
        """
        if not self.recurrent:
            return self._params(self._mlp(observation), action_mask)
        outputs = self.sequence(
            observation.unsqueeze(-3),
            hidden,
            is_init.unsqueeze(-2),
            None if action_mask is None else action_mask.unsqueeze(-3),
        )
        *params, hidden = outputs
        return (*(p.squeeze(-3) for p in params), hidden)

    def sequence(
        self, observation: Tensor, hidden: Tensor, is_init: Tensor, action_mask: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """A recurrent actor over sequences: ``observation [n, L, n_agents, obs]``, the hidden state
        at the first step ``[n, n_agents, hidden]``, ``is_init [n, L, 1]``. Returns the parameters
        ``[n, L, n_agents, ...]`` and the hidden state after the last step."""
        outputs, hidden = gru_sequence(self.rnn, self.trunk(self._inputs(observation)), hidden, is_init)
        return (*self._params(self.head(outputs), action_mask), hidden)

    def _inputs(self, observation: Tensor) -> Tensor:
        if self.append_id:
            return torch.cat([observation, self.agent_id.expand(*observation.shape[:-1], -1)], -1)
        return observation

    def _mlp(self, observation: Tensor) -> Tensor:
        """The output layer's values on ``observation`` (MLP actor). With NoPS, trunk and head both run
        agent-major, the observation entering that layout with its agent id in one ``cat``."""
        if self.sharing != "nops":
            return self.head(self.trunk(self._inputs(observation)))
        agent_id = self.agent_id if self.append_id else None
        x = with_agent_id(to_agent_major(observation, self.n_agents), agent_id)
        return from_agent_major(self.head.agent_major(self.trunk.agent_major(x)), observation.shape[:-1])

    def _params(self, out: Tensor, action_mask: Tensor | None) -> tuple[Tensor, ...]:
        """The distribution's parameters from the output layer's values."""
        if self.discrete:
            return (out,)
        scale = (torch.sigmoid(self.log_std / self.std_x_coef) * self.std_y_coef).expand_as(out)
        if self.action_valid is not None:
            out = torch.where(self.action_valid, out, 0.0)
            scale = torch.where(self.action_valid, scale, 1.0)
        return out, scale

    def make_distribution(self, params: Sequence[Tensor], action_mask: Tensor | None = None) -> Distribution:
        """The joint-action distribution, one event per agent (``log_prob`` is ``[..., n_agents]``)."""
        if self.discrete:
            return MaskedCategorical(logits=params[0], mask=action_mask)
        return IndependentNormal(*params, validate_args=False)  # the parameters are valid by construction

    def log_prob(self, params: Sequence[Tensor], action: Tensor, action_mask: Tensor | None = None) -> Tensor:
        """The log-probability ``[..., n_agents]`` of ``action`` under the distribution of ``params``."""
        if self.discrete:
            return self.make_distribution(params, action_mask).log_prob(action)
        return gaussian_log_prob(*params, action)

    def entropy(self, params: Sequence[Tensor], action_mask: Tensor | None = None) -> Tensor:
        """The entropy ``[..., n_agents]`` of the distribution of ``params``."""
        if self.discrete:
            return self.make_distribution(params, action_mask).entropy()
        return gaussian_entropy(params[1])

    def sample(
        self, params: Sequence[Tensor], action_mask: Tensor | None = None, deterministic: bool = False
    ) -> Tensor:
        """An action of the distribution of ``params``: sampled, or its deterministic one (the mean, the
        best valid action)."""
        if self.discrete:
            distribution = self.make_distribution(params, action_mask)
            return distribution.deterministic_sample if deterministic else distribution.sample()
        loc, scale = params
        return loc if deterministic else torch.normal(loc, scale)  # as Normal.sample draws

    def distribution(self, observation: Tensor, action_mask: Tensor | None = None) -> Distribution:
        """The distribution of an MLP actor at ``observation``."""
        return self.make_distribution(self(observation, action_mask), action_mask)

    def batch_params(
        self,
        observation: Tensor,
        action_mask: Tensor | None = None,
        hidden: Tensor | None = None,
        is_init: Tensor | None = None,
        chunk_length: int = 1,
    ) -> tuple[Tensor, ...]:
        """Distribution parameters on a flat update batch ``[B, ...]``.

        A recurrent actor reads the batch as ``B / chunk_length`` consecutive sequences of
        ``chunk_length`` steps (rollout order) and replays each from the hidden state its rollout
        had at the chunk's first step, resetting at episode starts.
        """
        if not self.recurrent:
            return self(observation, action_mask)

        def chunks(x: Tensor) -> Tensor:
            return x.reshape(-1, chunk_length, *x.shape[1:])

        mask = None if action_mask is None else chunks(action_mask)
        *params, _ = self.sequence(chunks(observation), chunks(hidden)[:, 0], chunks(is_init), mask)
        return tuple(p.flatten(0, 1) for p in params)

    @property
    def per_agent_parameters(self) -> bool:
        """True when every parameter is stacked per agent (NoPS), so gradients are clipped per agent."""
        return self.sharing == "nops"

    def head_parameters(self) -> list[nn.Parameter]:
        """The output layer's parameters and the log-std (the per-agent part of PaPS)."""
        return [p for p in (self.log_std, *self.head.parameters()) if p is not None]

    def stacked_parameters(self) -> list[nn.Parameter]:
        """Parameters with a leading agent dimension: all of NoPS, PaPS's head and std, none of FuPS."""
        if self.sharing == "fups":
            return []
        if self.sharing == "nops":
            return list(self.parameters())
        return self.head_parameters()
