"""The baselines beside FP3O: HAPPO, MAPPO and IPPO, and the facts about ratios the paper relies on."""

from __future__ import annotations

import pytest
import torch

from fp3o_lightning.keys import LOG_PROB
from fp3o_lightning.module import FP3OModule
from fp3o_lightning.optim import AgentFreezer

from .conftest import fit_quietly, rollout_batch, small_module


def fitted(algorithm: str, sharing: str) -> FP3OModule:
    module = small_module(algorithm=algorithm, sharing=sharing)
    fit_quietly(module)
    return module


def parameters(module: FP3OModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def unmoved(module: FP3OModule, before: dict[str, torch.Tensor]) -> list[str]:
    """The actor and critic parameters equal to ``before``, per agent for stacked per-agent ones."""
    stacked = {id(p) for p in module.policy.stacked_parameters()}
    if module.hparams.sharing == "nops":  # NoPS: every agent its own critic too (V(s, i) or IPPO's)
        stacked |= {id(p) for p in module.critic.parameters()}
    names = []
    for name, p in module.named_parameters():
        parts = list(p) if id(p) in stacked else [p]
        old = list(before[name]) if id(p) in stacked else [before[name]]
        names += [
            f"{name}[{i}]" for i, (a, b) in enumerate(zip(parts, old, strict=True)) if torch.equal(a, b)
        ]
    return names


@pytest.mark.parametrize("algorithm", ["fp3o", "happo", "mappo", "ippo"])
@pytest.mark.parametrize("sharing", ["fups", "paps", "nops"])
def test_every_algorithm_and_network_type_trains(algorithm, sharing):
    """One iteration moves every actor parameter (every agent's slice of stacked ones) and every
    critic parameter, for every algorithm and network type."""
    module = small_module(algorithm=algorithm, sharing=sharing)
    before = parameters(module)
    fit_quietly(module)
    assert module.iteration == 1 and module.frames == 128
    assert unmoved(module, before) == []


def snapshot(network: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in network.parameters()])


@pytest.mark.parametrize("sharing", ["fups", "paps", "nops"])
def test_happo_actor_phases_leave_the_critic_and_its_critic_phase_the_actors(sharing, monkeypatch):
    """HAPPO's per-agent phases train no critic; its last phase (``train_actor=False``) trains the
    critic alone, which moves."""
    module = fitted("happo", sharing)
    original = module.learner.ppo_phase
    phases = []

    def checking_phase(batch, **kwargs):
        actors, critic = snapshot(module.policy), snapshot(module.critic)
        stats = original(batch, **kwargs)
        actors_moved = not torch.equal(snapshot(module.policy), actors)
        critic_moved = not torch.equal(snapshot(module.critic), critic)
        phases.append((kwargs.get("agents") is not None, actors_moved, critic_moved))
        return stats

    monkeypatch.setattr(module.learner, "ppo_phase", checking_phase)
    module.scheme.update(module.learner, rollout_batch(module))
    assert phases == [(True, True, False)] * module.n_agents + [(False, False, True)]


@pytest.mark.parametrize("sharing", ["fups", "paps", "nops"])
def test_fp3o_every_agent_starts_at_ratio_exactly_one(sharing):
    """The batch's log-probs are the current policy's, bit for bit, so FP3O and MAPPO take the start
    ratio as 1 without measuring it."""
    module = fitted("fp3o", sharing)
    batch = rollout_batch(module)
    log_prob, kl = module.learner.measure(batch)
    assert torch.equal(log_prob, batch[LOG_PROB]) and not kl.any()
    stats = module.scheme.update(module.learner, batch)
    assert torch.equal(stats["start_ratio"], torch.ones_like(stats["start_ratio"]))


def test_happo_fups_later_agents_start_away_from_one():
    module = fitted("happo", "fups")
    stats = module.scheme.update(module.learner, rollout_batch(module))
    order = stats["update_order"].long().tolist()
    deviation = (stats["start_ratio"] - 1).abs().mean(0)
    assert deviation[order[0]] == 0  # the first agent starts at the rollout policy
    # shared parameters were moved by the agents before: the later agents start off 1
    assert all(deviation[agent] > 1e-5 for agent in order[1:]), deviation  # float noise is ~1e-7


def test_happo_nops_later_agents_start_at_one():
    module = fitted("happo", "nops")
    stats = module.scheme.update(module.learner, rollout_batch(module))
    assert torch.equal(stats["start_ratio"], torch.ones_like(stats["start_ratio"]))


