"""``observation_layout="official"``: the paper code's MaMuJoCo observations, entry by entry."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fp3o_lightning.envs import MaMuJoCoEnv
from fp3o_lightning.envs.observation_layouts import OFFICIAL_LAYOUT_DIFFERS, official_layout

#: The official code's agent observations at ``agent_obsk`` 5 (``an-anony/fp3o-icml23``, commit e01496a,
#: ``obsk.build_obs`` over its ``get_parts_and_edges`` node lists and ``mujoco_multi``'s categories), in
#: its order: ``field[i]``, clipped to +-c where ``~c``. Hopper's ``root_x`` reads ``qvel[1]``; Walker2d
#: has no global nodes; Ant appends no contact forces and its free joint's ``qpos[:7]`` and ``qvel[:6]``.
ANT_FREE_JOINT = " ".join([f"qpos[{i}]" for i in range(7)] + [f"qvel[{i}]" for i in range(6)])
OFFICIAL_OBSERVATIONS = {
    ("Hopper", "3x1"): [
        "qpos[3] qvel[3]~10 qpos[4] qpos[5] qpos[2] qpos[1] qvel[1]~10 qvel[2]~10 qvel[1]~10",
        "qpos[4] qvel[4]~10 qpos[5] qpos[3] qpos[2] qpos[1] qvel[1]~10 qvel[2]~10 qvel[1]~10",
        "qpos[5] qvel[5]~10 qpos[4] qpos[3] qpos[2] qpos[1] qvel[1]~10 qvel[2]~10 qvel[1]~10",
    ],
    ("Walker2d", "2x3"): [
        "qpos[5] qvel[5] qpos[4] qvel[4] qpos[3] qvel[3] qpos[6] qpos[7] qpos[8]",
        "qpos[8] qvel[8] qpos[7] qvel[7] qpos[6] qvel[6] qpos[3] qpos[4] qpos[5]",
    ],
    ("Ant", "2x4"): [
        "qpos[8] qvel[7] qpos[10] qvel[9] qpos[7] qvel[6] qpos[9] qvel[8] qpos[11] qpos[13] qpos[12] "
        "qpos[14] " + ANT_FREE_JOINT,
        "qpos[12] qvel[11] qpos[14] qvel[13] qpos[11] qvel[10] qpos[13] qvel[12] qpos[7] qpos[9] qpos[8] "
        "qpos[10] " + ANT_FREE_JOINT,
    ],
}


def expected_observation(entries: str, sim) -> np.ndarray:
    """The observation ``entries`` describe, read from the simulator's ``MjData``."""
    values = []
    for entry in entries.split():
        field, index, clip = re.fullmatch(r"(\w+)\[(\d+)\](?:~(\d+))?", entry).groups()
        value = float(getattr(sim.data, field)[int(index)])
        values.append(np.clip(value, -float(clip), float(clip)) if clip else value)
    return np.array(values)


@pytest.mark.parametrize(("scenario", "agent_conf"), list(OFFICIAL_OBSERVATIONS))
def test_official_layout_observes_the_official_entries(scenario: str, agent_conf: str) -> None:
    """Along random-action episodes (resets included), every agent observes exactly the official entries,
    in the official order, padded with zeros; the state is unchanged."""
    env = MaMuJoCoEnv(scenario, agent_conf, agent_obsk=5, num_envs=2, observation_layout="official", seed=3)
    gymnasium = MaMuJoCoEnv(scenario, agent_conf, agent_obsk=5, num_envs=2, seed=3)
    lists = OFFICIAL_OBSERVATIONS[scenario, agent_conf]
    assert env.observation_sizes == [len(entries.split()) for entries in lists]
    assert env.observation_sizes != gymnasium.observation_sizes or scenario == "Hopper"
    tensordict, other = env.reset(), gymnasium.reset()
    for _ in range(40):
        action = env.rand_action(tensordict)
        tensordict, other = (e.step(action.clone())["next"] for e in (env, gymnasium))
        torch.testing.assert_close(tensordict["state"], other["state"], rtol=0, atol=0)
        for i, sim in enumerate(env._sims):
            for agent, entries in enumerate(lists):
                observed = tensordict["agents", "observation"][i, agent].numpy()
                expected = expected_observation(entries, sim).astype(np.float32)
                np.testing.assert_array_equal(observed[: len(expected)], expected)
                assert not observed[len(expected) :].any()
        if tensordict["done"].any():
            tensordict = env.reset()
            other = gymnasium.reset()


def test_hopper_official_layout_lacks_only_the_forward_velocity() -> None:
    """Hopper's only difference: ``qvel[0]`` (forward velocity) is replaced by a second ``qvel[1]``."""
    official = MaMuJoCoEnv("Hopper", "3x1", agent_obsk=5, observation_layout="official", seed=0)
    gymnasium = MaMuJoCoEnv("Hopper", "3x1", agent_obsk=5, seed=0)
    a, b = official.reset()["agents", "observation"], gymnasium.reset()["agents", "observation"]
    qvel = gymnasium._sims[0].data.qvel
    for agent in range(3):
        missing = sorted(b[0, agent].tolist())
        missing.remove(float(np.float32(np.clip(qvel[0], -10, 10))))
        extra = sorted(a[0, agent].tolist())
        extra.remove(float(np.float32(np.clip(qvel[1], -10, 10))))
        assert missing == extra


@pytest.mark.parametrize(("scenario", "agent_conf"), [k for k, v in OFFICIAL_LAYOUT_DIFFERS.items() if not v])
def test_official_layout_equals_gymnasium_where_the_codes_agree(scenario: str, agent_conf: str) -> None:
    assert official_layout(scenario, agent_conf, 5) == {}
    env = MaMuJoCoEnv(scenario, agent_conf, agent_obsk=5, observation_layout="official", seed=1)
    reference = MaMuJoCoEnv(scenario, agent_conf, agent_obsk=5, seed=1)
    torch.testing.assert_close(env.reset(), reference.reset(), rtol=0, atol=0)


def test_unknown_layouts_and_tasks_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"observation_layout must be one of \('gymnasium', 'official'\)"):
        MaMuJoCoEnv("Hopper", "3x1", observation_layout="paper")
    with pytest.raises(ValueError, match="defined for the paper's tasks.*use observation_layout='gymnasium'"):
        MaMuJoCoEnv("HalfCheetah", "2x3", observation_layout="official")


def test_rebuilt_sub_envs_keep_the_layout() -> None:
    """A sub-env rebuilt after a simulator fault observes the official entries too."""
    env = MaMuJoCoEnv("Walker2d", "2x3", agent_obsk=5, num_envs=2, observation_layout="official", seed=0)
    env.reset()
    env._rebuild(1)
    assert [len(env._penvs[1]._get_obs_agent(a)) for a in range(2)] == env.observation_sizes == [9, 9]
