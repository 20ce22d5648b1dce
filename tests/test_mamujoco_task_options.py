"""``model.env.xml_file`` and ``gym_kwargs``: the MuJoCo model a MaMuJoCo task simulates (Walker2d's model of
gym v2–v4, which the paper's code simulated, against v5's) and further arguments of its Gymnasium task (Ant
without contact cost, as the paper's code ran it), in every sub-env, with clear errors and their own task
labels."""

from __future__ import annotations

import pytest
import torch

from fp3o_lightning.envs import MaMuJoCoEnv, task_name


def foot_frictions(sim) -> tuple[float, float]:
    """The sliding friction of Walker2d's right and left foot."""
    import mujoco

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
