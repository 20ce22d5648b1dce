"""Tests for :class:`fp3o_lightning.envs.MaMuJoCoEnv`: specs, exactness vs gymnasium-robotics, dones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs

from fp3o_lightning.envs import MaMuJoCoEnv, make_env

PAPER_TASKS = [
    ("Reacher", "2x1"),
    ("Ant", "2x4"),
    ("Walker2d", "2x3"),
    ("Hopper", "3x1"),
    ("HalfCheetah", "6x1"),
    ("ManySegmentSwimmer", "8x2"),
]


def _random_actions(env: MaMuJoCoEnv, steps: int, seed: int) -> torch.Tensor:
    """In-bound float32 actions ``[steps, num_envs, n_agents, max_action_dim]``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (steps, env.num_envs, env.n_agents, env.max_action_dim)
    spec = env.full_action_spec[("agents", "action")]
    return spec.space.low + (spec.space.high - spec.space.low) * torch.rand(shape, generator=gen)


def _rollout(env: MaMuJoCoEnv, actions: torch.Tensor) -> TensorDict:
    """Step ``env`` with the given actions via ``step_and_maybe_reset``; stack to ``[steps, num_envs]``."""
    td = env.reset()
    out = []
    for action in actions:
        td.set(("agents", "action"), action)
        data, td = env.step_and_maybe_reset(td)
        out.append(data)
    return torch.stack(out)


@pytest.mark.parametrize(("scenario", "agent_conf"), PAPER_TASKS)
def test_check_env_specs_paper_tasks(scenario: str, agent_conf: str) -> None:
    env = MaMuJoCoEnv(scenario, agent_conf, num_envs=2, seed=0)
    check_env_specs(env)
    assert env.scenario == scenario and env.agent_conf == agent_conf
    assert len(env.agent_names) == env.n_agents == len(env.observation_sizes) == len(env.action_sizes)
    td = env.reset()
    assert td["agents", "observation"].shape == (2, env.n_agents, max(env.observation_sizes))
    assert td["agents", "observation"].dtype == torch.float32
    assert td["state"].shape == (2, env.state_size)
    spec = env.full_action_spec[("agents", "action")]
    assert spec.shape == (2, env.n_agents, max(env.action_sizes))
    td = env.rand_step(td)
    assert td["next", "reward"].shape == (2, 1) and td["next", "reward"].dtype == torch.float32
    for key in ("done", "terminated", "truncated"):
        assert td["next", key].shape == (2, 1) and td["next", key].dtype == torch.bool


def test_shapes_and_attributes_hopper() -> None:
    env = MaMuJoCoEnv("Hopper", "3x1", num_envs=2)
    assert env.n_agents == 3
    assert env.agent_names == ["agent_0", "agent_1", "agent_2"]
    assert env.observation_sizes == [8, 9, 8]
    assert env.action_sizes == [1, 1, 1]
    assert env.state_size == 11
    assert env.observation_mask.sum(-1).tolist() == [8, 9, 8]
    assert env.action_mask.all()


