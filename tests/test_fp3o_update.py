"""The FP3O update on a fixed batch: phases, factors, gate, and the critic."""

from __future__ import annotations

import pytest
import torch

from fp3o_lightning.schemes import fp3o as fp3o_scheme

from .conftest import rollout_batch


def snapshot(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.policy.parameters()])


def critic_snapshot(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.critic.parameters()])


class PhaseRecorder:
    """Wraps ``module.learner.ppo_phase`` to record each phase's factor and the parameters around it."""

    def __init__(self, module):
        self.module, self.original, self.calls = module, module.learner.ppo_phase, []
        module.learner.ppo_phase = self

    def __call__(self, batch, factor=None):
        before = (snapshot(self.module), critic_snapshot(self.module))
        stats = self.original(batch, factor=factor)
        after = (snapshot(self.module), critic_snapshot(self.module))
        self.calls.append({"factor": factor, "before": before, "after": after, "stats": stats})
        return stats


@pytest.mark.parametrize("gate", [True, False])
def test_dependence_phase_runs_only_where_the_gate_allows(fitted_module, monkeypatch, gate):
    module = fitted_module
    batch = rollout_batch(module)
    monkeypatch.setattr(fp3o_scheme, "dependence_gate", lambda *args, **kwargs: gate)
    recorder = PhaseRecorder(module)
    stats = module.scheme.update(module.learner, batch)
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


def middle_log_prob(module, recorder, batch) -> torch.Tensor:
    """Each agent's log-probs under theta_mid (the policy after the independence phase), rebuilt from
    the recorded parameters independently of the scheme."""
    current = snapshot(module)
    torch.nn.utils.vector_to_parameters(recorder.calls[0]["after"][0], module.policy.parameters())
    with torch.no_grad():
        log_prob = module.policy.distribution(batch["agents", "observation"]).log_prob(
            batch["agents", "action"]
        )
    torch.nn.utils.vector_to_parameters(current, module.policy.parameters())
    return log_prob


# Per-sample agent advantages a * weights. Each agent's factor times its own ratio is the product of
# all the agents' ratios, so the weighted total is sum_b prod(r) a sum(weights): with weights that sum
# to zero it is exactly 0, below the plain total that the independence phase has made positive (the
# gate closes); with equal weights every ratio grows where a > 0, and the product grows faster than
# each ratio alone (the gate opens; measured: 59 against 20).
GATE_WEIGHTS = {"open": [1.0, 1.0, 1.0], "closed": [1.0, 1.0, -2.0]}


def gated_batch(module, gate: str):
    """A real rollout batch whose advantages are its first agent's, times ``GATE_WEIGHTS[gate]``, kept for
    the dependence phase (``dependence_advantage="reuse"``: recomputed, they would be the critic's)."""
    module.hparams.dependence_advantage = "reuse"
    batch = rollout_batch(module)
    batch["advantage"] = batch["advantage"][:, :1] * torch.tensor(GATE_WEIGHTS[gate])
    return batch


@pytest.mark.parametrize("gate", ["open", "closed"])
def test_gate_decides_the_dependence_phase_on_a_real_batch(fitted_module, gate):
    """On a batch built so that the factor-weighted middle surrogate is clearly above (below) the
    plain one, as measured here from theta_mid, the scheme runs (skips) the dependence phase."""
    module = fitted_module
    batch = gated_batch(module, gate)
    recorder = PhaseRecorder(module)
    stats = module.scheme.update(module.learner, batch)
    old = batch["agents", "action_log_prob"]
    log_ratio = middle_log_prob(module, recorder, batch) - old
    ratio = torch.exp(log_ratio)
    factor = torch.exp(log_ratio.sum(-1, keepdim=True) - log_ratio)  # the other agents' ratios
    weighted, plain = (factor * ratio * batch["advantage"]).sum(), (ratio * batch["advantage"]).sum()
    margin = 1e-3 * plain.abs()
    if gate == "open":
        assert weighted > plain + margin, (weighted, plain)  # the batch is what it should be
        assert stats["gate"].item() == 1.0 and len(recorder.calls) == 2
        dependence = recorder.calls[1]
        assert not torch.equal(dependence["before"][0], dependence["after"][0])  # the actors moved
    else:
        assert weighted < plain - margin, (weighted, plain)
        assert stats["gate"].item() == 0.0 and len(recorder.calls) == 1
        assert torch.equal(snapshot(module), recorder.calls[0]["after"][0])  # the policy stays at theta_mid


def test_dependence_factor_is_product_of_the_other_middle_ratios(fitted_module):
    """The dependence phase (forced to run by a batch that opens the gate) weights agent j by the
    product of the other agents' middle ratios, measured from theta_mid."""
    module = fitted_module
    batch = gated_batch(module, "open")
    recorder = PhaseRecorder(module)
    module.scheme.update(module.learner, batch)
    assert len(recorder.calls) == 2
    ratio = torch.exp(middle_log_prob(module, recorder, batch) - batch["agents", "action_log_prob"])
    factor = recorder.calls[1]["factor"]
    torch.testing.assert_close(factor[:, 0], ratio[:, 1] * ratio[:, 2])
    torch.testing.assert_close(factor[:, 1], ratio[:, 0] * ratio[:, 2])
    torch.testing.assert_close(factor[:, 2], ratio[:, 0] * ratio[:, 1])


def test_selection_is_logged(fitted_module):
    stats = fitted_module.scheme.update(fitted_module.learner, rollout_batch(fitted_module))
    assert sorted(stats["separated_agent"].tolist()) == [0.0, 1.0, 2.0]
    assert torch.equal(stats["selected_agent"], stats["separated_agent"].roll(-1))
