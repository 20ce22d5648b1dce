"""Your own environment: PettingZoo parallel environments and TorchRL multi-agent environments through the
adapter, checked against the raw environments' own outputs, trained, resumed and evaluated."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from fp3o_lightning.cli import main
from fp3o_lightning.envs import make_env
from fp3o_lightning.errors import ConfigError
from fp3o_lightning.module import FP3OModule

from .conftest import fit_quietly
from .test_resume import crash_and_resume, run_metrics

pytest.importorskip("mpe2", reason="PettingZoo's MPE tasks: pip install -e '.[pettingzoo]'")

SPREAD = {
    "name": "pettingzoo",
    "task": "mpe2.simple_spread_v3",
    "task_kwargs": {"N": 3, "max_cycles": 25},
    "max_episode_steps": 25,
}
RENDEZVOUS = {"name": "torchrl", "factory": "tests.toy_envs:Rendezvous", "max_episode_steps": 20}


def spread(num_envs: int = 2, **options) -> EnvBase:
    options = {k: v for k, v in SPREAD.items() if k != "name"} | {"seed": 0} | options
    return make_env("pettingzoo", num_envs=num_envs, **options)


def test_simple_spread_matches_the_raw_environment() -> None:
    """Observations, state, team reward (the agents' mean) and flags are the PettingZoo task's own."""
    env = spread()
    assert (env.n_agents, env.observation_sizes, env.state_size, env.discrete) == (3, [18] * 3, 54, True)
    assert env.action_spec["agents", "action"].space.n == 5
    tensordict = env.reset()
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 31):
        tensordict["agents", "action"] = torch.randint(0, 5, (2, 3), generator=generator)
        tensordict, following = env.step_and_maybe_reset(tensordict)
        out = tensordict["next"]
        for i, copy in enumerate(env._inner._envs):
            raw = copy._env.unwrapped  # the MPE task (an AEC environment under the parallel API)
            if step % 25:  # (at step 25 the copy has been reset already: its values are the next episode's)
                for agent, name in enumerate(raw.possible_agents):
                    np.testing.assert_allclose(
                        out["agents", "observation"][i, agent], raw.observe(name), rtol=1e-6
                    )
                np.testing.assert_allclose(out["state"][i], raw.state(), rtol=1e-6)
                rewards = [raw.rewards[name] for name in raw.possible_agents]
                assert out["reward"][i].item() == pytest.approx(float(np.mean(rewards)), rel=1e-6)
            assert out["truncated"][i].item() == (step % 25 == 0)  # the task's max_cycles
            assert not out["terminated"][i].item()
        # every agent acts until the episode's end, when the task removes them (TorchRL's mask)
        assert out["agents", "alive"].all() == (step % 25 != 0) and out["agents", "action_mask"].all()
        tensordict = following


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("reward", ["mean", "sum"])
def test_two_groups_map_onto_one_padded_agent_dimension(discrete: bool, reward: str) -> None:
    """Heterogeneous groups: agents joined in group order, observations and actions padded, the state is
    every agent's unpadded observation, the team reward their mean or sum, agents that leave are not
    alive, the agents' own flags decide done, the action mask covers the padding."""
    env = make_env(
        "torchrl",
        factory="tests.toy_envs:TwoGroups",
        factory_kwargs={"discrete": discrete},
        num_envs=2,
        reward=reward,
        max_episode_steps=10,
    )
    assert env.n_agents == 3 and env.observation_sizes == [3, 4, 4] and env.state_size == 11
    assert env.action_sizes == ([4, 2, 2] if discrete else [2, 1, 1])
    observation = torch.tensor([[0.0, 0, 1, 0], [0, 1, 2, 3], [0, 2, 4, 5]])
    tensordict = env.reset()
    torch.testing.assert_close(tensordict["agents", "observation"], observation.expand(2, 3, 4))
    torch.testing.assert_close(tensordict["state"][0], torch.tensor([0.0, 0, 1, 0, 1, 2, 3, 0, 2, 4, 5]))
    if discrete:
        allowed = torch.tensor(
            [[True, True, True, False], [True, True, False, False], [True, True, False, False]]
        )
        assert torch.equal(tensordict["agents", "action_mask"][0], allowed)
    else:
        bounds = env.action_spec["agents", "action"].space
        torch.testing.assert_close(bounds.high[0], torch.tensor([[2.0, 2.0], [1.0, 1.0], [1.0, 1.0]]))
    for step in range(1, 5):
        tensordict = env.rand_action(tensordict)
        action = tensordict["agents", "action"].clone()
        out = env.step(tensordict)["next"]
        sent = env._inner._envs[1].last_action
        if discrete:
            assert sent["scout", "action"].tolist() == action[1, :1].tolist()
            assert sent["workers", "action"].tolist() == action[1, 1:].tolist()
        else:
            torch.testing.assert_close(sent["scout", "action"], action[1, :1, :2])
            torch.testing.assert_close(sent["workers", "action"], action[1, 1:, :1])
        rewards = torch.tensor([step, step + 1.0, step + 2.0])
        expected = rewards.mean() if reward == "mean" else rewards.sum()
        torch.testing.assert_close(out["reward"], expected.expand(2, 1))
        assert out["agents", "alive"][0].tolist() == [True, True, step < 2]
        assert out["terminated"].all() == out["done"].all() == (step >= 4)
        assert out["agents", "observation"][0, 0, 0].item() == step
        tensordict = out


def test_the_time_limit_truncates_and_resets_only_the_copies_that_ended() -> None:
    env = make_env(
        "torchrl",
        factory="tests.toy_envs:Rendezvous",
        factory_kwargs={"length": 50},
        num_envs=3,
        max_episode_steps=7,
        seed=1,
    )
    rollout = env.rollout(20, break_when_any_done=False)
    done = rollout["next", "done"].squeeze(-1)
    assert done.nonzero()[:, 1].unique().tolist() == [6, 13]
    assert (
        torch.equal(done, rollout["next", "truncated"].squeeze(-1))
        and not rollout["next", "terminated"].any()
    )


def test_same_seed_same_rollout() -> None:
    rollouts = []
    for _ in range(2):
        torch.manual_seed(0)  # rand_action's draws
        rollouts.append(spread(seed=3).rollout(10, break_when_any_done=False))
    first, second = rollouts
    assert torch.equal(first["next", "agents", "observation"], second["next", "agents", "observation"])


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"task": "mpe2.simple_spread_v3:env"}, "not a PettingZoo ParallelEnv; give the task's parallel_env"),
        ({"task": "not_a_package.tasks:parallel_env"}, "cannot import 'not_a_package'; install the package"),
        ({"task": "mpe2.simple_spread_v3:nope"}, "module 'mpe2.simple_spread_v3' has no 'nope'"),
    ],
)
def test_pettingzoo_tasks_that_do_not_fit_are_refused_naming_the_fix(env, message) -> None:
    with pytest.raises(ConfigError, match=message):
        FP3OModule(env={**SPREAD, **env})


