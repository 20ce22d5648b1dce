"""Gaussian policy with the paper's three network types: FuPS, PaPS and NoPS."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchrl.modules import IndependentNormal

from fp3o_lightning.nets.mlp import AgentMLP

SHARING = ("fups", "paps", "nops")


class GaussianPolicy(nn.Module):
    """Diagonal Gaussian policy ``pi^i(a | o^i)`` for every agent, with state-independent std.

    Network types (``sharing``):

    - ``fups``: full parameter sharing, one network whose input is the observation and the agent id;
    - ``paps``: partial sharing, a shared trunk with a per-agent last layer (and per-agent std);
    - ``nops``: no sharing, one network per agent as stacked parameters under vmap.

    The std is ``sigmoid(log_std / std_x_coef) * std_y_coef`` with ``log_std`` initialised to
    ``std_x_coef``, as in the paper's code. Agents with fewer action dimensions than the padded
    action size get a fixed N(0, 1) on their padding, so it cancels from every ratio and KL.
    """

    def __init__(
        self,
        n_agents: int,
        observation_size: int,
        action_size: int,
        sharing: str = "nops",
        hidden_size: int = 64,
        depth: int = 2,
        gain: float = 0.01,
        std_x_coef: float = 1.0,
        std_y_coef: float = 0.5,
        action_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if sharing not in SHARING:
            raise ValueError(f"sharing={sharing!r} is not a network type; choose one of {', '.join(SHARING)}")
        self.n_agents, self.sharing = n_agents, sharing
        self.std_x_coef, self.std_y_coef = std_x_coef, std_y_coef
        mlp = {"depth": depth, "num_cells": hidden_size}
        if sharing == "fups":
            self.net = AgentMLP(
                observation_size + n_agents, action_size, n_agents, True, out_gain=gain, **mlp
            )
        elif sharing == "paps":
            self.net = nn.Sequential(
                AgentMLP(observation_size, None, n_agents, True, **mlp),
                AgentMLP(hidden_size, action_size, n_agents, False, depth=0, input_norm=False, out_gain=gain),
            )
        else:
            self.net = AgentMLP(observation_size, action_size, n_agents, False, out_gain=gain, **mlp)
        self.log_std = nn.Parameter(
            torch.full((1 if sharing == "fups" else n_agents, action_size), std_x_coef)
        )
        self.register_buffer("agent_id", torch.eye(n_agents))
        sizes = list(action_sizes) if action_sizes is not None else [action_size] * n_agents
        valid = torch.arange(action_size) < torch.tensor(sizes).unsqueeze(-1)
        self.register_buffer("action_valid", None if bool(valid.all()) else valid)

    def forward(self, observation: Tensor) -> tuple[Tensor, Tensor]:
        """Map observations ``[..., n_agents, obs]`` to the Gaussian's ``loc`` and ``scale``.

        Both outputs are ``[..., n_agents, act]``.
        """
        if self.sharing == "fups":
            observation = torch.cat([observation, self.agent_id.expand(*observation.shape[:-1], -1)], -1)
        loc = self.net(observation)
        scale = (torch.sigmoid(self.log_std / self.std_x_coef) * self.std_y_coef).expand_as(loc)
        if self.action_valid is not None:
            loc = torch.where(self.action_valid, loc, 0.0)
            scale = torch.where(self.action_valid, scale, 1.0)
        return loc, scale

    def distribution(self, observation: Tensor) -> IndependentNormal:
        """The joint-action distribution, with one event per agent (``log_prob`` is ``[..., n_agents]``)."""
        return IndependentNormal(*self(observation))

    @property
    def per_agent_parameters(self) -> bool:
        """True when every parameter is stacked per agent (NoPS), so gradients are clipped per agent."""
        return self.sharing == "nops"

    def stacked_parameters(self) -> list[nn.Parameter]:
        """The parameters with a leading agent dimension: all of NoPS, PaPS's heads and std, none of FuPS."""
        if self.sharing == "fups":
            return []
        head = self.net if self.sharing == "nops" else self.net[1]
        return [self.log_std, *head.parameters()]
