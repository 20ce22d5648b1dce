"""MaMuJoCoEnv's observation gathers and vectorised dynamics equal gymnasium(-robotics), bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fp3o_lightning.envs import MaMuJoCoEnv
from fp3o_lightning.envs.mamujoco import _trace_gathers

PAPER_TASKS = [
    ("HalfCheetah", "6x1"),
    ("Ant", "2x4"),
    ("Walker2d", "2x3"),
    ("Hopper", "3x1"),
    ("Reacher", "2x1"),
    ("ManySegmentSwimmer", "8x2"),
]
#: Tasks whose reward and termination are computed by MaMuJoCoEnv (the others keep Gymnasium's step).
VECTORISED = {
    ("HalfCheetah", "6x1"): "forward",
    ("HalfCheetah", None): "forward",
    ("Ant", "2x4"): "ant",
    ("Walker2d", "2x3"): "walker",
    ("Hopper", "3x1"): "hopper",
    ("Swimmer", "2x1"): "forward",
    ("ManySegmentSwimmer", "8x2"): "forward",
    ("ManySegmentAnt", "2x3"): "ant",
}


def _random_actions(env: MaMuJoCoEnv, steps: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (steps, env.num_envs, env.n_agents, env.max_action_dim)
    spec = env.full_action_spec[("agents", "action")]
    return spec.space.low + (spec.space.high - spec.space.low) * torch.rand(shape, generator=gen)


def _gathered_float64(env: MaMuJoCoEnv) -> np.ndarray:
    """The gathers of all sub-envs in float64, before the float32 buffers: ``[num_envs, entries]``."""
    values = env._src.take(env._gather_index, axis=1)
    if env._gather_bounds is not None:  # np.clip itself, not the env's min/max shortcut
        np.clip(values, *env._gather_bounds, out=values)
    return values


def _assert_gathers_equal_gymnasium(env: MaMuJoCoEnv) -> None:
    values = _gathered_float64(env)
    end, width = env._gather_obs_end, env.max_obs_dim
    for i, (penv, sim) in enumerate(zip(env._penvs, env._sims, strict=True)):
        for j, a in enumerate(env._gathered_agents):
            d = env.observation_sizes[a]
            expected = penv._get_obs_agent(a)
            np.testing.assert_array_equal(values[i, j * width : j * width + d], expected)
            assert (values[i, j * width + d : (j + 1) * width] == 0).all()
        if env._state_gathered:
            np.testing.assert_array_equal(values[i, end:], sim._get_obs())
        for a in range(env.n_agents):  # and the output buffers hold them (float32), fallbacks included
            d = env.observation_sizes[a]
            np.testing.assert_array_equal(env._obs[i, a, :d], penv._get_obs_agent(a).astype(np.float32))
        np.testing.assert_array_equal(env._state[i], sim._get_obs().astype(np.float32))


@pytest.mark.parametrize("agent_obsk", [0, 1, 5])
@pytest.mark.parametrize(("scenario", "agent_conf"), PAPER_TASKS)
def test_gathers_equal_get_obs_agent(scenario: str, agent_conf: str, agent_obsk: int) -> None:
    env = MaMuJoCoEnv(scenario, agent_conf, agent_obsk=agent_obsk, num_envs=2, max_episode_steps=25, seed=3)
    if scenario != "Reacher":  # its observations hold sines and position differences: not gathers
        assert env._gathered_agents == list(range(env.n_agents)) and env._state_gathered
    td = env.reset()
    _assert_gathers_equal_gymnasium(env)
    for action in _random_actions(env, 40, seed=agent_obsk):
        td.set(("agents", "action"), action)
        _, td = env.step_and_maybe_reset(td)  # resets inside: truncation at 25 steps, Hopper falls
        _assert_gathers_equal_gymnasium(env)
    env.close()


def test_trace_gathers_recognises_gathers_and_clips_only() -> None:
    env = MaMuJoCoEnv("HalfCheetah", "6x1", num_envs=1)
    sim = env._sims[0]
    data = sim.data
    fns = [
        lambda: sim.data.qpos[[3, 1]],
        lambda: np.clip(sim.data.qvel[:4], -0.5, 2.0),
        lambda: np.clip(sim.data.qvel[:2], -np.inf, 1e-3),
        lambda: np.array([]),
        lambda: np.clip(sim.data.qvel[:2], 0.25, np.inf),  # a bound among the probe values: not recognised
        lambda: np.sin(sim.data.qpos),
        lambda: sim.data.qpos[1:2] - sim.data.qpos[0:1],
        lambda: np.abs(sim.data.qvel),
        lambda: np.zeros(2),
        lambda: sim.data.qpos * 2.0,
        lambda: sim.data.xquat,  # not a source field
    ]
    gathers = _trace_gathers(sim, fns)
    assert sim.data is data  # the probes were swapped back
    nq = data.qpos.size
    np.testing.assert_array_equal(gathers[0].index, [3, 1])
    assert np.isneginf(gathers[0].low).all() and np.isposinf(gathers[0].high).all()
    np.testing.assert_array_equal(gathers[1].index, nq + np.arange(4))
    np.testing.assert_array_equal(gathers[1].low, [-0.5] * 4)
    np.testing.assert_array_equal(gathers[1].high, [2.0] * 4)
    assert np.isneginf(gathers[2].low).all()
    np.testing.assert_array_equal(gathers[2].high, [1e-3] * 2)
    assert gathers[3] is not None and gathers[3].index.size == 0
    assert gathers[4:] == [None] * 7
    env.close()


def _perturb(env: MaMuJoCoEnv, rng: np.random.Generator) -> None:
    """Random states, many outside the healthy ranges (and huge velocities), set as Gymnasium sets them."""
    for sim in env._sims:
        scale = rng.choice([0.01, 0.3, 1.0])
        qpos = sim.init_qpos + scale * rng.standard_normal(sim.model.nq)
        qvel = sim.init_qvel + rng.choice([0.1, 10.0, 200.0]) * rng.standard_normal(sim.model.nv)
        sim.set_state(qpos, qvel)


@pytest.mark.filterwarnings("ignore:MuJoCo.*unstable:RuntimeWarning")  # some random states blow up
@pytest.mark.parametrize(("scenario", "agent_conf"), list(VECTORISED))
def test_vectorised_dynamics_equal_gymnasium_step(scenario: str, agent_conf: str | None) -> None:
    """Float64 rewards and terminations equal Gymnasium's ``step`` on twin simulators, from any state."""
    env = MaMuJoCoEnv(scenario, agent_conf, num_envs=3, seed=0)
    assert env._dynamics is not None and env._dynamics.kind == VECTORISED[scenario, agent_conf]
    twins = MaMuJoCoEnv(scenario, agent_conf, num_envs=3, seed=0)  # only their Gymnasium envs are used
    rng = np.random.default_rng(1)
    td = env.reset()
    twins.reset()
    terminations = 0
    for t, action in enumerate(_random_actions(env, 30, seed=2)):
        if t % 3 == 0:
            _perturb(env, rng)
        twins.load_state_dict(env.state_dict())  # the same full simulator states
        td.set(("agents", "action"), action)
        with np.errstate(all="ignore"):
            out = env.step(td)
            global_action = np.clip(action.numpy(), env._act_low, env._act_high)[
                :, env._act_agent, env._act_slot
            ].astype(np.float64)
            reward, terminated = env._dynamics(env._before, env._dynamics.control_cost(global_action))
            for i, twin in enumerate(twins._sims):
                _, twin_reward, twin_terminated, _, _ = twin.step(global_action[i])
                np.testing.assert_array_equal(twin.data.qpos, env._sims[i].data.qpos)
                np.testing.assert_array_equal(reward[i], twin_reward)  # float64; NaN equals NaN here
                np.testing.assert_array_equal(out["next", "reward"][i, 0].numpy(), np.float32(twin_reward))
                assert terminated[i] == twin_terminated == out["next", "terminated"][i, 0].item()
                terminations += int(twin_terminated)
        td = out["next"].clone()
    if VECTORISED[scenario, agent_conf] != "forward":
        assert terminations > 0  # the unhealthy branch was exercised
    env.close()
    twins.close()


