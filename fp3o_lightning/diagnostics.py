"""The paper's ratio/KL diagnostics (Figures 1, 2 and 4): per-agent summaries and distribution figures.

Each update scheme reports, for every agent, the ratio ``pi_current / pi_old`` over the batch at
the moment that agent's update starts, and KL(old || new) when its update ends (``[B, n_agents]``).
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure
from torch import Tensor


def summaries(start_ratio: Tensor, end_kl: Tensor, clip_epsilon: float) -> dict[str, Tensor]:
    """Per-agent scalars: mean ``|r - 1|`` and the fraction outside ``1 +- eps`` when each agent's
    update starts, and the mean KL(old || new) when it ends."""
    deviation = (start_ratio - 1.0).abs()
    return {
        "start_ratio_deviation": deviation.mean(0),
        "start_ratio_outside_clip": (deviation > clip_epsilon).float().mean(0),
        "kl_old_new": end_kl.mean(0),
    }


def ratio_kl_figure(
    start_ratio: Tensor, end_kl: Tensor, clip_epsilon: float, title: str, order: Tensor | None = None
) -> Figure:
    """Box plots per agent: the start ratio (with the clip band) and the final KL(old || new).

    ``order`` (agent indices) sets the left-to-right order, e.g. HAPPO's update order, so the drift of
    later agents' start ratios reads left to right; by default agents are in index order.
    """
    start_ratio, end_kl = start_ratio.detach().float().cpu(), end_kl.detach().float().cpu()
    columns = torch.arange(start_ratio.shape[-1]) if order is None else order.detach().long().cpu()
    start_ratio, end_kl = start_ratio[:, columns], end_kl[:, columns]
    n_agents = start_ratio.shape[-1]
    agents = [str(i) for i in columns.tolist()]
    # A bare Figure (no pyplot): no global backend switch, nothing to close, notebooks unaffected.
    figure = Figure(figsize=(4 + 0.9 * n_agents, 3.6))
    ratio_axis, kl_axis = figure.subplots(1, 2)
    ratio_axis.boxplot(start_ratio.T.tolist(), tick_labels=agents, showfliers=False)
    ratio_axis.axhspan(1 - clip_epsilon, 1 + clip_epsilon, color="tab:green", alpha=0.15, label="1 ± ε")
    xlabel = "agent" if order is None else "agent (in update order)"
    ratio_axis.set(xlabel=xlabel, ylabel="π_current / π_old at update start", title="ratio")
    ratio_axis.legend(loc="upper right", fontsize=8)
    kl_axis.boxplot(end_kl.clamp(min=1e-12).T.tolist(), tick_labels=agents, showfliers=False)
    kl_axis.set(xlabel=xlabel, ylabel="KL(old ‖ new) at update end", title="KL", yscale="log")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


__all__ = ["ratio_kl_figure", "summaries"]