class NoGroup(EnvBase):
    """One action at the root: no agent group."""

    def __init__(self) -> None:
        super().__init__(batch_size=[])
        self.observation_spec = Composite(observation=Unbounded((3,)))
        self.action_spec = Composite(action=Bounded(-1.0, 1.0, (2,)))

    def _reset(self, tensordict=None, **kwargs):
        return TensorDict({"observation": torch.zeros(3)}, [])

    def _step(self, tensordict):
        return TensorDict(
            {"observation": torch.zeros(3), "reward": torch.zeros(1), "done": torch.ones(1, dtype=bool)}, []
        )

    def _set_seed(self, seed):
        pass


class Mixed(NoGroup):
    """A continuous group and a discrete one; vector rewards when ``vector``."""

    def __init__(self, vector: bool = False) -> None:
        super().__init__()
        self.observation_spec = Composite(
            a=Composite(observation=Unbounded((1, 3)), shape=(1,)),
            b=Composite(observation=Unbounded((1, 3)), shape=(1,)),
        )
        second = Bounded(-1.0, 1.0, (1, 2)) if vector else Categorical(3, (1,))
        self.action_spec = Composite(
            a=Composite(action=Bounded(-1.0, 1.0, (1, 2)), shape=(1,)), b=Composite(action=second, shape=(1,))
        )
        size = 2 if vector else 1
        self.reward_spec = Composite(
            a=Composite(reward=Unbounded((1, size)), shape=(1,)),
            b=Composite(reward=Unbounded((1, 1)), shape=(1,)),
        )


