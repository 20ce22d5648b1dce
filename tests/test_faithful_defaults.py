"""The defaults follow the paper's official code (an-anony/fp3o-icml23); each difference is an option."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from fp3o_lightning.module import FP3OModule
from fp3o_lightning.nets import AgentCritic, CentralCritic

from .conftest import fit_quietly, sampled_rollout, small_module


def test_defaults_are_the_official_codes() -> None:
    module_defaults = {k: p.default for k, p in inspect.signature(FP3OModule).parameters.items()}
    assert module_defaults["time_limit"] == "terminal"
    assert module_defaults["critic"] == "agent"
    assert module_defaults["agent_id"] is True
    assert module_defaults["value_norm_update"] == "auto"
    assert module_defaults["dependence_advantage"] == "recompute"
    assert module_defaults["eval_starts"] == "fresh"
    assert module_defaults["paps_head_lr_scale"] is True


@pytest.mark.parametrize(
    ("algorithm", "sharing", "folds"),
    [
        ("fp3o", "nops", 2),
        ("fp3o", "fups", 2),
        ("fp3o", "paps", 6),
        ("happo", "nops", 2),
        ("mappo", "fups", 1),
    ],
)
def test_value_normalizer_folds_follow_each_algorithms_code(algorithm: str, sharing: str, folds: int) -> None:
    """``auto``: FP3O's and HAPPO's value loss normalises the targets twice (PaPS: twice per agent, 3
    agents here), MAPPO's once."""
    assert small_module(algorithm=algorithm, sharing=sharing).learner.value_norm_folds == folds


class OfficialPopArt(torch.nn.Module):
    """The official ``utils/popart.py`` statistics, restated: float32 buffers, and a forward that folds
    the batch in (``train=True``) before normalising with the debiased mean and variance."""

    def __init__(self, beta: float = 0.99999, epsilon: float = 1e-5) -> None:
        super().__init__()
        self.beta, self.epsilon = beta, epsilon
        self.running_mean = torch.zeros(1)
        self.running_mean_sq = torch.zeros(1)
        self.debiasing_term = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        self.running_mean.mul_(self.beta).add_(x.mean(0) * (1.0 - self.beta))
        self.running_mean_sq.mul_(self.beta).add_((x**2).mean(0) * (1.0 - self.beta))
        self.debiasing_term.mul_(self.beta).add_(1.0 - self.beta)
        mean = self.running_mean / self.debiasing_term.clamp(min=self.epsilon)
        var = (self.running_mean_sq / self.debiasing_term.clamp(min=self.epsilon) - mean**2).clamp(min=1e-2)
        return (x - mean) / var.sqrt()


def test_value_normalizer_moves_as_two_official_popart_calls_per_minibatch() -> None:
    """By default an FP3O NoPS agent's statistics after a minibatch equal the official code's after its
    value loss, which calls ``PopArt.forward(return_batch)`` twice (clipped and unclipped errors)."""
    module = small_module(algorithm="fp3o", sharing="nops")
    normalizer = module.value_normalizer
    official = [OfficialPopArt() for _ in range(module.n_agents)]
    torch.manual_seed(0)
    for scale in (1.0, 50.0, 3.0):  # three minibatches, the returns' scale moving
        target = torch.randn(64, module.n_agents) * scale + scale
        normalizer.update(normalizer.moments(target), module.learner.value_norm_folds)
        for agent, popart in enumerate(official):
            for _ in range(2):
                expected = popart(target[:, agent : agent + 1])
            torch.testing.assert_close(
                normalizer.normalize(target)[:, agent : agent + 1], expected, rtol=1e-4, atol=1e-4
            )
    mean, std = normalizer.mean_std()
    for agent, popart in enumerate(official):
        debias = popart.debiasing_term.clamp(min=popart.epsilon)
        torch.testing.assert_close(mean[agent : agent + 1], popart.running_mean / debias, rtol=1e-4, atol=0)
        debiasing = normalizer.debiasing_term.float()
        torch.testing.assert_close(debiasing, popart.debiasing_term, rtol=1e-5, atol=0)


