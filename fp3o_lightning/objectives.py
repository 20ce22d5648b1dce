"""Pure tensor maths of FP3O (paper Sections 4.2-4.3, Eq. 9 and 10) and of the critic loss.

Every function works on plain tensors whose last dimension is the agent dimension
(``[..., n_agents]``), so they can be tested on random tensors with no environment.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def dependence_factor(middle_log_prob: Tensor, old_log_prob: Tensor) -> Tensor:
    """Factor of each selected agent j in the dependence phase, ``prod_{k != j} pi_mid^k / pi_old^k``.

    Computed in log space: ``exp(sum_k (mid_k - old_k) - (mid_j - old_j))``. Shapes ``[..., n_agents]``.
    A single agent has nothing to depend on: its factor is 1.
    """
    log_ratio = middle_log_prob - old_log_prob
    return torch.exp(log_ratio.sum(-1, keepdim=True) - log_ratio)


def clipped_surrogate(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantage: Tensor,
    clip_epsilon: float,
    factor: Tensor | None = None,
) -> Tensor:
    """Per-sample PPO-clip objective to maximise, ``min(r A f, clip(r, 1 - eps, 1 + eps) A f)``.

    ``r = exp(log_prob - old_log_prob)``; ``factor`` (Eq. 10's product of the other agents' middle
    ratios, detached) defaults to 1, which is Eq. 9 (independence phase). Broadcasts over the agent
    dimension, so ``advantage`` may be ``[..., 1]`` for a team advantage.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    weighted = advantage if factor is None else advantage * factor.detach()
    return torch.minimum(ratio * weighted, ratio.clamp(1.0 - clip_epsilon, 1.0 + clip_epsilon) * weighted)


def dependence_gate(
    middle_log_prob: Tensor,
    old_log_prob: Tensor,
    advantage: Tensor,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    alive: Tensor | None = None,
) -> bool:
    """Whether the dependence phase may run: ``sum_j sum_b factor_j r_j^mid A >= sum_j sum_b r_j^mid A``.

    Mirrors the paper's official code: the dependence phase is skipped when weighting every
    agent's middle surrogate by its factor would lower the total over the batch (with the same
    1e-5 tolerance). ``all_reduce`` sums the two totals across processes (DDP), so that every
    rank takes the same branch. ``alive`` (bool ``[..., n_agents]``) leaves dead agents' samples out.
    """
    middle_ratio = torch.exp(middle_log_prob - old_log_prob)
    factor = dependence_factor(middle_log_prob, old_log_prob)
    weighted = middle_ratio * advantage if alive is None else middle_ratio * advantage * alive
    sums = torch.stack([(factor * weighted).sum(), weighted.sum()])
    if all_reduce is not None:
        sums = all_reduce(sums)
    return bool(sums[0] + 1e-5 >= sums[1])


def non_overlapping_selection(n_agents: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Eq. 5: a random order of separated agents ``i_1..i_n`` and the selected ``j_p = i_(p+1 mod n)``.

    Every agent is selected exactly once (``j_{1:n} = N``) and never by its own pipeline
    (``j_p != i_p`` for ``n > 1``).
    """
    separated_agent = torch.randperm(n_agents, generator=generator, device=generator.device)
    return separated_agent, separated_agent.roll(-1)


def huber_value_loss(
    value: Tensor,
    old_value: Tensor,
    target: Tensor,
    delta: float,
    clip_epsilon: float | None = None,
) -> Tensor:
    """Huber loss of the (normalised) value against its target, optionally value-clipped as in MAPPO.

    With ``clip_epsilon`` the loss is ``max(huber(target - v), huber(target - v_clipped))`` where
    ``v_clipped = old_value + clamp(v - old_value, +-eps)``. Returns the mean over all elements.
    """
    loss = torch.nn.functional.huber_loss(value, target, delta=delta, reduction="none")
    if clip_epsilon is not None:
        clipped = old_value + (value - old_value).clamp(-clip_epsilon, clip_epsilon)
        loss = torch.maximum(
            loss, torch.nn.functional.huber_loss(clipped, target, delta=delta, reduction="none")
        )
    return loss.mean()


def normalize_advantage(advantage: Tensor, eps: float = 1e-5) -> Tensor:
    """Zero-mean, unit-std advantages over the batch, per agent (``advantage [..., width]``: each
    last-dimension column on its own, as the paper's code normalises each agent's buffer; a team
    advantage ``[..., 1]`` is normalised over the whole batch)."""
    flat = advantage.reshape(-1, advantage.shape[-1])
    return (advantage - flat.mean(0)) / (flat.std(0, unbiased=False) + eps)


def explained_variance(prediction: Tensor, target: Tensor) -> Tensor:
    """``1 - Var[target - prediction] / Var[target]`` (NaN when the target is constant)."""
    return 1.0 - (target - prediction).var() / target.var()


def active_mean(value: Tensor, alive: Tensor | None, shared: bool) -> Tensor:
    """The per-agent means ``[n_agents]`` of ``value [B, n_agents]`` over the samples where the agent is
    alive (all samples when ``alive`` is None), as the paper code's ``use_policy_active_masks``: per agent
    for per-agent networks; for ``shared`` networks over all agents' live samples together (scaled by
    ``n_agents``, so that their mean over agents is the mean over every live sample)."""
    if alive is None:
        return value.mean(0)
    alive = alive.to(value.dtype)
    total = (value * alive).sum(0)
    if shared:
        return total * value.shape[-1] / alive.sum().clamp(min=1.0)
    return total / alive.sum(0).clamp(min=1.0)