@pytest.mark.parametrize(
    ("factory", "options", "message"),
    [
        ("tests.test_adapter:NoGroup", {}, "has no agent group: its actions are \\['action'\\]"),
        ("tests.test_adapter:Mixed", {}, "mix continuous and discrete actions"),
        (
            "tests.test_adapter:Mixed",
            {"factory_kwargs": {"vector": True}},
            "cannot be combined into one team reward",
        ),
        (
            "tests.toy_envs:TwoGroups",
            {"groups": ["nobody"]},
            "are not agent groups of the environment; its groups",
        ),
        ("tests.toy_envs:_flags", {"factory_kwargs": {"n": 1}}, "built a dict, not a TorchRL EnvBase"),
    ],
)
def test_torchrl_environments_that_do_not_fit_are_refused_naming_the_fix(factory, options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        FP3OModule(env={"name": "torchrl", "factory": factory, **options})


def test_a_misfit_stops_the_command_with_one_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--model.env={json.dumps({**SPREAD, 'task': 'mpe2.simple_spread_v3:env'})}"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "INFO mlflow" not in line]
    assert len(err) == 1 and "not a PettingZoo ParallelEnv" in err[0]


def learned_and_random_returns(env: dict, frames: int, **options) -> tuple[float, float]:
    """Evaluation returns of the untrained policy and of the policy after ``frames`` frames of FP3O."""
    module = FP3OModule(
        env=env, sharing="fups", total_frames=frames, eval_episodes=16, time_limit="bootstrap", **options
    )
    fit_quietly(module)  # attaches a trainer
    before = FP3OModule(env=env, sharing="fups", total_frames=frames, eval_episodes=16, **options)
    before.trainer = module.trainer  # evaluate needs a trainer's device only
    return float(module.evaluate()["returns"].mean()), float(before.evaluate()["returns"].mean())


def test_fp3o_learns_simple_spread() -> None:
    """Within a short run FP3O's return rises clearly above the random initial policy's (measured: -22 against
    -31 after 12,000 frames)."""
    learned, random = learned_and_random_returns(
        SPREAD,
        12_000,
        num_envs=8,
        rollout_length=25,
        num_minibatches=2,
        actor_lr=5e-4,
        critic_lr=5e-4,
        entropy_coef=0.01,
    )
    assert learned > random + 4.0, (learned, random)


def test_fp3o_learns_the_notebooks_environment() -> None:
    learned, random = learned_and_random_returns(
        RENDEZVOUS,
        8_000,
        num_envs=8,
        rollout_length=20,
        num_minibatches=2,
        actor_lr=3e-3,
        critic_lr=3e-3,
        entropy_coef=0.0,
    )
    assert learned > random / 2 and learned > -8.0, (learned, random)


def test_pettingzoo_run_crashes_and_resumes_exactly(tmp_path, monkeypatch) -> None:
    """The tasks' state is in the checkpoint (pickled PettingZoo tasks): a crashed run resumes exactly."""
    args = ["fit", f"--model.env={json.dumps(SPREAD)}", "--model.sharing=fups", "--model.num_envs=2"]
    args += ["--model.rollout_length=30", "--model.total_frames=300", "--model.num_minibatches=2"]
    args += ["--model.ppo_epochs=2", "--model.eval_interval=2", "--model.eval_episodes=2"]
    args += ["--model.checkpoint_interval=1", "--trainer.enable_progress_bar=false"]
    reference, crashed = crash_and_resume(tmp_path, monkeypatch, args)
    assert run_metrics(crashed) == run_metrics(reference)


def test_closing_keeps_the_processs_torch_threads() -> None:
    """TorchRL's batched environments raise torch's thread count when they close; the adapter's keep the
    trainer's setting (one thread is many times faster than more on busy cores), also when collected."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        env = make_env("torchrl", factory="tests.toy_envs:Rendezvous", num_envs=8, seed=0)
        env.rollout(3)
        env.close()
        assert torch.get_num_threads() == 1
        env = make_env("torchrl", factory="tests.toy_envs:Rendezvous", num_envs=8, seed=0)
        env.rollout(3)
        del env  # closed by the garbage collector, which may run while torch.compile traces
        gc.collect()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_natively_batched_torchrl_environment_trains() -> None:
    """TorchRL's own VMAS wrapper builds all the copies at once (``batch_argument: num_envs``); the policy's
    Gaussian actions beyond the bounds are clipped before VMAS (which refuses them) sees them."""
    pytest.importorskip("vmas")
    env = {
        "name": "torchrl",
        "factory": "torchrl.envs.libs.vmas:VmasEnv",
        "factory_kwargs": {"scenario": "balance", "n_agents": 4, "max_steps": 20},
        "batch_argument": "num_envs",
        "max_episode_steps": 20,
    }
    adapted = make_env(**env, num_envs=3, seed=0)
    assert (adapted.n_agents, adapted.observation_sizes[0], adapted.state_size) == (4, 16, 64)
    rollout = adapted.rollout(25, break_when_any_done=False)
    assert rollout["next", "done"].squeeze(-1).nonzero()[:, 1].unique().tolist() == [19]  # VMAS's max_steps
    module = FP3OModule(
        env=env,
        sharing="fups",
        num_envs=4,
        rollout_length=20,
        total_frames=160,
        num_minibatches=2,
        eval_episodes=4,
        eval_num_envs=4,
    )
    fit_quietly(module)
    assert module.frames == 160 and torch.isfinite(module.evaluate()["returns"]).all()
