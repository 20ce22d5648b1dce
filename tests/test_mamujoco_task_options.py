"""``model.env.xml_file``, ``timestep`` and ``gym_kwargs``: the MuJoCo model a MaMuJoCo task simulates
(Walker2d's model of gym v2–v4, which the paper's code simulated, against v5's; the paper code's Manyagent
Swimmer timestep) and further arguments of its Gymnasium task (Ant without contact cost, as the paper's code
ran it), in every sub-env, with clear errors and their own task labels."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest
import torch

from fp3o_lightning.envs import MaMuJoCoEnv, task_name


def foot_frictions(sim) -> tuple[float, float]:
    """The sliding friction of Walker2d's right and left foot."""
    geoms = (
        mujoco.mj_name2id(sim.model, mujoco.mjtObj.mjOBJ_GEOM, n) for n in ("foot_geom", "foot_left_geom")
    )
    right, left = (float(sim.model.geom_friction[g, 0]) for g in geoms)
    return right, left


def test_walker2d_simulates_the_model_given() -> None:
    """v5 by default (both feet 1.9); ``walker2d.xml`` gives gym v2's right foot (0.9), in every sub-env,
    a rebuilt one included."""
    default = MaMuJoCoEnv("Walker2d", "2x3", agent_obsk=1, num_envs=1)
    assert foot_frictions(default._sims[0]) == pytest.approx((1.9, 1.9))
    legacy = MaMuJoCoEnv("Walker2d", "2x3", agent_obsk=1, num_envs=2, xml_file="walker2d.xml", seed=0)
    legacy.reset()
    legacy._rebuild(1)
    assert [foot_frictions(sim) for sim in legacy._sims] == [pytest.approx((0.9, 1.9))] * 2
    assert legacy.observation_sizes == default.observation_sizes


def test_model_files_that_cannot_be_used_are_refused_with_the_fix() -> None:
    with pytest.raises(
        ValueError, match=r"neither a file .* nor one of Gymnasium's MuJoCo assets: .*walker2d\.xml"
    ):
        MaMuJoCoEnv("Walker2d", "2x3", xml_file="walker2d_v2.xml")
    with pytest.raises(ValueError, match="ManySegmentSwimmer, which builds its own model; leave it unset"):
        MaMuJoCoEnv("ManySegmentSwimmer", "8x2", xml_file="swimmer.xml")


def test_gym_kwargs_reach_every_sub_env_and_its_reward() -> None:
    """``{contact_cost_weight: 0}``: every sub-env, a rebuilt one included, pays no contact cost; the reward
    of the same step from the same state differs from the default task's by exactly that cost."""
    default = MaMuJoCoEnv("Ant", "2x4", agent_obsk=1, num_envs=2, seed=0)
    free = MaMuJoCoEnv("Ant", "2x4", agent_obsk=1, num_envs=2, seed=0, gym_kwargs={"contact_cost_weight": 0})
    free.reset()
    free._rebuild(1)
    assert [sim._contact_cost_weight for sim in free._sims] == [0, 0]
    assert default._sims[0]._contact_cost_weight == pytest.approx(5e-4) and free.gym_kwargs == {
        "contact_cost_weight": 0
    }
    tensordict = default.reset()
    free.load_state_dict(default.state_dict())
    costs, differences = [], []
    for _ in range(100):  # random actions: the feet touch the ground now and then
        action = default.rand_action(tensordict)
        tensordict, other = default.step(action.clone())["next"], free.step(action.clone())["next"]
        assert torch.equal(tensordict["state"], other["state"])
        # Ant-v5's state ends with the clipped contact forces of its 13 bodies (6 each): the cost's inputs.
        costs.append(5e-4 * (tensordict["state"][:, -78:].double() ** 2).sum(-1))
        differences.append((other["reward"] - tensordict["reward"]).squeeze(-1).double())
    assert (torch.stack(costs) > 0).any()
    torch.testing.assert_close(torch.stack(differences), torch.stack(costs), rtol=1e-3, atol=1e-6)