def test_sum_over_rows_equals_sum_of_each_row() -> None:
    """The vectorised cost sums (axis 1) add in the same order as Gymnasium's ``np.sum`` of one row."""
    rng = np.random.default_rng(0)
    for width in [*range(1, 40), 84, 96, 130, 300]:
        rows = rng.standard_normal((5, width)) * 10.0 ** rng.uniform(-3, 3, (5, width))
        sums = np.sum(np.square(rows), axis=1)
        for i in range(5):
            assert sums[i] == np.sum(np.square(rows[i].copy()))
        matrix = rows.reshape(5, -1, 6) if width % 6 == 0 else None
        if matrix is not None:  # Ant's contact cost sums a [nbody, 6] array
            for i in range(5):
                assert sums[i] == np.sum(np.square(matrix[i].copy()))


def test_min_max_clip_equals_np_clip() -> None:
    """With no bound a zero, np.maximum/np.minimum clip exactly like np.clip, NaN and -0.0 included."""
    from fp3o_lightning.envs.mamujoco import _clip

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 7)) * 3.0
    x[0, :4] = [np.nan, -0.0, 0.0, np.inf]
    x[1, :3] = [-np.inf, -1.0, 1.0]
    low = np.array([-1.0, -0.5, -np.inf, -2.0, -1e-3, -1.0, -np.inf])
    high = np.array([1.0, 0.5, np.inf, 3.0, 1e-3, np.inf, 2.0])
    expected = np.clip(x, low, high)
    got = _clip(x, low, high, np.empty_like(x), exact_min_max=True)
    np.testing.assert_array_equal(got, expected)
    assert (np.signbit(got) == np.signbit(expected)).all()
    for scalar_low, scalar_high in ((-1.0, 1.0), (-0.4, 0.4)):
        np.testing.assert_array_equal(
            _clip(x, scalar_low, scalar_high, np.empty_like(x), True), np.clip(x, scalar_low, scalar_high)
        )
