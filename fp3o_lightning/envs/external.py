"""Your own environment from the config: any PettingZoo parallel environment (``name: pettingzoo``) or any
TorchRL multi-agent environment (``name: torchrl``), given by import path, through
:class:`~fp3o_lightning.envs.adapter.MultiAgentAdapter`."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torchrl.envs import EnvBase

from fp3o_lightning.envs.adapter import MultiAgentAdapter, Reduction
from fp3o_lightning.errors import ConfigError


def import_object(path: str, option: str) -> Any:
    """The object at ``"package.module:name"`` (or ``"package.module.name"``); ``option`` names the config
    key in errors."""
    module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not module or not name:
        raise ConfigError(f"{option}={path!r} is not an import path; write 'package.module:name'")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as error:
        raise ConfigError(
            f"{option}={path!r}: cannot import {error.name!r}; install the package that provides it (for "
            "PettingZoo's MPE tasks: pip install 'fp3o-lightning[pettingzoo]', which installs mpe2)"
        ) from None
    except AttributeError:
        raise ConfigError(f"{option}={path!r}: module {module!r} has no {name!r}") from None


class PettingZooEnv(MultiAgentAdapter):
    """A PettingZoo parallel environment, by import path, in TorchRL's ``PettingZooWrapper`` (index actions
    for discrete spaces, the task's global state where it has one, masks for agents that leave).

    Args:
        task: the import path of a function that builds the task's ``ParallelEnv``, e.g.
            ``"mpe2.simple_spread_v3:parallel_env"`` (a module path takes its ``parallel_env``).
        task_kwargs: keyword arguments of ``task``, e.g. ``{N: 3, max_cycles: 25}``.
        num_envs: copies of the task stepped one after another.
        max_episode_steps: episodes are truncated after this many steps (the task's own limit, e.g. MPE's
            ``max_cycles``, may come first).
        reward: the team reward from the agents' rewards: their ``mean`` (for a cooperative task whose
            agents share one reward, that reward) or ``sum``.
        seed: seeds copy ``i`` with ``seed + i``.
        device: device of the produced tensors (the task runs on the CPU).
    """

    def __init__(
        self,
        task: str,
        task_kwargs: dict[str, Any] | None = None,
        num_envs: int = 1,
        max_episode_steps: int = 1000,
        reward: Reduction = "mean",
        seed: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        factory = import_object(
            task if ":" in task or task.endswith("parallel_env") else f"{task}:parallel_env", "model.env.task"
        )
        self.task, self.task_kwargs = task, dict(task_kwargs or {})
        super().__init__(self._copy_factory(factory), num_envs, max_episode_steps, reward, None, seed, device)

    def _copy_factory(self, factory: Callable[..., Any]) -> Callable[[], EnvBase]:
        from pettingzoo import ParallelEnv
        from torchrl.envs.libs.pettingzoo import PettingZooWrapper

        kwargs = self.task_kwargs

        def make() -> EnvBase:
            env = factory(**kwargs)
            if not isinstance(env, ParallelEnv):
                raise ConfigError(
                    f"model.env.task={self.task!r} built a {type(env).__name__}, not a PettingZoo "
                    "ParallelEnv; give the task's parallel_env (turn-based AEC environments are not "
                    "supported)"
                )
            state = hasattr(env, "state_space")
            with warnings.catch_warnings():  # at every copy: TorchRL was tested with PettingZoo 1.24;
                # this package's own tests cover the PettingZoo its extra installs
                warnings.filterwarnings("ignore", message="PettingZoo in TorchRL is tested using version")
                return PettingZooWrapper(env, return_state=state, use_mask=True, categorical_actions=True)

        return make


class TorchRLEnv(MultiAgentAdapter):
    """Any TorchRL multi-agent environment: a class or function, by import path, that builds one copy (batch
    ``[]``) whose agents' keys are under groups (``(group, "observation")``, ``(group, "action")``, ...), as
    TorchRL's multi-agent environments have them.

    Args:
        factory: the import path of the class or function, e.g. ``"my_package.envs:MyEnv"``.
        factory_kwargs: its keyword arguments.
        groups: the agent groups, in order (default: every group with actions), e.g. ``["agents"]``.
        batch_argument: the keyword argument through which ``factory`` builds all ``num_envs`` copies at once,
            as one environment of batch ``[num_envs]`` (e.g. ``num_envs`` for TorchRL's ``VmasEnv``); its
            checkpoints then hold only what its own ``state_dict()`` does. Default: ``factory`` builds one
            copy (batch ``[]``) and the adapter steps ``num_envs`` of them one after another.
        num_envs: copies.
        max_episode_steps: episodes are truncated after this many steps.
        reward: the team reward from the agents' rewards where the environment gives no root ``"reward"``:
            their ``mean`` or ``sum``.
        seed: seeds copy ``i`` with ``seed + i``.
        device: device of the produced tensors.
    """

    def __init__(
        self,
        factory: str,
        factory_kwargs: dict[str, Any] | None = None,
        groups: list[str] | None = None,
        batch_argument: str | None = None,
        num_envs: int = 1,
        max_episode_steps: int = 1000,
        reward: Reduction = "mean",
        seed: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        build = import_object(factory, "model.env.factory")
        kwargs = dict(factory_kwargs or {})
        self.factory, self.factory_kwargs = factory, kwargs

        def make(*copies: int) -> EnvBase:
            env = build(**kwargs, **({batch_argument: copies[0]} if copies else {}))
            if not isinstance(env, EnvBase):
                raise ConfigError(
                    f"model.env.factory={factory!r} built a {type(env).__name__}, not a TorchRL EnvBase; "
                    "for a PettingZoo task use name: pettingzoo"
                )
            return env

        super().__init__(
            make, num_envs, max_episode_steps, reward, groups, seed, device, batch_argument is not None
        )
