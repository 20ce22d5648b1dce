"""The paper's MLP (appendix D) and GRU layer, with parameters shared or stacked per agent.

Every layer holds its parameters with a leading *stack* dimension: 1 for a network shared by all
agents, ``n_agents`` for one network per agent (NoPS, PaPS's heads). Stacked layers take inputs
``[..., n_agents, features]`` and apply agent ``i``'s parameters to row ``i`` in one batched
matmul, with no loop over agents.

Hand-written because TorchRL's ``MultiAgentMLP``/``MultiAgentNetBase`` run ``torch.vmap`` over a
``functional_call`` (or swap shared parameters in) on every forward: for the paper's 64-unit
networks that overhead costs 5-15x the arithmetic (measured on a 6-agent NoPS policy: 4.7 ms vs
0.3 ms per rollout step, 12.9 ms vs 1.4 ms per minibatch forward and backward). TorchRL's ``MLP``
also puts the norm before the activation and has no input norm, unlike the paper's network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class StackedLinear(nn.Module):
    """``stacks`` linear layers: weight ``[stacks, out, in]``, orthogonal init with ``gain``, zero bias.

    With one stack it is a plain linear layer over any leading dimensions; with ``n`` stacks the
    input's second-to-last dimension (the agent) must be ``n``.
    """

    def __init__(
        self,
        stacks: int,
        in_features: int,
        out_features: int,
        gain: float,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(stacks, out_features, in_features, device=device))
        self.bias = nn.Parameter(torch.zeros(stacks, out_features, device=device))
        for weight in self.weight:
            nn.init.orthogonal_(weight, gain=gain)

    def forward(self, x: Tensor) -> Tensor:
        stacks, out_features, in_features = self.weight.shape
        if stacks == 1:
            return F.linear(x, self.weight[0], self.bias[0])
        # One batched matmul over the agents ([agent, rows, in] @ [agent, in, out], bias fused):
        # 15-25% faster than the equivalent einsum, forward and backward, at the paper's sizes.
        rows = x.reshape(-1, stacks, in_features).transpose(0, 1)
        out = torch.baddbmm(self.bias.unsqueeze(1), rows, self.weight.transpose(1, 2))
        return out.transpose(0, 1).reshape(*x.shape[:-1], out_features)


class StackedLayerNorm(nn.Module):
    """``stacks`` LayerNorms over the last dimension (affine weight and bias ``[stacks, features]``)."""

    def __init__(self, stacks: int, features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(stacks, features, device=device))
        self.bias = nn.Parameter(torch.zeros(stacks, features, device=device))

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.shape[0] == 1:
            return F.layer_norm(x, x.shape[-1:], self.weight[0], self.bias[0])
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


def paper_mlp(
    in_features: int,
    out_features: int | None,
    depth: int = 2,
    num_cells: int = 64,
    input_norm: bool = True,
    out_gain: float = 0.01,
    stacks: int = 1,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """MLP of the paper's code: ``[LayerNorm(in)] + depth x (Linear, ReLU, LayerNorm) + [Linear]``.

    Orthogonal weights (gain sqrt(2) for hidden layers, ``out_gain`` for the output layer), zero
    biases. ``out_features=None`` ends after the last hidden block (a trunk). ``stacks``: 1 for one
    network, ``n_agents`` for one per agent (inputs ``[..., n_agents, in_features]``).
    """
    layers: list[nn.Module] = [StackedLayerNorm(stacks, in_features, device)] if input_norm else []
    width = in_features
    for _ in range(depth):
        layers += [
            StackedLinear(stacks, width, num_cells, math.sqrt(2.0), device),
            nn.ReLU(),
            StackedLayerNorm(stacks, num_cells, device),
        ]
        width = num_cells
    if out_features is not None:
        layers.append(StackedLinear(stacks, width, out_features, out_gain, device))
    return nn.Sequential(*layers)


class StackedGRU(nn.Module):
    """A GRU step (``nn.GRUCell``'s equations) followed by a LayerNorm, as the paper code's RNN layer.

    ``forward(x [..., in_features], hidden [..., hidden_size])`` returns the normalised output and
    the new hidden state, both ``[..., hidden_size]``; with ``n`` stacks the second-to-last dimension
    is the agent. Orthogonal weights, zero biases.
    """

    def __init__(
        self, stacks: int, in_features: int, hidden_size: int, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.input = StackedLinear(stacks, in_features, 3 * hidden_size, 1.0, device)
        self.recurrent = StackedLinear(stacks, hidden_size, 3 * hidden_size, 1.0, device)
        self.norm = StackedLayerNorm(stacks, hidden_size, device)

    def forward(self, x: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        input_r, input_z, input_n = self.input(x).chunk(3, -1)
        hidden_r, hidden_z, hidden_n = self.recurrent(hidden).chunk(3, -1)
        reset = torch.sigmoid(input_r + hidden_r)
        update = torch.sigmoid(input_z + hidden_z)
        candidate = torch.tanh(input_n + reset * hidden_n)
        hidden = candidate + update * (hidden - candidate)
        return self.norm(hidden), hidden


def gru_sequence(
    rnn: StackedGRU, features: Tensor, hidden: Tensor, is_init: Tensor, every_hidden: bool = False
) -> tuple[Tensor, Tensor]:
    """Run ``rnn`` over sequences: ``features [n, L, ..., in]`` from ``hidden [n, ..., hidden]``, zeroing
    the hidden state where ``is_init [n, L, 1]`` marks an episode start.

    Returns the outputs ``[n, L, ..., hidden]`` and the hidden state after the last step, or with
    ``every_hidden`` the hidden state after every step ``[n, L, ..., hidden]``.
    """
    outputs, hiddens = [], []
    reset = is_init.reshape(*is_init.shape[:2], *([1] * (features.dim() - 2)))
    for t in range(features.shape[1]):  # a loop over time steps, not over agents
        hidden = torch.where(reset[:, t], 0.0, hidden)
        output, hidden = rnn(features[:, t], hidden)
        outputs.append(output)
        hiddens.append(hidden)
    return torch.stack(outputs, 1), torch.stack(hiddens, 1) if every_hidden else hidden
