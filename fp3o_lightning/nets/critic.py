"""Critics (a team ``V(s)`` or one value per agent, MLP or recurrent) and the running value normaliser."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fp3o_lightning.nets.mlp import (
    StackedGRU,
    from_agent_major,
    gru_sequence,
    paper_mlp,
    to_agent_major,
    with_agent_id,
)


class Critic(nn.Module):
    """Values ``[..., rows]`` in normalised value units: an MLP, or with ``recurrent`` the paper code's
    recurrent critic (the MLP trunk, a GRU with its hidden state ``[..., rows, hidden_size]``, a linear
    head), which comes with a recurrent actor.

    Subclasses say how their inputs become ``rows`` per-row feature vectors (``rows``).
    """

    def __init__(self, in_features: int, stacks: int, hidden_size: int, depth: int, recurrent: bool) -> None:
        super().__init__()
        self.recurrent, self.hidden_size, self.stacks = recurrent, hidden_size, stacks
        if not recurrent:
            self.net = paper_mlp(in_features, 1, depth, hidden_size, out_gain=1.0, stacks=stacks)
            return
        self.trunk = paper_mlp(in_features, None, depth, hidden_size, stacks=stacks)
        self.rnn = StackedGRU(stacks, hidden_size if depth else in_features, hidden_size)
        self.head = paper_mlp(hidden_size, 1, 0, input_norm=False, out_gain=1.0, stacks=stacks)

    @property
    def per_agent_parameters(self) -> bool:
        """True when every agent has its own critic (stacked parameters), so gradients are clipped per
        agent, as the paper's code clips each agent's separate critic."""
        return self.stacks > 1

    def rows(self, inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, inputs: Tensor, hidden: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """The values of one step; a recurrent critic takes the hidden state before the step (no reset)
        and returns the values and the hidden state after it."""
        if not self.recurrent:
            return self.net(self.rows(inputs)).squeeze(-1)
        output, hidden = self.rnn(self.trunk(self.rows(inputs)), hidden)
        return self.head(output).squeeze(-1), hidden

    def sequence(self, inputs: Tensor, hidden: Tensor, is_init: Tensor) -> tuple[Tensor, Tensor]:
        """A recurrent critic over sequences ``inputs [n, L, ...]`` from ``hidden [n, rows, hidden]``,
        reset where ``is_init [n, L, 1]``: the values ``[n, L, rows]`` and the hidden state after every
        step ``[n, L, rows, hidden]``."""
        features = self.trunk(self.rows(inputs))
        outputs, hiddens = gru_sequence(self.rnn, features, hidden, is_init, every_hidden=True)
        return self.head(outputs).squeeze(-1), hiddens


class CentralCritic(Critic):
    """``V(s)`` on the global state ``[..., state_size]``; outputs ``[..., 1]``."""

    def __init__(
        self, state_size: int, hidden_size: int = 64, depth: int = 2, recurrent: bool = False
    ) -> None:
        super().__init__(state_size, 1, hidden_size, depth, recurrent)
        self.n_rows = 1

    def rows(self, inputs: Tensor) -> Tensor:
        return inputs.unsqueeze(-2)


class AgentCritic(Critic):
    """One value per agent, ``[..., n_agents]``.

    The input is either per-agent (``[..., n_agents, in_features]``, e.g. IPPO's observations) or one
    global state ``[..., in_features]`` that every agent reads (``per_agent_input=False``: the paper
    code's ``V(s, i)``, the state with the agent's id). With ``nops`` every agent has its own network
    (stacked parameters); otherwise one network is shared and the agent's one-hot id is appended to
    its input. ``agent_id`` appends the id for ``nops`` too, as the paper's code does for every type.
    """

    def __init__(
        self,
        n_agents: int,
        in_features: int,
        sharing: str,
        hidden_size: int = 64,
        depth: int = 2,
        *,
        per_agent_input: bool = True,
        agent_id: bool = False,
        recurrent: bool = False,
    ) -> None:
        append_id = sharing != "nops" or agent_id
        in_features += n_agents if append_id else 0
        super().__init__(in_features, n_agents if sharing == "nops" else 1, hidden_size, depth, recurrent)
        self.n_agents, self.per_agent_input, self.append_id = n_agents, per_agent_input, append_id
        self.n_rows = n_agents
        self.register_buffer("agent_id", torch.eye(n_agents))

    def forward(self, inputs: Tensor, hidden: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if self.recurrent or self.net.stacks == 1:
            return super().forward(inputs, hidden)
        # One MLP per agent: the rows are built straight in the stacked MLP's agent-major layout.
        if self.per_agent_input:
            rows, leading = to_agent_major(inputs, self.n_agents), inputs.shape[:-1]
        else:
            rows = inputs.reshape(1, -1, inputs.shape[-1]).expand(self.n_agents, -1, -1)
            leading = (*inputs.shape[:-1], self.n_agents)
        values = self.net.agent_major(with_agent_id(rows, self.agent_id if self.append_id else None))
        return from_agent_major(values, leading).squeeze(-1)

    def rows(self, inputs: Tensor) -> Tensor:
        if not self.per_agent_input:
            inputs = inputs.unsqueeze(-2).expand(*inputs.shape[:-1], self.n_agents, inputs.shape[-1])
        if self.append_id:
            inputs = torch.cat([inputs, self.agent_id.expand(*inputs.shape[:-1], -1)], -1)
        return inputs


class ValueNormalizer(nn.Module):
    """Running mean/std of value targets with debiased exponential averages (the paper code's ValueNorm).

    ``size`` statistics: 1 for one normaliser over every value, or ``n_agents`` for one per agent (the
    paper code's NoPS, where each agent's critic has its own). Hand-written because TorchRL normalises
    observations and rewards (``VecNorm``) but not value targets. The statistics are buffers, so they
    travel with checkpoints and devices.
    """

    def __init__(self, size: int = 1, beta: float = 0.99999, eps: float = 1e-5) -> None:
        super().__init__()
        self.beta, self.eps = beta, eps
        self.register_buffer("running_mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("running_mean_sq", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("debiasing_term", torch.zeros((), dtype=torch.float64))

    def moments(self, target: Tensor) -> Tensor:
        """``[2, size]``: the mean and mean square of ``target [..., width]`` per statistic (over every
        element when ``size`` is 1, per last-dimension column otherwise)."""
        target = target.detach().double()
        if self.running_mean.numel() == 1:
            target = target.reshape(-1, 1)
        flat = target.reshape(-1, target.shape[-1])
        return torch.stack([flat.mean(0), flat.pow(2).mean(0)])

    @torch.no_grad()
    def update(self, moments: Tensor, times: int = 1) -> None:
        """Fold in a batch's ``moments`` (all-reduce them first under DDP) ``times`` times in a row:
        ``x <- w x + (1 - w) m`` with ``w = beta ** times`` for both moments and the debiasing term (the
        closed form of ``times`` folds of the same batch), in two foreach calls and one ``add_`` (it runs
        at every minibatch)."""
        weight = self.beta**times
        statistics = [self.running_mean, self.running_mean_sq]
        torch._foreach_mul_([*statistics, self.debiasing_term], weight)
        torch._foreach_add_(statistics, list((moments * (1.0 - weight)).unbind(0)))
        self.debiasing_term.add_(1.0 - weight)

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

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Checkpoints written before per-agent statistics hold 0-dim running moments.
        for name in ("running_mean", "running_mean_sq"):
            if state_dict.get(prefix + name, torch.zeros(1)).dim() == 0:
                state_dict[prefix + name] = state_dict[prefix + name].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args)
