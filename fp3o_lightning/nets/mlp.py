"""The paper's MLP (appendix D) and its per-agent stacking over TorchRL's multi-agent machinery."""

from __future__ import annotations

import torch
from torch import nn
from torchrl.modules.models.multiagent import MultiAgentNetBase


def paper_mlp(
    in_features: int,
    out_features: int | None,
    depth: int = 2,
    num_cells: int = 64,
    input_norm: bool = True,
    out_gain: float = 0.01,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """MLP of the paper's code: ``[LayerNorm(in)] + depth x (Linear, ReLU, LayerNorm) + [Linear]``.

    Orthogonal weights (gain sqrt(2) for hidden layers, ``out_gain`` for the output layer), zero
    biases. ``out_features=None`` ends after the last hidden block (a trunk). TorchRL's ``MLP`` puts
    the norm before the activation and has no input norm, so it cannot express this network.
    """
    layers: list[nn.Module] = [nn.LayerNorm(in_features, device=device)] if input_norm else []
    width = in_features
    for _ in range(depth):
        layers += [
            nn.Linear(width, num_cells, device=device),
            nn.ReLU(),
            nn.LayerNorm(num_cells, device=device),
        ]
        width = num_cells
    if out_features is not None:
        layers.append(nn.Linear(width, out_features, device=device))
    if str(device) != "meta":
        linears = [m for m in layers if isinstance(m, nn.Linear)]
        for layer in linears:
            gain = (
                out_gain
                if layer is linears[-1] and out_features is not None
                else nn.init.calculate_gain("relu")
            )
            nn.init.orthogonal_(layer.weight, gain=gain)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class AgentMLP(MultiAgentNetBase):
    """``paper_mlp`` for every agent: one shared copy, or stacked per-agent parameters under vmap.

    Input ``[..., n_agents, in_features]``, output ``[..., n_agents, out_features]``. With
    ``share_params=False`` the agents' parameters are stacked on a leading agent dimension and run
    in a single vmapped call (no Python loop over agents).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | None,
        n_agents: int,
        share_params: bool,
        depth: int = 2,
        num_cells: int = 64,
        input_norm: bool = True,
        out_gain: float = 0.01,
        device: torch.device | str | None = None,
    ) -> None:
        self.in_features = in_features
        super().__init__(
            n_agents=n_agents,
            centralized=False,
            share_params=share_params,
            agent_dim=-2,
            in_features=in_features,
            out_features=out_features,
            depth=depth,
            num_cells=num_cells,
            input_norm=input_norm,
            out_gain=out_gain,
            device=device,
        )

    def _build_single_net(self, *, device, **kwargs) -> nn.Module:
        return paper_mlp(device=device, **kwargs)

    def _pre_forward_check(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[-2:] != (self.n_agents, self.in_features):
            raise ValueError(
                f"AgentMLP expects inputs [..., {self.n_agents}, {self.in_features}], "
                f"got {tuple(inputs.shape)}"
            )
        return inputs
