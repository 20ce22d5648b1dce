"""Environments for FP3O: batched, multi-agent TorchRL environments selected by name with :func:`make_env`.

Every environment produces the same keys (batch size ``[num_envs]``): ``("agents", "observation")``
``[num_envs, n_agents, obs]``, ``("agents", "action")``, ``"state"`` ``[num_envs, state]``, the team
``"reward"`` ``[num_envs, 1]`` and ``"done"``/``"terminated"``/``"truncated"`` ``[num_envs, 1]``;
discrete-action environments add ``("agents", "action_mask")`` and ``"won"``. Environments whose
dependencies are optional are imported only when built, so a missing one names the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from torchrl.envs import EnvBase

__all__ = ["ENV_REGISTRY", "EnvEntry", "env_class", "make_env", "task_name"]


@dataclass(frozen=True)
class EnvEntry:
    """Where an environment class lives and what it needs.

    Attributes:
        target: ``"module:Class"``, imported on first use.
        requires: top-level modules it imports (checked before importing ``target``).
        extra: the ``pip install 'fp3o-lightning[<extra>]'`` extra that installs them (``None``: core).
        renders: whether the class takes ``render_mode`` (for ``fp3o render``).
        note: what else it needs beyond pip (shown with the install command).
        backends: other simulators of the same tasks, selected by the ``backend`` option (``"cpu"``: this
            entry's own ``target``).
    """

    target: str
    requires: tuple[str, ...] = ()
    extra: str | None = None
    renders: bool = False
    note: str = ""
    backends: dict[str, EnvEntry] = field(default_factory=dict)

    def load(self, name: str, check_requirements: bool = True) -> type[EnvBase]:
        """The class, imported; first, unless told not to (to read its options: the classes import
        their optional dependencies only when built), a clear error if those are missing."""
        missing = [module for module in self.requires if importlib.util.find_spec(module) is None]
        if missing and check_requirements:
            extra = f"[{self.extra}]" if self.extra else ""
            raise ModuleNotFoundError(
                f"env {name!r} needs {', '.join(missing)}, which is not installed; install it with "
                f"`pip install 'fp3o-lightning{extra}'` (from a checkout: `pip install -e '.{extra}'`). "
                + self.note
            )
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)


#: Environments by name.
ENV_REGISTRY: dict[str, EnvEntry] = {
    "mamujoco": EnvEntry(
        "fp3o_lightning.envs.mamujoco:MaMuJoCoEnv",
        ("gymnasium_robotics", "mujoco"),
        renders=True,
        backends={
            "warp": EnvEntry(
                "fp3o_lightning.envs.mamujoco_warp:MaMuJoCoWarpEnv",
                ("gymnasium_robotics", "mujoco", "mujoco_warp", "warp"),
                extra="warp",
                renders=True,
            )
        },
    ),
    "vmas": EnvEntry("fp3o_lightning.envs.vmas:VMASEnv", ("vmas",), extra="vmas"),
    "pettingzoo": EnvEntry("fp3o_lightning.envs.external:PettingZooEnv", ("pettingzoo",), extra="pettingzoo"),
    "torchrl": EnvEntry("fp3o_lightning.envs.external:TorchRLEnv"),
    "smax": EnvEntry("fp3o_lightning.envs.smax:SMAXEnv", ("jaxmarl",), extra="smax"),
    "smacv2": EnvEntry(
        "fp3o_lightning.envs.smacv2:SMACv2TaskEnv",
        ("smacv2", "pysc2"),
        extra="smacv2",
        note="It also needs StarCraft II 4.10 and the SMAC maps: set SC2PATH (default ~/StarCraftII); "
        "see the README's StarCraft II section.",
    ),
}


def env_entry(name: str, backend: str | None = None) -> EnvEntry:
    """The registry entry of ``name`` (and ``backend``: ``None`` or ``"cpu"``, the entry itself).

    Raises:
        ValueError: if ``name`` is not registered or has no such backend; the message lists the valid ones.
    """
    try:
        entry = ENV_REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown env name {name!r}; valid names: {', '.join(sorted(ENV_REGISTRY))}."
        ) from None
    if backend in (None, "cpu"):
        return entry
    if backend not in entry.backends:
        valid = ", ".join(repr(b) for b in ("cpu", *entry.backends))
        raise ValueError(f"env {name!r} has no backend {backend!r}; its backends: {valid}.")
    return entry.backends[backend]


def env_class(name: str, check_requirements: bool = True, backend: str | None = None) -> type[EnvBase]:
    """The environment class registered as ``name`` (with ``backend``), imported now
    (``check_requirements``: see :meth:`EnvEntry.load`).

    Raises:
        ValueError: if ``name`` is not registered (or has no such backend); the message lists the valid ones.
        ModuleNotFoundError: if its optional dependencies are missing; the message says how to install them.
    """
    return env_entry(name, backend).load(name, check_requirements)


def make_env(name: str, backend: str | None = None, **kwargs: Any) -> EnvBase:
    """Build the env registered as ``name`` (on ``backend``, for those that have several) with ``kwargs``,
    e.g. ``make_env("mamujoco", scenario=...)``."""
    return env_class(name, backend=backend)(**kwargs)


def task_name(env: dict[str, Any]) -> str:
    """A short task label for tables and run tags, e.g. ``HalfCheetah 6x1`` or ``3s5z``; a MaMuJoCo task
    observed through the paper code's layout where it differs from gymnasium-robotics' is another task
    (``Hopper 3x1 official-obs``), and so is one simulating another model (``Walker2d 2x3 walker2d.xml``,
    ``ManySegmentSwimmer 8x2 timestep=0.005``) or with other task arguments
    (``Ant 2x4 contact_cost_weight=0``)."""
    if env.get("name") == "mamujoco":
        from fp3o_lightning.envs.observation_layouts import OFFICIAL_LAYOUT_DIFFERS

        task = " ".join(str(env[k]) for k in ("scenario", "agent_conf") if env.get(k) is not None)
        differs = OFFICIAL_LAYOUT_DIFFERS.get((env.get("scenario"), env.get("agent_conf")), False)
        if env.get("observation_layout") == "official" and differs:
            task += " official-obs"
        if env.get("xml_file") not in (None, "None"):  # "None" as MLflow logs it
            task += f" {os.path.basename(str(env['xml_file']))}"
        if env.get("timestep") not in (None, "None"):
            task += f" timestep={env['timestep']}"
        # gym_kwargs as a mapping (the options) or flattened into gym_kwargs/<key> (MLflow's params)
        gym_kwargs = env.get("gym_kwargs") if isinstance(env.get("gym_kwargs"), dict) else {}
        gym_kwargs = gym_kwargs | {
            k[len("gym_kwargs/") :]: v for k, v in env.items() if k.startswith("gym_kwargs/")
        }
        return " ".join([task, *(f"{key}={gym_kwargs[key]}" for key in sorted(gym_kwargs))])
    path = env.get("task") or env.get("factory")  # pettingzoo's and torchrl's import paths
    if path:
        return str(path).replace(":", ".").split(".")[-2 if str(path).endswith("parallel_env") else -1]
    return str(env.get("map_name") or env.get("scenario") or env.get("name"))


def __getattr__(name: str) -> Any:
    """``from fp3o_lightning.envs import MaMuJoCoEnv`` keeps working, imported lazily."""
    if name == "MaMuJoCoEnv":
        return env_class("mamujoco")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