@pytest.mark.parametrize(
    ("scenario", "agent_conf", "max_episode_steps", "action_scale"),
    [
        ("HalfCheetah", "6x1", 1000, 1.0),  # unequal observation sizes
        ("HalfCheetah", "2x3", 30, 1.0),  # truncation + auto-reset inside the window
        ("Hopper", "3x1", 1000, 1.0),  # unequal observation sizes, falls and auto-resets
        ("Ant", "2x4", 1000, 1.0),  # cfrc_ext observations (clipped per body)
        ("ManySegmentSwimmer", "8x2", 1000, 1.0),  # asset generated into a private temp dir
        # Out of the action bounds: the control cost is charged on the action as given (the default).
        ("HalfCheetah", "6x1", 1000, 2.5),
        ("Ant", "2x4", 1000, 2.5),
        ("Reacher", "2x1", 50, 2.5),  # Gymnasium's own step path
    ],
)
def test_exactly_matches_gymnasium_robotics(
    scenario: str, agent_conf: str, max_episode_steps: int, action_scale: float
) -> None:
    """Raw observations, state and reward equal a plain ``parallel_env`` bit-for-bit (incl. auto-resets),
    in and out of the action bounds."""
    from gymnasium_robotics import mamujoco_v1

    num_envs, steps, seed = 2, 100, 11
    env = MaMuJoCoEnv(scenario, agent_conf, num_envs=num_envs, max_episode_steps=max_episode_steps, seed=seed)
    actions = action_scale * _random_actions(env, steps, seed=0)
    td = env.reset()
    refs = [mamujoco_v1.parallel_env(scenario, agent_conf, agent_obsk=1) for _ in range(num_envs)]
    ref_obs = [ref.reset(seed=seed + i)[0] for i, ref in enumerate(refs)]
    elapsed = [0] * num_envs
    n_resets = 0

    def check_obs(obs: torch.Tensor, state: torch.Tensor, i: int) -> None:
        for a, name in enumerate(refs[i].possible_agents):
            expected = ref_obs[i][name].astype(np.float32)
            d = env.observation_sizes[a]
            assert expected.shape == (d,)
            np.testing.assert_array_equal(obs[i, a, :d].numpy(), expected)
            assert (obs[i, a, d:] == 0).all()
        np.testing.assert_array_equal(state[i].numpy(), refs[i].state().astype(np.float32))

    for i in range(num_envs):
        check_obs(td["agents", "observation"], td["state"], i)
    for t in range(steps):
        td.set(("agents", "action"), actions[t])
        data, td = env.step_and_maybe_reset(td)
        for i, ref in enumerate(refs):
            ref_actions = {
                name: actions[t, i, a, : env.action_sizes[a]].numpy()
                for a, name in enumerate(ref.possible_agents)
            }
            ref_obs[i], rew, term, trunc, _ = ref.step(ref_actions)
            elapsed[i] += 1
            agent = ref.possible_agents[0]
            assert all(r == rew[agent] for r in rew.values())
            assert data["next", "reward"][i, 0].item() == np.float32(rew[agent])
            assert data["next", "terminated"][i, 0].item() == term[agent]
            assert data["next", "truncated"][i, 0].item() == (elapsed[i] >= max_episode_steps)
            check_obs(data["next", "agents", "observation"], data["next", "state"], i)
            if term[agent] or elapsed[i] >= max_episode_steps:
                ref_obs[i] = ref.reset()[0]
                elapsed[i] = 0
                n_resets += 1
            check_obs(td["agents", "observation"], td["state"], i)
    if max_episode_steps < steps:
        assert n_resets >= num_envs * (steps // max_episode_steps)
    if scenario == "Hopper":
        assert n_resets > 0  # random actions make the hopper fall: auto-reset path exercised


def test_short_time_limit_truncates_and_resets() -> None:
    env = MaMuJoCoEnv("HalfCheetah", "6x1", num_envs=2, max_episode_steps=5, seed=0)
    td = env.rollout(12, break_when_any_done=False)
    truncated = td["next", "truncated"].squeeze(-1)
    expected = torch.tensor([t % 5 == 4 for t in range(12)]).expand(2, 12)
    assert torch.equal(truncated, expected)
    assert not td["next", "terminated"].any()
    assert torch.equal(td["next", "done"].squeeze(-1), expected)
    # after the truncated step the sub-env was reset: the next root observation is not the final one
    assert not torch.equal(td[:, 5]["agents", "observation"], td[:, 4]["next", "agents", "observation"])
    assert torch.equal(td[:, 6]["agents", "observation"], td[:, 5]["next", "agents", "observation"])


def test_gymnasium_time_limit_is_replaced() -> None:
    """Reacher-v5 is registered with a 50-step TimeLimit; only max_episode_steps must count."""
    env = MaMuJoCoEnv("Reacher", "2x1", num_envs=1, max_episode_steps=60, seed=0)
    td = env.rollout(60, break_when_any_done=False)
    truncated = td["next", "truncated"].squeeze(-1)[0]
    assert truncated.nonzero().flatten().tolist() == [59]
    assert not td["next", "terminated"].any()


def test_hopper_fall_terminates() -> None:
    env = MaMuJoCoEnv("Hopper", "3x1", num_envs=1, seed=0)
    td = env.reset()
    action = torch.ones(1, env.n_agents, env.max_action_dim)
    for _ in range(200):
        td.set(("agents", "action"), action)
        data, td = env.step_and_maybe_reset(td)
        if data["next", "done"].any():
            break
    else:
        pytest.fail("Hopper did not fall within 200 steps")
    assert data["next", "terminated"].item() and not data["next", "truncated"].item()
    # auto-reset: the episode restarts, so the hopper keeps going for more steps without a done
    td.set(("agents", "action"), torch.zeros_like(action))
    data, _ = env.step_and_maybe_reset(td)
    assert not data["next", "done"].any()


def test_clip_actions_option_and_padding_ignored() -> None:
    big = 3.0 * _random_actions(MaMuJoCoEnv("Hopper", "3x1"), 20, seed=1).expand(-1, 2, -1, -1)
    clipped = big.clamp(-1.0, 1.0)
    # clip_actions: out-of-bound actions are clipped first, so they are the clipped actions exactly.
    out_a = _rollout(MaMuJoCoEnv("Hopper", "3x1", num_envs=2, seed=5, clip_actions=True), big)
    out_b = _rollout(MaMuJoCoEnv("Hopper", "3x1", num_envs=2, seed=5), clipped)
    assert torch.equal(out_a["next", "agents", "observation"], out_b["next", "agents", "observation"])
    assert torch.equal(out_a["next", "reward"], out_b["next", "reward"])
    # Default: MuJoCo clamps the controls (the same physics), but the control cost is the action's.
    out_c = _rollout(MaMuJoCoEnv("Hopper", "3x1", num_envs=2, seed=5), big)
    assert torch.equal(out_c["next", "agents", "observation"], out_b["next", "agents", "observation"])
    extra_cost = 1e-3 * (big.square().sum((-2, -1)) - clipped.square().sum((-2, -1)))
    torch.testing.assert_close(
        out_b["next", "reward"].squeeze(-1) - out_c["next", "reward"].squeeze(-1),
        extra_cost.float(),
        rtol=1e-4,
        atol=1e-5,
    )

    # padded action entries are ignored: Humanoid 9|8's agent_1 uses 8 of its 9 action slots
    env_c = MaMuJoCoEnv("Humanoid", "9|8", num_envs=1, seed=3)
    env_d = MaMuJoCoEnv("Humanoid", "9|8", num_envs=1, seed=3)
    acts = _random_actions(env_c, 3, seed=2)
    noisy = acts.clone()
    noisy[:, :, 1, 8] = 123.0
    out_c, out_d = _rollout(env_c, acts), _rollout(env_d, noisy)
    assert torch.equal(out_c["next", "state"], out_d["next", "state"])


def test_same_seed_same_rollout_and_seed_offsets() -> None:
    actions = None
    outs = []
    for seed in (3, 3, 4):
        env = MaMuJoCoEnv("Hopper", "3x1", num_envs=2, seed=seed)
        if actions is None:
            actions = _random_actions(env, 60, seed=0)
        outs.append(_rollout(env, actions))
    assert (outs[0] == outs[1]).all()
    assert not torch.equal(outs[0]["next", "state"], outs[2]["next", "state"])
    # sub-env i is seeded with seed + i: sub-env 1 of seed 3 starts like sub-env 0 of seed 4
    assert torch.equal(outs[0][0, 1]["agents", "observation"], outs[2][0, 0]["agents", "observation"])

    # set_seed (TorchRL API) is equivalent to the constructor argument
    env = MaMuJoCoEnv("Hopper", "3x1", num_envs=2)
    env.set_seed(3)
    assert (_rollout(env, actions) == outs[0]).all()


def test_partial_reset_only_resets_masked_sub_envs() -> None:
    from gymnasium_robotics import mamujoco_v1

    env = MaMuJoCoEnv("HalfCheetah", "6x1", num_envs=3, seed=0)
    twin = MaMuJoCoEnv("HalfCheetah", "6x1", num_envs=3, seed=0)
    actions = _random_actions(env, 10, seed=0)
    td, td_twin = env.reset(), twin.reset()
    for t in range(5):
        td.set(("agents", "action"), actions[t])
        td_twin.set(("agents", "action"), actions[t])
        _, td = env.step_and_maybe_reset(td)
        _, td_twin = twin.step_and_maybe_reset(td_twin)
    before = td.clone()
    env.set_seed(100)  # sub-env i will be reset with seed 100 + i
    td.set("_reset", torch.tensor([[True], [False], [True]]))
    td = env.reset(td)
    assert "_reset" not in td.keys()  # noqa: SIM118
    assert torch.equal(td[1]["agents", "observation"], before[1]["agents", "observation"])
    assert torch.equal(td[1]["state"], before[1]["state"])
    ref = mamujoco_v1.parallel_env("HalfCheetah", "6x1", agent_obsk=1)
    for i in (0, 2):
        ref.reset(seed=100 + i)
        np.testing.assert_array_equal(td[i]["state"].numpy(), ref.state().astype(np.float32))
    # the non-reset sub-env continues exactly as in an env that was never partially reset
    for t in range(5, 10):
        td.set(("agents", "action"), actions[t])
        td_twin.set(("agents", "action"), actions[t])
        data, td = env.step_and_maybe_reset(td)
        data_twin, td_twin = twin.step_and_maybe_reset(td_twin)
        assert torch.equal(data["next", "state"][1], data_twin["next", "state"][1])
        assert not torch.equal(data["next", "state"][0], data_twin["next", "state"][0])


def test_collector_runs_across_episode_ends() -> None:
    from torchrl.collectors import Collector

    env = MaMuJoCoEnv("Hopper", "3x1", num_envs=2, max_episode_steps=20, seed=0)
    collector = Collector(env, policy=None, frames_per_batch=80, total_frames=160)
    batches = list(collector)
    collector.shutdown()
    assert len(batches) == 2
    batch = batches[0]
    assert batch.batch_size == (2, 40)
    assert batch["next", "done"].any()
    assert batch["next", "truncated"].sum() + batch["next", "terminated"].sum() >= batch["next", "done"].sum()


def test_single_agent_conf_none() -> None:
    env = MaMuJoCoEnv("Hopper", None, num_envs=1, seed=0)
    td = env.rand_step(env.reset())
    assert env.n_agents == 1 and env.action_sizes == [3]
    assert torch.equal(td["next", "agents", "observation"][:, 0], td["next", "state"])


def test_invalid_arguments_list_valid_options() -> None:
    with pytest.raises(ValueError, match="Unknown MaMuJoCo scenario") as err:
        MaMuJoCoEnv("Cheetah", "6x1")
    for name in ("Reacher", "Ant", "Walker2d", "Hopper", "HalfCheetah", "ManySegmentSwimmer", "Humanoid"):
        assert name in str(err.value)
    assert "'2x4d'" in str(err.value)
    with pytest.raises(ValueError, match="agent_conf '4x1'") as err:
        MaMuJoCoEnv("HalfCheetah", "4x1")
    assert "'6x1'" in str(err.value) and "'2x3'" in str(err.value)
    with pytest.raises(ValueError, match="n_agents>x<segments_per_agent"):
        MaMuJoCoEnv("ManySegmentSwimmer", "8by2")
    with pytest.raises(ValueError, match="agent_obsk"):
        MaMuJoCoEnv("HalfCheetah", "6x1", agent_obsk=-1)
    with pytest.raises(ValueError, match="num_envs"):
        MaMuJoCoEnv("HalfCheetah", "6x1", num_envs=0)
    with pytest.raises(ValueError, match="max_episode_steps"):
        MaMuJoCoEnv("HalfCheetah", "6x1", max_episode_steps=0)


def test_make_env() -> None:
    env = make_env("mamujoco", scenario="Hopper", agent_conf="3x1", num_envs=2)
    assert isinstance(env, MaMuJoCoEnv) and env.batch_size == (2,)
    with pytest.raises(ValueError, match="mamujoco"):
        make_env("smacv3", scenario="Hopper")


@pytest.mark.parametrize(("scenario", "agent_conf"), [("Hopper", "3x1"), ("Reacher", "2x1")])
def test_skipping_torchrl_step_processing_changes_nothing(scenario: str, agent_conf: str) -> None:
    """The lean ``step_and_maybe_reset`` and the skipped ``_step_proc_data`` give what TorchRL's generic
    path gives (taken with ``run_type_checks``), across terminations, truncations and partial resets."""
    fast = MaMuJoCoEnv(scenario, agent_conf, num_envs=2, max_episode_steps=15, seed=1)
    checked = MaMuJoCoEnv(scenario, agent_conf, num_envs=2, max_episode_steps=15, seed=1)
    checked.run_type_checks = True
    actions = _random_actions(fast, 40, seed=3)
    out_fast, out_checked = _rollout(fast, actions), _rollout(checked, actions)
    assert set(out_fast.keys(True, True)) == set(out_checked.keys(True, True))
    assert (out_fast == out_checked).all()
    assert out_fast["next", "done"].any()