def advantages_per_phase(dependence_advantage: str) -> tuple[list, list, torch.Tensor]:
    """One FP3O update on a real batch: each phase's advantages, the advantages recomputed from the
    normaliser as each phase starts, and the batch's first advantages."""
    from fp3o_lightning.objectives import normalize_advantage

    module = small_module(algorithm="fp3o", sharing="nops", dependence_advantage=dependence_advantage)
    fit_quietly(module)
    batch, _ = module.learner.compute_advantages(sampled_rollout(module))
    first = batch["advantage"].clone()
    phases, recomputed = [], []
    original, normalizer = module.learner.ppo_phase, module.value_normalizer

    def phase(b, **kwargs):
        phases.append(b["advantage"].clone())
        recomputed.append(normalize_advantage(b["value_target"] - normalizer.denormalize(b["value"])))
        return original(b, **kwargs)

    module.learner.ppo_phase = phase
    module.scheme.update(module.learner, batch)
    assert torch.equal(phases[0], first)
    return phases, recomputed, first


def test_dependence_phase_recomputes_the_advantages() -> None:
    """With ``recompute`` FP3O's dependence phase (and its gate) uses ``normalize(target -
    denormalize(value))`` under the normaliser the independence phase left; ``reuse`` keeps the first."""
    phases, recomputed, first = advantages_per_phase("recompute")
    assert len(phases) == 2, "the gate let the dependence phase run in this setting"
    torch.testing.assert_close(phases[1], recomputed[1], rtol=0, atol=0)
    assert not torch.allclose(phases[1], first, atol=1e-5)  # the normaliser moved in between
    phases, _, first = advantages_per_phase("reuse")
    assert len(phases) < 2 or torch.equal(phases[1], first)


@pytest.mark.parametrize("time_limit", ["terminal", "bootstrap"])
def test_time_limit_bootstraps_only_when_asked(time_limit: str) -> None:
    """At a truncated step the return is the reward alone ("terminal", the official runner's
    ``use_proper_time_limits=False``) or the reward plus the discounted next value ("bootstrap")."""
    env = {"name": "mamujoco", "scenario": "HalfCheetah", "agent_conf": "2x3", "max_episode_steps": 10}
    module = small_module(env=env, time_limit=time_limit, value_norm_update="iteration")
    fit_quietly(module)  # a trained critic, so that next values are not zero
    rollout = sampled_rollout(module, steps=32)
    truncated = rollout["next", "truncated"].squeeze(-1)
    assert truncated.sum() >= 4 and not rollout["next", "terminated"].any()
    with torch.no_grad():  # before GAE, which updates the normaliser ("iteration")
        next_value = module.value_normalizer.denormalize(module.learner.values(rollout["next"]))[truncated]
    batch, _ = module.learner.compute_advantages(rollout)
    target = batch["value_target"].reshape(*truncated.shape, -1)[truncated]
    reward = rollout["next", "reward"][truncated]
    expected = reward if time_limit == "terminal" else reward + module.hparams.gamma * next_value
    torch.testing.assert_close(target, expected.expand_as(target), rtol=1e-5, atol=1e-5)
    assert next_value.abs().min() > 1e-3  # the two modes really differ here


def test_value_normalizer_follows_the_official_update_order() -> None:
    """The statistics after one MAPPO update equal the official order: one update with each
    minibatch's targets right before its value loss, over the shuffled minibatches of every epoch."""
    module = small_module(algorithm="mappo", sharing="nops")
    fit_quietly(module)
    batch, _ = module.learner.compute_advantages(sampled_rollout(module))
    generator = torch.Generator().set_state(module.generator.get_state())
    expected = type(module.value_normalizer)(module.n_agents)
    expected.load_state_dict(module.value_normalizer.state_dict())
    size = batch.numel() // module.hparams.num_minibatches
    for _ in range(module.hparams.ppo_epochs):
        order = torch.randperm(batch.numel(), generator=generator)
        for start in range(0, batch.numel(), size):
            targets = batch["value_target"][order[start : start + size]]
            expected.update(expected.moments(targets))
    module.scheme.update(module.learner, batch)
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(module.value_normalizer.state_dict()[name], value, rtol=0, atol=0)
    assert expected.running_mean.shape == (module.n_agents,)  # NoPS: one normaliser per agent