def test_gym_kwargs_that_cannot_be_used_are_refused_with_the_fix() -> None:
    with pytest.raises(
        ValueError, match="contact_cost is not an argument of AntEnv; its arguments: .*contact_cost_weight"
    ):
        MaMuJoCoEnv("Ant", "2x4", gym_kwargs={"contact_cost": 0})
    with pytest.raises(ValueError, match="gym_kwargs.xml_file: set it with model.env.xml_file instead"):
        MaMuJoCoEnv("Walker2d", "2x3", gym_kwargs={"xml_file": "walker2d.xml"})


def test_another_model_is_another_task() -> None:
    env = {"name": "mamujoco", "scenario": "Walker2d", "agent_conf": "2x3", "observation_layout": "official"}
    assert task_name(env | {"xml_file": "walker2d.xml"}) == "Walker2d 2x3 official-obs walker2d.xml"
    assert task_name(env | {"xml_file": "/models/walker2d.xml"}) == "Walker2d 2x3 official-obs walker2d.xml"
    assert task_name(env | {"xml_file": None}) == task_name(env | {"xml_file": "None"}) == task_name(env)
    ant = {
        "name": "mamujoco",
        "scenario": "Ant",
        "agent_conf": "2x4",
        "gym_kwargs": {"contact_cost_weight": 0},
    }
    assert task_name(ant) == "Ant 2x4 contact_cost_weight=0"
    flattened = {k: v for k, v in ant.items() if k != "gym_kwargs"} | {"gym_kwargs/contact_cost_weight": "0"}
    assert task_name(flattened) == task_name(ant)  # as MLflow logs the option


def test_the_swimmer_steps_the_timestep_given() -> None:
    """``timestep=0.005`` (the paper code's Manyagent Swimmer) in every sub-env, a rebuilt one included: an
    env step is four MuJoCo steps of 0.005 s, and the reward is the torso's x velocity over those 0.02 s
    less the control cost, where the default model steps 0.01 s."""
    assert MaMuJoCoEnv("ManySegmentSwimmer", "8x2", agent_obsk=1)._sims[0].dt == pytest.approx(0.04)
    env = MaMuJoCoEnv("ManySegmentSwimmer", "8x2", agent_obsk=1, num_envs=2, seed=0, timestep=0.005)
    tensordict = env.reset()
    env._rebuild(1)
    assert [sim.model.opt.timestep for sim in env._sims] == [0.005, 0.005] and env.timestep == 0.005
    sim = env._sims[0]
    for _ in range(3):
        action = env.rand_action(tensordict)
        data = mujoco.MjData(sim.model)  # the state before the step, stepped by MuJoCo itself
        data.qpos[:], data.qvel[:] = sim.data.qpos, sim.data.qvel
        x_before = float(sim.data.qpos[0])
        control = action["agents", "action"][0][env.action_mask].double().numpy()
        tensordict = env.step(action)["next"]
        data.ctrl[:] = sim.data.ctrl
        for _ in range(4):
            mujoco.mj_step(sim.model, data)
        np.testing.assert_allclose(sim.data.qpos, data.qpos, rtol=1e-10, atol=1e-12)
        expected = (float(data.qpos[0]) - x_before) / 0.02 - 1e-4 * float((control**2).sum())
        assert float(tensordict["reward"][0]) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_timesteps_that_cannot_be_used_are_refused_with_the_fix() -> None:
    for timestep in (0, -0.01, float("nan"), "0.005", True):
        with pytest.raises(ValueError, match=r"timestep must be .* a number > 0 \(e\.g\. 0\.005\)"):
            MaMuJoCoEnv("ManySegmentSwimmer", "8x2", timestep=timestep)


def test_another_timestep_is_another_task() -> None:
    swimmer = {"name": "mamujoco", "scenario": "ManySegmentSwimmer", "agent_conf": "8x2"}
    assert task_name(swimmer | {"timestep": 0.005}) == "ManySegmentSwimmer 8x2 timestep=0.005"
    assert task_name(swimmer | {"timestep": "0.005"}) == task_name(swimmer | {"timestep": 0.005})  # MLflow's
    unset = task_name(swimmer)
    assert task_name(swimmer | {"timestep": None}) == task_name(swimmer | {"timestep": "None"}) == unset
