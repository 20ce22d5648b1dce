"""Optimisation helpers for stacked per-agent parameters (leading agent dimension)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def clip_grad_norm_per_agent(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """Clip the gradient of each agent's network (dim 0 of stacked parameters) to ``max_norm``.

    Vectorised over agents; returns the per-agent norms before clipping, shape ``[n_agents]``: one norm
    over every gradient laid side by side per agent, and one ``torch._foreach`` scaling of them all (a
    handful of ops whatever the number of parameter tensors).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    n_agents = grads[0].shape[0]
    norms = torch.cat([g.reshape(n_agents, -1) for g in grads], 1).norm(dim=1)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    shaped = {dim: coef.view(-1, *([1] * (dim - 1))) for dim in {g.dim() for g in grads}}
    torch._foreach_mul_(grads, [shaped[g.dim()] for g in grads])
    return norms


def clip_gradients(parameters: Sequence[Tensor], max_norm: float, per_agent: bool) -> Tensor:
    """Clip the gradients of one network's ``parameters`` to ``max_norm`` as the paper's code does: per
    agent when every agent has its own network (``per_agent``: NoPS actors, per-agent critics), else over
    all of them. Returns the norms before clipping (``[n_agents]`` or a scalar).

    Takes the parameter list rather than the network: walking a module tree on every minibatch costs
    about as much as the clipping itself."""
    if per_agent:
        return clip_grad_norm_per_agent(parameters, max_norm)
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


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
        # Indices, not a boolean mask: indexing with a mask costs a host sync on every restore.
        self.index = frozen.nonzero().squeeze(-1)
        self.parameters = list(parameters)
        self.optimizer = optimizer
        self.saved = [self._slices(p) for p in self.parameters]

    def _slices(self, parameter: Tensor) -> dict[str, Tensor]:
        state = self.optimizer.state.get(parameter, {})
        saved = {"param": parameter.detach().index_select(0, self.index)}
        for key in ("exp_avg", "exp_avg_sq"):
            saved[key] = (
                state[key].index_select(0, self.index) if key in state else torch.zeros_like(saved["param"])
            )
        return saved

    @torch.no_grad()
    def restore(self) -> None:
        for parameter, saved in zip(self.parameters, self.saved, strict=True):
            parameter.index_copy_(0, self.index, saved["param"])
            state = self.optimizer.state.get(parameter, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].index_copy_(0, self.index, saved[key])


def skip_step_unless_finite(optimizer: torch.optim.Optimizer, tensors: Sequence[Tensor]) -> Tensor:
    """Make the optimiser's next ``step()`` a no-op where any of ``tensors`` (the gradients, or their
    norms) holds a NaN or an Inf.

    No host sync: one foreach kernel (the check AMP's ``GradScaler`` makes, at a scale of 1) sets the
    ``found_inf`` tensor that torch's fused optimisers read, and the fused kernel then leaves parameters,
    moments and step counts as they were. The optimiser must be built with ``fused=True``. Returns
    ``found_inf`` (0-dim float: 1.0 where the step is skipped).
    """
    if not optimizer.defaults.get("fused"):
        raise ValueError("skip_step_unless_finite needs an optimiser built with fused=True")
    found_inf = torch.zeros((), device=tensors[0].device)
    scale = torch.ones((), device=tensors[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found_inf, scale)
    optimizer.found_inf = found_inf
    return found_inf
