"""What each MaMuJoCo agent observes: gymnasium-robotics' layout, or the paper code's.

The paper's official code (``an-anony/fp3o-icml23``, ``envs/ma_mujoco/multiagent_mujoco/obsk.py``) builds the
agents' observations from its own node lists, which differ from gymnasium-robotics' on three of the paper's
six tasks (the others, HalfCheetah 6x1, Reacher 2x1 and Manyagent Swimmer 8x2, observe the same entries):

* **Hopper**: the global node ``root_x`` reads the vertical velocity ``qvel[1]`` instead of the forward one,
  so every agent sees ``qvel[1]`` twice and never ``qvel[0]``; the global nodes are ordered x, y, z.
* **Walker2d**: no global nodes: the agents see their joints only, not the torso's height, angle or
  velocities.
* **Ant**: the contact forces are listed but never appended (the local ``cfrc_ext`` entries are skipped),
  and the global free joint gives ``qpos[:7]`` (the torso's x and y included) and ``qvel[:6]``.

``official_layout`` states these as gymnasium-robotics constructor arguments (the factorization with the
official global nodes, and the categories), so the environment and its gathers are built as usual. The
state is the same in both layouts (the single-agent observation).
"""

from __future__ import annotations

from typing import Any

import numpy as np

OBSERVATION_LAYOUTS = ("gymnasium", "official")
#: The paper's tasks whose official layout is known: ``True`` where it differs from gymnasium-robotics'.
OFFICIAL_LAYOUT_DIFFERS: dict[tuple[str, str], bool] = {
    ("HalfCheetah", "6x1"): False,
    ("Reacher", "2x1"): False,
    ("ManySegmentSwimmer", "8x2"): False,
    ("Hopper", "3x1"): True,
    ("Walker2d", "2x3"): True,
    ("Ant", "2x4"): True,
}


def _hopper_globals(node: type) -> list[Any]:
    def clipped_qvel(i: int) -> Any:
        return lambda data: np.clip(np.array([data.qvel[i]]), -10, 10)

    return [
        node("root_x", 0, 0, None, extra_obs={"qpos": lambda data: np.array([]), "qvel": clipped_qvel(1)}),
        node("root_y", 2, 2, None, extra_obs={"qvel": clipped_qvel(2)}),
        node("root_z", 1, 1, None, extra_obs={"qvel": clipped_qvel(1)}),
    ]


def _ant_globals(node: type) -> list[Any]:
    free = {"qpos": lambda data: data.qpos[:7], "qvel": lambda data: data.qvel[:6]}
    return [node("free", 0, 0, None, extra_obs=free)]


def official_layout(scenario: str, agent_conf: str | None, agent_obsk: int) -> dict[str, Any]:
    """The gymnasium-robotics ``parallel_env`` keyword arguments that give the paper code's observations
    (empty where they equal gymnasium-robotics').

    Raises:
        ValueError: for a task whose official layout is not known, naming the ones that are.
    """
    if (scenario, agent_conf) not in OFFICIAL_LAYOUT_DIFFERS:
        known = ", ".join(f"{s} {c}" for s, c in OFFICIAL_LAYOUT_DIFFERS)
        raise ValueError(
            f"observation_layout='official' is defined for the paper's tasks ({known}), not for "
            f"{scenario} {agent_conf}; use observation_layout='gymnasium'."
        )
    if not OFFICIAL_LAYOUT_DIFFERS[scenario, agent_conf]:
        return {}
    from gymnasium_robotics.envs.multiagent_mujoco.obsk import Node, get_parts_and_edges

    partition, edges, _ = get_parts_and_edges(scenario, agent_conf)
    local = [["qpos", "qvel"]] + [["qpos"]] * agent_obsk
    globals_ = {"Hopper": _hopper_globals, "Walker2d": lambda node: [], "Ant": _ant_globals}[scenario](Node)
    return {
        "agent_factorization": {"partition": partition, "edges": edges, "globals": globals_},
        "local_categories": local,
        "global_categories": ("qpos", "qvel"),
    }
