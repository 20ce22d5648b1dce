"""Simulator faults: a sub-environment that raised is rebuilt, within a budget of ``max_faults`` rebuilds.

Shared by the environments whose simulators can crash (:class:`~fp3o_lightning.envs.MaMuJoCoEnv`,
:class:`~fp3o_lightning.envs.smacv2.SMACv2TaskEnv`); each keeps its count in ``env._faults``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


class EnvFaultWarning(RuntimeWarning):
    """Emitted when a sub-environment raised and was rebuilt (see the envs' ``max_faults``)."""


def rebuild_after_fault(
    env: Any, label: str, index: int, err: Exception, during: str, rebuild: Callable[[int], None], cause: str
) -> None:
    """Count a fault of sub-env ``index`` and ``rebuild(fault)`` it, until a rebuild succeeds.

    ``rebuild`` gets the fault's number (from 1, over the env's life) and rebuilds and resets the
    sub-env; if it raises, that is another fault. Each fault emits an :class:`EnvFaultWarning` naming
    ``env``'s class and ``label`` (the task).

    Raises:
        Exception: ``err`` itself when ``env.max_faults`` is 0.
        RuntimeError: from the last exception when it would exceed ``env.max_faults``; the message says
            how to raise the limit, or to find out why ``cause`` crashes.
    """
    name = type(env).__name__
    while True:
        if env._faults >= env.max_faults:
            if env.max_faults == 0:
                raise err
            raise RuntimeError(
                f"{name} {label}: sub-env {index} raised during {during} ({type(err).__name__}: {err}) "
                f"after {env._faults} faults already recovered, which is max_faults={env.max_faults}. "
                f"Raise the limit with {name}(..., max_faults=<n>) (the env's `max_faults` option in a "
                f"run config), or find out why {cause} crashes."
            ) from err
        env._faults += 1
        warnings.warn(
            f"{name} {label}: sub-env {index} raised during {during} ({type(err).__name__}: {err}); "
            f"rebuilt it and dropped its episode (fault {env._faults}/{env.max_faults}).",
            EnvFaultWarning,
            stacklevel=4,
        )
        try:
            rebuild(env._faults)
        except Exception as again:
            err, during = again, "its rebuild after a fault"
            continue
        return