def test_value_normalizer_once_per_iteration_option() -> None:
    module = small_module(algorithm="fp3o", sharing="fups", value_norm_update="iteration")
    fit_quietly(module)
    before = module.value_normalizer.debiasing_term.clone()
    batch, _ = module.learner.compute_advantages(sampled_rollout(module))
    after_gae = module.value_normalizer.debiasing_term.clone()
    module.scheme.update(module.learner, batch)
    beta = module.value_normalizer.beta
    torch.testing.assert_close(after_gae, before * beta + (1 - beta))  # one update, with GAE
    assert torch.equal(module.value_normalizer.debiasing_term, after_gae)  # none in the phases


@pytest.mark.parametrize("sharing", ["fups", "paps", "nops"])
def test_agent_critic_and_agent_id_by_default(sharing: str) -> None:
    module = small_module(sharing=sharing)
    assert isinstance(module.critic, AgentCritic)
    observation_size = 9  # Hopper 3x1's largest observation
    first = module.policy.trunk[1]  # after the input LayerNorm
    assert first.weight.shape[1] == observation_size + module.n_agents
    per_agent = sharing == "nops"
    assert module.value_normalizer.running_mean.shape == ((module.n_agents,) if per_agent else (1,))
    batch, _ = module.learner.compute_advantages(sampled_rollout(module, steps=16))
    assert batch["advantage"].shape == (batch.numel(), module.n_agents)


def test_team_critic_and_no_agent_id_options() -> None:
    module = small_module(sharing="nops", critic="team", agent_id=False)
    assert isinstance(module.critic, CentralCritic)
    assert module.policy.trunk[1].weight.shape[1] == 9
    assert module.value_normalizer.running_mean.shape == (1,)
    batch, _ = module.learner.compute_advantages(sampled_rollout(module, steps=16))
    assert batch["advantage"].shape == (batch.numel(), 1)


@pytest.mark.parametrize("scale", [True, False])
def test_paps_heads_learn_at_n_agents_times_the_actor_rate(scale: bool) -> None:
    module = small_module(sharing="paps", paps_head_lr_scale=scale, actor_lr=1e-3)
    trainer = fit_quietly(module)
    (optimizer,) = trainer.optimizers
    *groups, critic = optimizer.param_groups
    assert critic["lr"] == module.hparams.critic_lr and critic["params"] == list(module.critic.parameters())
    if not scale:
        assert len(groups) == 1 and groups[0]["lr"] == 1e-3
        return
    trunk, heads = groups
    assert trunk["lr"] == 1e-3 and heads["lr"] == pytest.approx(1e-3 * module.n_agents)
    head_ids = {id(p) for p in heads["params"]}
    assert head_ids == {id(p) for p in (module.policy.log_std, *module.policy.head.parameters())}
    assert not head_ids & {id(p) for p in trunk["params"]}


@pytest.mark.parametrize("option", ["time_limit", "critic", "value_norm_update", "matmul_precision"])
def test_unknown_option_values_name_the_choices(option: str) -> None:
    with pytest.raises(ValueError, match=f"model.{option}='nope' is unknown; choose one of"):
        small_module(**{option: "nope"})


SMAX_3M = {"name": "smax", "map_name": "3m", "max_episode_steps": 20}


