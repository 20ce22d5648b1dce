"""Environments for FP3O: batched, multi-agent TorchRL environments selected by name with :func:`make_env`."""

from __future__ import annotations

from typing import Any

from torchrl.envs import EnvBase

from fp3o_lightning.envs.mamujoco import MaMuJoCoEnv

__all__ = ["ENV_REGISTRY", "MaMuJoCoEnv", "make_env", "task_name"]

#: Environment classes by name (smacv2, smax and vmas will be added here).
ENV_REGISTRY: dict[str, type[EnvBase]] = {"mamujoco": MaMuJoCoEnv}


def make_env(name: str, **kwargs: Any) -> EnvBase:
    """Build the env registered as ``name`` with ``kwargs``, e.g. ``make_env("mamujoco", scenario=...)``.

    Raises:
        ValueError: if ``name`` is not registered; the message lists the valid names.
    """
    try:
        env_cls = ENV_REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown env name {name!r}; valid names: {', '.join(sorted(ENV_REGISTRY))}."
        ) from None
    return env_cls(**kwargs)


def task_name(env: dict[str, Any]) -> str:
    """A short task label for tables and run tags, e.g. ``HalfCheetah 6x1`` or ``3s5z``."""
    if env.get("name") == "mamujoco":
        return " ".join(str(env[k]) for k in ("scenario", "agent_conf") if env.get(k) is not None)
    return str(env.get("map_name") or env.get("scenario") or env.get("name"))
