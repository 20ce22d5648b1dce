"""Optimisation helpers for stacked per-agent parameters (leading agent dimension)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def clip_grad_norm_per_agent(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """Clip the gradient of each agent's network (dim 0 of stacked parameters) to ``max_norm``.

    Vectorised over agents; returns the per-agent norms before clipping, shape ``[n_agents]``.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
    return norms


class AgentFreezer:
    """Holds some agents' slices of stacked parameters fixed while an optimiser steps the others.

    A zero gradient does not stop Adam: its moments keep moving the parameters. After every
    ``optimizer.step()``, ``restore()`` writes back the frozen agents' parameter slices and their
    Adam moments (``exp_avg``, ``exp_avg_sq``) as they were when the freezer was made. Adam's step
    counter is per tensor, shared by the agents stacked in it.
    """

    def __init__(
        self, parameters: Sequence[Tensor], optimizer: torch.optim.Optimizer, frozen: Tensor
    ) -> None:
        self.frozen = frozen
        self.parameters = list(parameters)
        self.optimizer = optimizer
        self.saved = [self._slices(p) for p in self.parameters]

    def _slices(self, parameter: Tensor) -> dict[str, Tensor]:
        state = self.optimizer.state.get(parameter, {})
        saved = {"param": parameter.detach()[self.frozen].clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            saved[key] = state[key][self.frozen].clone() if key in state else torch.zeros_like(saved["param"])
        return saved

    @torch.no_grad()
    def restore(self) -> None:
        for parameter, saved in zip(self.parameters, self.saved, strict=True):
            parameter[self.frozen] = saved["param"]
            state = self.optimizer.state.get(parameter, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][self.frozen] = saved[key]


class NonFiniteGuard:
    """Undoes an optimiser step whose gradients were not finite, without a host sync.

    ``arm()`` copies the parameters and optimiser state before ``optimizer.step()``; ``settle(ok)``
    keeps the step where the 0-dim bool tensor ``ok`` is true and restores the copies where it is
    false, so a NaN or Inf never reaches the parameters. Hand-written because neither torch nor
    Lightning offers a sync-free conditional step (Lightning's ``detect_anomaly`` only raises).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.saved: list[tuple[Tensor, Tensor, dict[str, Tensor]]] = []

    def arm(self) -> None:
        self.saved = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                tensors = {k: v.clone() for k, v in state.items() if isinstance(v, Tensor)}
                self.saved.append((p, p.detach().clone(), tensors))

    @torch.no_grad()
    def settle(self, ok: Tensor) -> None:
        for p, value, state in self.saved:
            p.copy_(torch.where(ok, p, value))
            for key, current in self.optimizer.state.get(p, {}).items():
                if isinstance(current, Tensor):
                    before = state.get(key, torch.zeros_like(current))  # state created by this step
                    current.copy_(torch.where(ok, current, before))