def test_happo_factor_is_the_product_of_the_updated_agents_ratios(monkeypatch):
    module = fitted("happo", "nops")
    batch = rollout_batch(module)
    calls = []
    original = module.learner.ppo_phase

    def recording_phase(batch, factor=None, agents=None, **kwargs):
        stats = original(batch, factor=factor, agents=agents, **kwargs)
        log_prob, _ = module.learner.measure(batch)
        calls.append((factor, agents, log_prob))
        return stats

    monkeypatch.setattr(module.learner, "ppo_phase", recording_phase)
    stats = module.scheme.update(module.learner, batch)
    order = stats["update_order"].long().tolist()
    old = batch["agents", "action_log_prob"]
    agent_calls = calls[:-1]
    assert calls[-1][1] is None and calls[-1][0] is None  # the critic's phase, once, last
    expected = torch.ones_like(old[:, :1])
    for (factor, agents, log_prob), agent in zip(agent_calls, order, strict=True):
        assert agents.nonzero().flatten().tolist() == [agent]
        torch.testing.assert_close(factor[:, agent : agent + 1], expected)
        expected = expected * torch.exp(log_prob[:, agent : agent + 1] - old[:, agent : agent + 1])


@pytest.mark.parametrize("sharing", ["nops", "paps"])
def test_happo_agents_not_being_updated_do_not_move(sharing, monkeypatch):
    module = fitted("happo", sharing)  # one iteration done: Adam has momentum for every agent
    batch = rollout_batch(module)
    stacked = module.policy.stacked_parameters()
    original = module.learner.ppo_phase
    checked = []

    def checking_phase(batch, factor=None, agents=None, **kwargs):
        before = [p.detach().clone() for p in stacked]
        stats = original(batch, factor=factor, agents=agents, **kwargs)
        if agents is not None:
            for p, b in zip(stacked, before, strict=True):
                assert torch.equal(p[~agents], b[~agents])  # frozen agents bit-for-bit
                assert not torch.equal(p[agents], b[agents])  # the updated agent moved
            checked.append(int(agents.nonzero()))
        return stats

    monkeypatch.setattr(module.learner, "ppo_phase", checking_phase)
    module.scheme.update(module.learner, batch)
    assert sorted(checked) == [0, 1, 2]


def test_agent_freezer_undoes_adam_momentum():
    weight = torch.nn.Parameter(torch.zeros(3, 2))
    optimizer = torch.optim.Adam([weight], lr=0.1)
    weight.grad = torch.ones(3, 2)
    optimizer.step()  # every agent gathers momentum
    frozen = torch.tensor([True, False, True])
    freezer = AgentFreezer([weight], optimizer, frozen)
    before = weight.detach().clone()
    weight.grad = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    optimizer.step()
    assert not torch.equal(weight[0], before[0])  # a zero gradient still moves Adam's parameters
    freezer.restore()
    assert torch.equal(weight[frozen], before[frozen]) and not torch.equal(weight[1], before[1])
    assert torch.equal(optimizer.state[weight]["exp_avg"][0], freezer.saved[0]["exp_avg"][0])


def test_mappo_is_one_phase_on_all_agents(monkeypatch):
    module = fitted("mappo", "paps")
    calls = []
    original = module.learner.ppo_phase
    monkeypatch.setattr(module.learner, "ppo_phase", lambda *a, **k: calls.append(k) or original(*a, **k))
    stats = module.scheme.update(module.learner, rollout_batch(module))
    assert calls == [{}]  # factor 1, every agent, actor and critic together
    assert stats["end_kl"].shape == stats["start_ratio"].shape


def test_ippo_critic_is_decentralised():
    module = fitted("ippo", "nops")
    batch = rollout_batch(module)
    assert module.critic_keys == (("agents", "observation"),)
    assert batch["advantage"].shape == (batch.numel(), module.n_agents)
    observation = batch["agents", "observation"][:4].clone()
    values = module.learner.values(batch[:4])
    observation[:, 1] += torch.randn_like(observation[:, 1])
    batch[:4].set(("agents", "observation"), observation)
    changed = module.critic(observation)
    assert torch.equal(changed[:, 0], values[:, 0]) and not torch.equal(changed[:, 1], values[:, 1])
    assert fitted("mappo", "nops").critic_keys == ("state",)
