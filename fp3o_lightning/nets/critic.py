"""Centralised critic on the global state and the running value normaliser."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fp3o_lightning.nets.mlp import paper_mlp


class CentralCritic(nn.Module):
    """``V(s)`` on the global state ``[..., state_size]``; outputs ``[..., 1]`` in normalised value units."""

    def __init__(self, state_size: int, hidden_size: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.net = paper_mlp(state_size, 1, depth=depth, num_cells=hidden_size, out_gain=1.0)

    def forward(self, state: Tensor) -> Tensor:
        return self.net(state)


class LocalCritic(nn.Module):
    """IPPO's decentralised critic ``V^i(o^i)``: observations ``[..., n_agents, obs]`` to ``[..., n_agents]``.

    One network per agent with ``nops``; otherwise one shared network with the agent id as input.
    """

    def __init__(
        self, n_agents: int, observation_size: int, sharing: str, hidden_size: int = 64, depth: int = 2
    ) -> None:
        super().__init__()
        self.shared = sharing != "nops"
        in_features = observation_size + (n_agents if self.shared else 0)
        stacks = 1 if self.shared else n_agents
        self.net = paper_mlp(in_features, 1, depth, hidden_size, out_gain=1.0, stacks=stacks)
        self.register_buffer("agent_id", torch.eye(n_agents))

    def forward(self, observation: Tensor) -> Tensor:
        if self.shared:
            observation = torch.cat([observation, self.agent_id.expand(*observation.shape[:-1], -1)], -1)
        return self.net(observation).squeeze(-1)


class ValueNormalizer(nn.Module):
    """Running mean/std of value targets with debiased exponential averages (the paper code's ValueNorm).

    Hand-written because TorchRL normalises observations and rewards (``VecNorm``) but not value
    targets. The statistics are buffers, so they travel with checkpoints and devices.
    """

    def __init__(self, beta: float = 0.99999, eps: float = 1e-5) -> None:
        super().__init__()
        self.beta, self.eps = beta, eps
        self.register_buffer("running_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("running_mean_sq", torch.zeros((), dtype=torch.float64))
        self.register_buffer("debiasing_term", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, batch_mean: Tensor, batch_mean_sq: Tensor) -> None:
        """Fold in a batch's first and second moments (all-reduce them first under DDP)."""
        self.running_mean.mul_(self.beta).add_(batch_mean.double() * (1.0 - self.beta))
        self.running_mean_sq.mul_(self.beta).add_(batch_mean_sq.double() * (1.0 - self.beta))
        self.debiasing_term.mul_(self.beta).add_(1.0 - self.beta)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        debias = self.debiasing_term.clamp(min=self.eps)
        mean = self.running_mean / debias
        var = (self.running_mean_sq / debias - mean**2).clamp(min=1e-2)
        return mean.float(), var.sqrt().float()

    def normalize(self, value: Tensor) -> Tensor:
        mean, std = self.mean_std()
        return (value - mean) / std

    def denormalize(self, value: Tensor) -> Tensor:
        mean, std = self.mean_std()
        return value * std + mean
