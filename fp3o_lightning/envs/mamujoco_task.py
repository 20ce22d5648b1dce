"""One MaMuJoCo task as tensor programs: what an agent observes, the state, and how episodes start, read
once from gymnasium-robotics and run by a simulator that keeps every world in tensors (MuJoCo Warp).

The CPU environment (:class:`~fp3o_lightning.envs.mamujoco.MaMuJoCoEnv`) traces each observation into
index gathers, with clipping, of the simulator's arrays (:func:`~fp3o_lightning.envs.mamujoco._trace_gathers`)
and calls gymnasium-robotics for the rest. Here every entry is one of a few operations on one or two
entries of the same source row (:data:`~fp3o_lightning.envs.mamujoco._SOURCE_FIELDS`, flattened):
``clip(x, low, high)`` (a gather), ``sin(x)``, ``cos(x)`` or ``x - y`` (Reacher's joint angles and fingertip
distance). :func:`trace_program` finds them with the same probes, and checks each on two more random ones;
:meth:`ObservationProgram.evaluate` computes every entry of every world at once. :class:`ResetNoise` is
Gymnasium's ``reset_model`` of the v5 tasks, drawn with a seeded torch generator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fp3o_lightning.envs.mamujoco import _source_layout, _trace_gathers

TAKE, SIN, COS, SUB = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class ObservationProgram:
    """Entries ``[E]``: ``op`` (``TAKE``: ``clip(src[a], low, high)``; ``SIN``/``COS``: of ``src[a]``;
    ``SUB``: ``src[a] - src[b]``) over a source row of ``width`` entries, whose last is a constant 0
    (padding takes it)."""

    op: np.ndarray
    a: np.ndarray
    b: np.ndarray
    low: np.ndarray
    high: np.ndarray
    width: int

    def to(self, device: torch.device) -> dict[str, Tensor]:
        """The program as tensors on ``device`` (for :meth:`evaluate`)."""
        return {
            "op": torch.as_tensor(self.op, device=device),
            "a": torch.as_tensor(self.a, device=device),
            "b": torch.as_tensor(self.b, device=device),
            "low": torch.as_tensor(self.low, dtype=torch.float32, device=device),
            "high": torch.as_tensor(self.high, dtype=torch.float32, device=device),
        }

    @staticmethod
    def evaluate(program: dict[str, Tensor], src: Tensor) -> Tensor:
        """Every entry for every world: ``src [N, width]`` -> ``[N, E]``."""
        x, y = src[:, program["a"]], src[:, program["b"]]
        op = program["op"]
        taken = torch.minimum(torch.maximum(x, program["low"]), program["high"])
        out = torch.where(op == SIN, torch.sin(x), taken)
        out = torch.where(op == COS, torch.cos(x), out)
        return torch.where(op == SUB, x - y, out)


def trace_program(
    sim: Any, fns: Sequence[Callable[[], Any]], sizes: Sequence[int], width: int
) -> ObservationProgram:
    """The program of the observations ``fns`` (``fns[j]()`` computes one from ``sim.data``), laid out
    ``[fns[0] padded to width | fns[1] padded | ...]`` except the last function (the state), unpadded.

    Raises:
        ValueError: naming the entry, when an observation is none of the program's operations.
    """
    layout = _source_layout(sim.data)
    zero = max(stop for _, stop in layout.values())
    gathers = _trace_gathers(sim, fns)
    probes = [np.random.default_rng(seed).standard_normal(zero) * 2.0 for seed in (1, 2)]
    outputs = [_evaluate(sim, fns, values, layout) for values in probes]
    columns: list[list[tuple[int, int, int, float, float]]] = []
    for j, gather in enumerate(gathers):
        if gather is not None:
            entries = [
                (TAKE, int(i), zero, float(lo), float(hi))
                for i, lo, hi in zip(gather.index, gather.low, gather.high, strict=True)
            ]
        else:
            entries = [_expression(j, k, probes, outputs) for k in range(len(outputs[0][j]))]
        columns.append(entries)
    rows: list[tuple[int, int, int, float, float]] = []
    pad = (TAKE, zero, zero, -np.inf, np.inf)
    for entries, size in zip(columns[:-1], sizes, strict=True):
        rows += entries + [pad] * (width - size)
    rows += columns[-1]
    op, a, b, low, high = (np.array(column) for column in zip(*rows, strict=True))
    return ObservationProgram(
        op.astype(np.int64), a.astype(np.int64), b.astype(np.int64), low, high, zero + 1
    )


def _evaluate(
    sim: Any, fns: Sequence[Callable[[], Any]], values: np.ndarray, layout: dict
) -> list[np.ndarray]:
    """Each function's output with ``sim.data``'s source fields set to ``values``."""
    import mujoco

    probe = mujoco.MjData(sim.model)
    for name, (start, stop) in layout.items():
        field = getattr(probe, name)
        field[...] = values[start:stop].reshape(field.shape)
    saved, sim.data = sim.data, probe
    try:
        return [np.asarray(fn(), dtype=np.float64).reshape(-1) for fn in fns]
    finally:
        sim.data = saved


def _expression(j: int, k: int, probes: list[np.ndarray], outputs: list[list[np.ndarray]]) -> tuple:
    """Entry ``k`` of observation ``j`` as one source entry, its ``sin`` or ``cos``, or the difference of
    two, the same on both probes."""
    first, second = probes
    want = [out[j][k] for out in outputs]
    for op, fn in ((TAKE, lambda x: x), (SIN, np.sin), (COS, np.cos)):
        hits = np.flatnonzero(fn(first) == want[0])
        for a in hits:
            if fn(second[a]) == want[1]:
                return (op, int(a), int(a), -np.inf, np.inf)
    a, b = np.nonzero(first[:, None] - first[None, :] == want[0])
    for x, y in zip(a, b, strict=True):
        if second[x] - second[y] == want[1]:
            return (SUB, int(x), int(y), -np.inf, np.inf)
    raise ValueError(
        f"observation {j}, entry {k}, is not a gather, sine, cosine or difference of the simulator's arrays; "
        "this task cannot run on the 'warp' backend (use backend 'cpu')"
    )


@dataclasses.dataclass(frozen=True)
class ResetNoise:
    """Gymnasium's ``reset_model`` of a v5 task: ``qpos = init_qpos + U(-s, s)``, ``qvel = init_qvel +``
    ``U(-s, s)`` or ``s N(0, 1)``; Reacher: ``qpos`` noise ``U(-0.1, 0.1)`` and a goal uniform in the disc of
    radius 0.2 in its last two entries, ``qvel`` noise ``U(-0.005, 0.005)`` and 0 for the goal."""

    init_qpos: np.ndarray
    init_qvel: np.ndarray
    scale: float
    normal_qvel: bool
    reacher: bool

    @classmethod
    def of(cls, sim: Any) -> ResetNoise:
        from gymnasium.envs.mujoco import (
            ant_v5,
            half_cheetah_v5,
            hopper_v5,
            reacher_v5,
            swimmer_v5,
            walker2d_v5,
        )

        kinds = {
            half_cheetah_v5.HalfCheetahEnv: True,
            ant_v5.AntEnv: True,
            hopper_v5.HopperEnv: False,
            walker2d_v5.Walker2dEnv: False,
            swimmer_v5.SwimmerEnv: False,
            reacher_v5.ReacherEnv: False,
        }
        if type(sim) not in kinds:
            raise ValueError(
                f"{type(sim).__name__}'s reset is not known to the 'warp' backend (it knows HalfCheetah, "
                "Ant, Hopper, Walker2d, Swimmer and Reacher, v5); use backend 'cpu'"
            )
        reacher = type(sim) is reacher_v5.ReacherEnv
        scale = 0.1 if reacher else float(sim._reset_noise_scale)
        return cls(sim.init_qpos.copy(), sim.init_qvel.copy(), scale, kinds[type(sim)], reacher)

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        """``n`` starts, float64 ``qpos [n, nq]`` and ``qvel [n, nv]``, drawn from ``generator`` (CPU)."""

        def uniform(shape: tuple[int, ...], scale: float) -> Tensor:
            return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale

        qpos = torch.from_numpy(self.init_qpos) + uniform((n, len(self.init_qpos)), self.scale)
        if self.reacher:
            qvel = torch.from_numpy(self.init_qvel) + uniform((n, len(self.init_qvel)), 0.005)
            qpos[:, -2:] = self._goals(n, generator)
            qvel[:, -2:] = 0.0
        elif self.normal_qvel:
            qvel = torch.from_numpy(self.init_qvel) + self.scale * torch.randn(
                (n, len(self.init_qvel)), generator=generator, dtype=torch.float64
            )
        else:
            qvel = torch.from_numpy(self.init_qvel) + uniform((n, len(self.init_qvel)), self.scale)
        return qpos.to(device), qvel.to(device)

    @staticmethod
    def _goals(n: int, generator: torch.Generator) -> Tensor:
        """Reacher's goals: uniform in the square of side 0.4, redrawn until inside the disc of radius 0.2."""
        goals = torch.empty(n, 2, dtype=torch.float64)
        todo = torch.ones(n, dtype=torch.bool)
        while todo.any():
            draw = (torch.rand(int(todo.sum()), 2, generator=generator, dtype=torch.float64) * 2 - 1) * 0.2
            goals[todo] = draw
            todo[todo.clone()] = draw.norm(dim=1) >= 0.2
        return goals
