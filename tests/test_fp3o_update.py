"""The FP3O update on a fixed batch: phases, factors, gate, and the critic."""

from __future__ import annotations

import pytest
import torch

from fp3o_lightning.objectives import dependence_factor
from fp3o_lightning.schemes import fp3o as fp3o_scheme

from .conftest import rollout_batch


def snapshot(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.policy.parameters()])


def critic_snapshot(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.critic.parameters()])


class PhaseRecorder:
    """Wraps ``module.ppo_phase`` to record each phase's factor and the parameters around it."""

    def __init__(self, module):
        self.module, self.original, self.calls = module, module.ppo_phase, []
        module.ppo_phase = self

    def __call__(self, batch, factor=None):
        before = (snapshot(self.module), critic_snapshot(self.module))
        stats = self.original(batch, factor=factor)
        after = (snapshot(self.module), critic_snapshot(self.module))
        self.calls.append({"factor": factor, "before": before, "after": after, "stats": stats})
        return stats


def test_independence_phase_starts_at_ratio_one(fitted_module):
    batch = rollout_batch(fitted_module)
    stats = fitted_module.scheme.update(fitted_module, batch)
    assert stats["start_ratio"].shape == (batch.numel(), fitted_module.n_agents)
    assert torch.equal(stats["start_ratio"], torch.ones_like(stats["start_ratio"]))


@pytest.mark.parametrize("gate", [True, False])
def test_dependence_phase_runs_only_where_the_gate_allows(fitted_module, monkeypatch, gate):
    module = fitted_module
    batch = rollout_batch(module)
    monkeypatch.setattr(fp3o_scheme, "dependence_gate", lambda *args, **kwargs: gate)
    recorder = PhaseRecorder(module)
    stats = module.scheme.update(module, batch)
    assert stats["gate"].item() == float(gate)
    independence = recorder.calls[0]
    assert independence["factor"] is None
    assert not torch.equal(independence["before"][0], independence["after"][0])  # actors moved
    assert not torch.equal(independence["before"][1], independence["after"][1])  # critic trained
    if not gate:
        assert len(recorder.calls) == 1
        assert torch.equal(snapshot(module), independence["after"][0])  # policy stays at theta_mid
        assert "clip_fraction_dependence" not in stats
        return
    assert len(recorder.calls) == 2
    dependence = recorder.calls[1]
    assert torch.equal(dependence["before"][0], independence["after"][0])  # starts from theta_mid
    assert not torch.equal(dependence["before"][0], dependence["after"][0])
    assert not torch.equal(dependence["before"][1], dependence["after"][1])
    assert stats["kl_old_middle"].max() > 0  # the dependence phase starts away from the rollout policy


def test_dependence_factor_is_product_of_the_other_middle_ratios(fitted_module):
    module = fitted_module
    batch = rollout_batch(module)
    recorder = PhaseRecorder(module)
    module.scheme.update(module, batch)
    middle = recorder.calls[0]["after"][0]
    current = snapshot(module)
    # rebuild theta_mid and measure its ratios independently of the scheme
    torch.nn.utils.vector_to_parameters(middle, module.policy.parameters())
    with torch.no_grad():
        middle_log_prob = module.policy.distribution(batch["agents", "observation"]).log_prob(
            batch["agents", "action"]
        )
    torch.nn.utils.vector_to_parameters(current, module.policy.parameters())
    ratio = torch.exp(middle_log_prob - batch["agents", "action_log_prob"])
    if len(recorder.calls) == 2:
        factor = recorder.calls[1]["factor"]
        torch.testing.assert_close(
            factor, dependence_factor(middle_log_prob, batch["agents", "action_log_prob"])
        )
        torch.testing.assert_close(factor[:, 0], ratio[:, 1] * ratio[:, 2])


def test_selection_is_logged(fitted_module):
    stats = fitted_module.scheme.update(fitted_module, rollout_batch(fitted_module))
    assert sorted(stats["separated_agent"].tolist()) == [0.0, 1.0, 2.0]
    assert torch.equal(stats["selected_agent"], stats["separated_agent"].roll(-1))
