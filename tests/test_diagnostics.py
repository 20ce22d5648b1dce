"""The paper's ratio/KL diagnostics: per-agent summaries and the logged figure."""

from __future__ import annotations

import torch

from fp3o_lightning.diagnostics import ratio_kl_figure, summaries


def test_summaries_per_agent():
    start_ratio = torch.tensor([[1.0, 1.5], [1.0, 0.7]])
    stats = summaries(start_ratio, torch.tensor([[0.0, 0.2], [0.0, 0.4]]), clip_epsilon=0.2)
    torch.testing.assert_close(stats["start_ratio_deviation"], torch.tensor([0.0, 0.4]))
    torch.testing.assert_close(stats["start_ratio_outside_clip"], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(stats["kl_old_new"], torch.tensor([0.0, 0.3]))


def test_figure_orders_agents_as_given():
    """HAPPO's figure reads left to right in update order: agent 2's box (ratio 3) comes first."""
    start_ratio = torch.tensor([1.0, 2.0, 3.0]).expand(10, 3)
    end_kl = torch.full((10, 3), 0.01)
    figure = ratio_kl_figure(start_ratio, end_kl, 0.2, "t", order=torch.tensor([2, 0, 1]))
    ratio_axis = figure.axes[0]
    assert [t.get_text() for t in ratio_axis.get_xticklabels()] == ["2", "0", "1"]
    first_box = [line for line in ratio_axis.lines if abs(sum(line.get_xdata()) / 2 - 1) < 0.5]
    assert first_box and all(set(line.get_ydata()) == {3.0} for line in first_box)  # agent 2's ratios
    assert "update order" in ratio_axis.get_xlabel()
    default = ratio_kl_figure(start_ratio, end_kl, 0.2, "t")
    assert [t.get_text() for t in default.axes[0].get_xticklabels()] == ["0", "1", "2"]
