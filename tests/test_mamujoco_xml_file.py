"""``model.env.xml_file``: the MuJoCo model a MaMuJoCo task simulates (Walker2d's model of gym v2–v4, which
the paper's code simulated, against v5's), in every sub-env, with clear errors and its own task label."""

from __future__ import annotations

import pytest

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
    with pytest.raises(ValueError, match="generated from agent_conf; leave it unset"):
        MaMuJoCoEnv("ManySegmentSwimmer", "8x2", xml_file="swimmer.xml")


def test_another_model_is_another_task() -> None:
    env = {"name": "mamujoco", "scenario": "Walker2d", "agent_conf": "2x3", "observation_layout": "official"}
    assert task_name(env | {"xml_file": "walker2d.xml"}) == "Walker2d 2x3 official-obs walker2d.xml"
    assert task_name(env | {"xml_file": "/models/walker2d.xml"}) == "Walker2d 2x3 official-obs walker2d.xml"
    assert task_name(env | {"xml_file": None}) == task_name(env | {"xml_file": "None"}) == task_name(env)