def test_smac_style_critic_reads_the_agent_specific_state() -> None:
    """On SMAC-style maps the per-agent critic reads MAPPO's agent-specific global state (the state and
    the agent's observation); elsewhere the state."""
    pytest.importorskip("jaxmarl")
    smax = small_module(env=SMAX_3M, sharing="fups", rollout_length=16, num_minibatches=2)
    assert smax.critic_keys == ("state", ("agents", "observation"))
    assert smax.alive  # SMAX says which agents are alive
    assert small_module().critic_keys == ("state",)
    assert small_module(env=SMAX_3M, critic_input="state").critic_keys == ("state",)
    batch, _ = smax.learner.compute_advantages(sampled_rollout(smax, steps=16))
    assert batch["advantage"].shape == (batch.numel(), smax.n_agents)
    assert ("agents", "alive") in batch.keys(True)


@pytest.mark.parametrize("active_masks", [True, False])
def test_dead_agents_leave_the_policy_loss(active_masks: bool) -> None:
    """With ``active_masks`` a dead agent's samples change neither the policy loss nor the entropy."""
    pytest.importorskip("jaxmarl")
    module = small_module(
        env=SMAX_3M, sharing="nops", rollout_length=16, num_minibatches=2, active_masks=active_masks
    )
    batch, _ = module.learner.compute_advantages(sampled_rollout(module, steps=16))
    alive = torch.ones(batch.numel(), module.n_agents, dtype=torch.bool)
    alive[::3, 1] = False
    batch["agents", "alive"] = alive
    weight = torch.ones(module.n_agents)
    loss = module.learner.minibatch_loss(batch, None, weight, True, False)
    changed = batch.clone()
    changed["advantage"][~alive] += 100.0
    n_actions = module.policy.head[0].weight.shape[-1]
    changed["agents", "action"][~alive] = (changed["agents", "action"][~alive] + 1) % n_actions
    other = module.learner.minibatch_loss(changed, None, weight, True, False)
    same = torch.equal(loss[1], other[1]) and torch.equal(loss[2], other[2])
    assert same == active_masks


def test_checkpoints_from_before_these_options_still_evaluate_and_resume(tmp_path, monkeypatch) -> None:
    """A checkpoint written before the paper code's defaults (no such options in its hyperparameters,
    scalar value-normaliser statistics) loads with the behaviour it was trained with, and resumes."""
    from fp3o_lightning.cli import main
    from fp3o_lightning.module import LEGACY_HPARAMS

    monkeypatch.chdir(tmp_path)
    env = {"name": "mamujoco", "scenario": "Hopper", "agent_conf": "3x1", "max_episode_steps": 40}
    args = [f"--model.env={json.dumps({**env, 'clip_actions': True})}", "--model.num_envs=2"]
    args += ["--model.rollout_length=40", "--model.num_minibatches=2", "--model.ppo_epochs=1"]
    args += ["--model.eval_interval=0", "--model.checkpoint_interval=1"]
    args += ["--trainer.enable_progress_bar=false"]
    legacy = [f"--model.{name}={value}" for name, value in LEGACY_HPARAMS.items()]
    main(["fit", *args, *legacy, "--model.total_frames=80"])
    (path,) = tmp_path.glob("checkpoints/*/last.ckpt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    for name in LEGACY_HPARAMS:  # as an older version wrote it
        del checkpoint["hyper_parameters"][name]
    del checkpoint["hyper_parameters"]["env"]["clip_actions"]
    state = checkpoint["state_dict"]
    for name in ("running_mean", "running_mean_sq"):
        state[f"value_normalizer.{name}"] = state[f"value_normalizer.{name}"].reshape(())
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    main(["validate", f"--ckpt_path={old}", "--trainer.enable_progress_bar=false"])
    main(["fit", *args, f"--ckpt_path={old}", "--model.total_frames=160"])
    resumed = max(tmp_path.glob("checkpoints/*/last.ckpt"), key=lambda p: p.stat().st_mtime)
    resumed = torch.load(resumed, map_location="cpu", weights_only=False)
    assert resumed["fp3o"]["frames"] == 160
    assert {k: resumed["hyper_parameters"][k] for k in LEGACY_HPARAMS} == LEGACY_HPARAMS
    assert resumed["hyper_parameters"]["env"]["clip_actions"] is True
