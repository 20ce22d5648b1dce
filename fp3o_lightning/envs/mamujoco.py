"""Batched TorchRL environment over gymnasium-robotics' Multi-Agent MuJoCo (MaMuJoCo).

:class:`MaMuJoCoEnv` owns ``num_envs`` copies of ``gymnasium_robotics.mamujoco_v1.parallel_env`` and
steps them sequentially inside one :meth:`~MaMuJoCoEnv._step`. The data it produces (batch size
``[num_envs]``):

* ``("agents", "observation")`` float32 ``[num_envs, n_agents, max_obs_dim]``: agent ``i``'s raw
  gymnasium-robotics observation in the first ``observation_sizes[i]`` entries, zeros after.
* ``("agents", "action")`` float32 ``[num_envs, n_agents, max_action_dim]`` (input, ``Bounded``): passed on
  as sampled, as gymnasium-robotics and the paper's code do (MuJoCo clamps the controls to the actuator
  ranges itself, and the control cost is charged on the action as given); with ``clip_actions=True`` clipped
  into the bounds first, so the cost is charged on the clipped action. Padding entries are ignored.
* ``"state"`` float32 ``[num_envs, state_size]``: gymnasium-robotics' ``env.state()`` (the single-agent
  Gymnasium observation).
* ``"reward"`` float32 ``[num_envs, 1]``: the team reward.
* ``"done"``, ``"terminated"``, ``"truncated"`` bool ``[num_envs, 1]``.
* ``"faulted"`` bool ``[num_envs, 1]`` (an observation, in every step and reset output): True only where the
  sub-env was rebuilt after a fault during this step or reset (see below), False in normal operation.

Time limit: Gymnasium's ``gymnasium.make`` wraps the single-agent env in a ``TimeLimit`` with the registered
length (1000 for most tasks, but 50 for Reacher and 100 for Pusher), which gymnasium-robotics keeps. This
env steps the *unwrapped* MuJoCo env instead and applies its own limit, so an episode is truncated exactly
once, after ``max_episode_steps`` steps, for every scenario. Termination (the unhealthy condition of
Hopper, Walker2d, Ant, ...) comes from the simulator and is reported separately.

Speed: outputs are bit-identical to gymnasium-robotics', but not computed by its per-agent Python code.
At construction every agent's observation and the state are traced into gathers, with clipping where
gymnasium-robotics clips, from the simulator's arrays (:func:`_trace_gathers`), so each step builds all of
them with one ``take`` over all sub-envs; observations that are not gathers (Reacher's sines, ...) keep
gymnasium-robotics' code. For HalfCheetah, Swimmer, Hopper, Walker2d and Ant (the many-segment variants
included) a sub-env step is Gymnasium's physics step alone, and the reward and termination of all
sub-envs are computed at once with Gymnasium's arithmetic (:class:`_Dynamics`); other tasks step through
Gymnasium's ``step``.

Faults: a sub-env whose ``step`` or ``reset`` raises an ``Exception`` (a simulator crash: a MuJoCo
instability here, a StarCraft II crash in the SMAC envs) is rebuilt from scratch (a fresh ``parallel_env``,
built as the constructor builds them) and reset, and the run goes on; ``max_faults`` (default 10) caps the
rebuilds over the env's life and :attr:`MaMuJoCoEnv.faults` counts them. Each fault emits an
:class:`EnvFaultWarning`. A sub-env that faulted while stepping returns its rebuilt instance's reset
observation and state, reward 0, ``truncated=True``, ``terminated=False``, ``done=True`` and
``faulted=True``: its episode is cut short and trainers should drop it from their statistics. That reset
starts the sub-env's next episode (the auto-reset that follows ``done`` keeps it, unless :meth:`set_seed`
was called in between). A reset that raises is retried on a rebuilt instance (``faulted=True`` in the reset
output, no episode is lost). The rebuilt instance ``i`` after the env's ``k``-th fault (``k`` counts from 1
and is kept in the saved state) is reset with the seed
``int(numpy.random.SeedSequence(seed, spawn_key=(i, k)).generate_state(1)[0])``, ``seed`` being the env's
seed (the constructor's ``seed`` or the last :meth:`set_seed`): runs with the same seed rebuild identically,
and the other sub-envs are untouched. An unseeded env rebuilds from fresh OS entropy.

Rendering: built with ``render_mode="rgb_array"``, :meth:`MaMuJoCoEnv.render` returns an RGB frame of one
sub-env, rendered off-screen. Unless ``MUJOCO_GL`` is already set, :func:`configure_headless_gl` picks EGL
(Mesa's software renderer works without a GPU) or OSMesa, whichever library is installed.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import dataclasses
import functools
import inspect
import math
import os
import platform
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded
from torchrl.envs import EnvBase

from fp3o_lightning.envs.faults import EnvFaultWarning, rebuild_after_fault
from fp3o_lightning.envs.observation_layouts import OBSERVATION_LAYOUTS, official_layout
from fp3o_lightning.envs.specs import set_contract_specs
from fp3o_lightning.envs.state import check_saved_state

__all__ = [
    "EnvFaultWarning",
    "MaMuJoCoEnv",
    "VALID_AGENT_CONFS",
    "MANY_SEGMENT_SCENARIOS",
    "configure_headless_gl",
]

#: Agent factorisations known to gymnasium-robotics 1.4 (``obsk.get_parts_and_edges``), per scenario.
#: ``None`` is the single-agent, fully observable version. ``CoupledHalfCheetah`` is left out: its
#: observation code fails with the installed MuJoCo (``data.ten_J`` indexing raises ``IndexError``).
VALID_AGENT_CONFS: dict[str, tuple[str | None, ...]] = {
    "Ant": (None, "2x4", "2x4d", "4x2"),
    "HalfCheetah": (None, "2x3", "6x1"),
    "Hopper": (None, "3x1"),
    "Humanoid": (None, "9|8"),
    "HumanoidStandup": (None, "9|8"),
    "InvertedDoublePendulum": (None,),
    "InvertedPendulum": (None,),
    "Pusher": (None, "3p"),
    "Reacher": (None, "2x1"),
    "Swimmer": (None, "2x1"),
    "Walker2d": (None, "2x3"),
}
#: Scenarios taking any ``"<n_agents>x<segments_per_agent>"`` conf (e.g. ``"8x2"``); no ``None`` conf.
MANY_SEGMENT_SCENARIOS: dict[str, str] = {"ManySegmentSwimmer": "Swimmer-v5", "ManySegmentAnt": "Ant-v5"}
_MANY_SEGMENT_CONF = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")


def _valid_scenarios_text() -> str:
    lines = [f"{name}: {', '.join(repr(c) for c in confs)}" for name, confs in VALID_AGENT_CONFS.items()]
    lines += [f"{name}: '<n_agents>x<segments_per_agent>' (e.g. '8x2')" for name in MANY_SEGMENT_SCENARIOS]
    return "; ".join(lines)


def _check_scenario(scenario: str, agent_conf: str | None) -> None:
    """Raise a ``ValueError`` listing the valid options if ``(scenario, agent_conf)`` is unsupported."""
    if scenario in MANY_SEGMENT_SCENARIOS:
        if agent_conf is None or not _MANY_SEGMENT_CONF.match(agent_conf):
            raise ValueError(
                f"agent_conf {agent_conf!r} is not valid for scenario {scenario!r}: expected "
                f"'<n_agents>x<segments_per_agent>' with positive integers, e.g. '8x2'."
            )
    elif scenario in VALID_AGENT_CONFS:
        if agent_conf not in VALID_AGENT_CONFS[scenario]:
            valid = ", ".join(repr(c) for c in VALID_AGENT_CONFS[scenario])
            raise ValueError(
                f"agent_conf {agent_conf!r} is not valid for scenario {scenario!r}; "
                f"valid agent_confs: {valid}."
            )
    else:
        raise ValueError(
            f"Unknown MaMuJoCo scenario {scenario!r}. "
            f"Valid scenarios and agent_confs: {_valid_scenarios_text()}."
        )


#: Debian/Ubuntu packages providing each headless OpenGL backend MuJoCo can use.
GL_PACKAGES: dict[str, str] = {"egl": "libegl1 libegl-mesa0 libgl1-mesa-dri", "osmesa": "libosmesa6"}
RENDER_MODES = ("rgb_array",)


def _gl_install_hint() -> str:
    return (
        f"On Debian/Ubuntu install EGL (`apt-get install {GL_PACKAGES['egl']}`, Mesa's software renderer "
        f"needs no GPU) or OSMesa (`apt-get install {GL_PACKAGES['osmesa']}`), or set MUJOCO_GL to a "
        "backend that works on this machine."
    )


def configure_headless_gl() -> str:
    """Choose MuJoCo's off-screen OpenGL backend and export it as ``MUJOCO_GL``; return the backend.

    A ``MUJOCO_GL`` set by the user is kept as it is. Otherwise, on Linux, ``egl`` is chosen when libEGL
    and a vendor implementation (Mesa or NVIDIA) are installed, else ``osmesa`` when libOSMesa is,
    else ``egl`` when only libEGL is (a ``PYOPENGL_PLATFORM`` of ``egl``/``osmesa`` is followed). It must
    run before the first frame is rendered, which is when MuJoCo creates its GL context.

    Raises:
        RuntimeError: if no OpenGL library for off-screen rendering is installed; the message names the
            Debian packages to install.
    """
    backend = os.environ.get("MUJOCO_GL", "").strip()
    if backend or platform.system() != "Linux":
        return backend
    found = {
        "egl_vendor": any(ctypes.util.find_library(name) for name in ("EGL_mesa", "EGL_nvidia")),
        "egl": ctypes.util.find_library("EGL") is not None,
        "osmesa": ctypes.util.find_library("OSMesa") is not None,
    }
    candidates = [("egl", found["egl"] and found["egl_vendor"]), ("osmesa", found["osmesa"])]
    candidates.append(("egl", found["egl"]))
    requested = os.environ.get("PYOPENGL_PLATFORM", "").strip().lower()
    if requested in GL_PACKAGES:  # PyOpenGL is pinned to this platform: MuJoCo must use the same
        candidates = [(name, ok) for name, ok in candidates if name == requested]
    for name, ok in candidates:
        if ok:
            os.environ["MUJOCO_GL"] = name
            return name
    raise RuntimeError(
        "MuJoCo cannot render off-screen: no OpenGL library for headless rendering (libEGL or libOSMesa) "
        f"was found. {_gl_install_hint()}"
    )


def _mujoco_warning(message: str) -> None:
    """Route MuJoCo's C-level warnings through Python's ``warnings`` (no ``MUJOCO_LOG.TXT`` file).

    The deprecation of ``settotalmass`` in gymnasium's own model files is dropped: it is printed once
    per simulator built, says nothing about this package's use, and gymnasium must fix it.
    """
    if "settotalmass" not in message:
        warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)


def _import_mamujoco() -> Any:
    """Import gymnasium-robotics' ``mamujoco_v1`` quietly.

    Its import prints a notice about the Adroit hand environments' rewards, unrelated to MaMuJoCo.
    """
    import farama_notifications
    import mujoco

    farama_notifications.notifications.pop("gymnasium_robotics", None)
    mujoco.set_mju_user_warning(_mujoco_warning)
    from gymnasium_robotics import mamujoco_v1

    return mamujoco_v1


#: Gymnasium task arguments that other options set: the model file, and the render options.
_RESERVED_GYM_KWARGS = {"xml_file": "model.env.xml_file"} | dict.fromkeys(
    ("render_mode", "width", "height", "camera_name", "camera_id"), "`fp3o render`"
)


def _gym_task_class(scenario: str) -> type | None:
    """The Gymnasium MuJoCo task class that gymnasium-robotics factorises for ``scenario`` (``None`` for
    those it builds another way, e.g. CoupledHalfCheetah)."""
    import gymnasium
    from gymnasium.envs.registration import load_env_creator

    task_id = MANY_SEGMENT_SCENARIOS.get(scenario, f"{scenario}-v5")
    if task_id not in gymnasium.registry:
        return None
    return load_env_creator(gymnasium.spec(task_id).entry_point)


def _check_task_options(scenario: str, xml_file: str | None, gym_kwargs: dict[str, Any] | None) -> None:
    """Raise a ``ValueError`` that names the fix unless ``xml_file`` is ``None`` or a model file Gymnasium
    finds, and ``gym_kwargs`` are arguments of the scenario's Gymnasium task that no other option sets."""
    task = _gym_task_class(scenario) if xml_file is not None or gym_kwargs else None
    if xml_file is not None:
        if scenario in MANY_SEGMENT_SCENARIOS or task is None:
            raise ValueError(
                f"xml_file is not an option of {scenario}, which builds its own model; leave it unset."
            )
        from gymnasium.envs.mujoco import mujoco_env

        try:
            mujoco_env.expand_model_path(xml_file)
        except OSError:
            assets = sorted(os.listdir(os.path.join(os.path.dirname(mujoco_env.__file__), "assets")))
            raise ValueError(
                f"xml_file {xml_file!r} is neither a file (a path starts with '/', '.' or '~') nor one of "
                f"Gymnasium's MuJoCo assets: {', '.join(assets)}."
            ) from None
    if not gym_kwargs:
        return
    if not isinstance(gym_kwargs, dict):
        raise ValueError(f"gym_kwargs must be a mapping of argument names to values, got {gym_kwargs!r}.")
    if task is None:
        raise ValueError(
            f"gym_kwargs is not an option of {scenario}, which is not a Gymnasium task; leave it unset."
        )
    accepted = [
        name for name in inspect.signature(task.__init__).parameters if name not in ("self", "kwargs")
    ]
    for key in gym_kwargs:
        if key in _RESERVED_GYM_KWARGS:
            raise ValueError(f"gym_kwargs.{key}: set it with {_RESERVED_GYM_KWARGS[key]} instead.")
        if key not in accepted:
            options = ", ".join(name for name in accepted if name not in _RESERVED_GYM_KWARGS)
            raise ValueError(
                f"gym_kwargs.{key} is not an argument of {task.__name__}; its arguments: {options}."
            )


def _check_timestep(timestep: float | None) -> None:
    """Raise a ``ValueError`` that names the fix unless ``timestep`` is ``None`` or seconds > 0."""
    number = isinstance(timestep, (int, float)) and not isinstance(timestep, bool)
    if timestep is not None and not (number and math.isfinite(timestep) and timestep > 0):
        raise ValueError(
            f"timestep must be MuJoCo's simulation timestep in seconds, a number > 0 (e.g. 0.005), or None "
            f"for the model file's, got {timestep!r}."
        )


def _set_timestep(sim: Any, timestep: float) -> None:
    """Give the Gymnasium MuJoCo env ``sim`` the simulation ``timestep``. Gymnasium reads ``dt`` (timestep ×
    frame skip) from the model at each step; its render rate is set from ``dt`` at construction, so it is set
    again here."""
    sim.model.opt.timestep = timestep
    sim.metadata = {**sim.metadata, "render_fps": int(np.round(1.0 / sim.dt))}


def _make_parallel_envs(
    scenario: str,
    agent_conf: str | None,
    agent_obsk: int,
    count: int,
    observation_layout: str = "gymnasium",
    **gym_kwargs: Any,
) -> list[Any]:
    """Build ``count`` gymnasium-robotics ``parallel_env`` instances.

    ``observation_layout="official"`` gives them the paper code's observations
    (:func:`~fp3o_lightning.envs.observation_layouts.official_layout`). ``gym_kwargs`` (e.g. ``render_mode``,
    ``width``, ``height``) go to the Gymnasium MuJoCo env.

    For the many-segment scenarios the MuJoCo XML is generated once into a private temporary directory
    (gymnasium-robotics writes it into its own package directory and deletes it afterwards, which races
    between processes building the same scenario and fails on read-only installs).
    """
    mamujoco_v1 = _import_mamujoco()
    layout = official_layout(scenario, agent_conf, agent_obsk) if observation_layout == "official" else {}

    if scenario not in MANY_SEGMENT_SCENARIOS:
        return [
            mamujoco_v1.parallel_env(scenario, agent_conf, agent_obsk=agent_obsk, **layout, **gym_kwargs)
            for _ in range(count)
        ]

    import gymnasium
    from gymnasium_robotics.envs.multiagent_mujoco import many_segment_ant, many_segment_swimmer

    gen_asset = (
        many_segment_swimmer.gen_asset if scenario == "ManySegmentSwimmer" else many_segment_ant.gen_asset
    )
    n_agents, per_agent = (int(x) for x in agent_conf.split("x"))
    with tempfile.TemporaryDirectory(prefix="fp3o_mamujoco_") as tmp:
        asset_path = os.path.join(tmp, f"{scenario}_{n_agents * per_agent}_segments.xml")
        gen_asset(n_segs=n_agents * per_agent, asset_path=asset_path)
        return [
            mamujoco_v1.parallel_env(
                scenario,
                agent_conf,
                agent_obsk=agent_obsk,
                gym_env=gymnasium.make(MANY_SEGMENT_SCENARIOS[scenario], xml_file=asset_path, **gym_kwargs),
                **layout,
            )
            for _ in range(count)
        ]


#: The ``mjData`` arrays an observation may be gathered from (see :func:`_trace_gathers`), in the order of
#: the per-sub-env source row.
_SOURCE_FIELDS = ("qpos", "qvel", "qfrc_actuator", "cinert", "cvel", "cfrc_ext", "xpos")
#: The ``MjData`` fields ``mj_rnePostConstraint`` computes (and nothing else does).
_POST_CONSTRAINT_FIELDS = frozenset({"cacc", "cfrc_int", "cfrc_ext"})


@dataclasses.dataclass(frozen=True)
class _Gather:
    """One observation computed as ``clip(source[index], low, high)`` from the flat source row."""

    index: np.ndarray  # int64, into the row of all :data:`_SOURCE_FIELDS` (see :func:`_source_layout`)
    low: np.ndarray  # float64, -inf where the entry is not clipped from below
    high: np.ndarray  # float64, +inf where the entry is not clipped from above


def _source_layout(data: Any) -> dict[str, tuple[int, int]]:
    """``{field: (start, stop)}`` of each of :data:`_SOURCE_FIELDS`, flattened, in one row."""
    layout, start = {}, 0
    for name in _SOURCE_FIELDS:
        size = int(getattr(data, name).size)
        layout[name] = (start, start + size)
        start += size
    return layout


def _trace_gathers(sim: Any, fns: Sequence[Callable[[], Any]]) -> list[_Gather | None]:
    """Find which observations are gathers, with optional clipping, of the simulator's arrays.

    Each ``fns[j]()`` computes an observation from ``sim.data`` (gymnasium-robotics' ``_get_obs_agent``,
    Gymnasium's ``_get_obs``). It is evaluated with ``sim.data`` swapped for probe ``MjData`` objects whose
    :data:`_SOURCE_FIELDS` hold known values, in the layout of :func:`_source_layout`:

    1. distinct values ``v`` in ``[2**-12, 2**-11)``, below any clipping bound: every output entry must be
       one of them, which names its source entry;
    2. ``v * 2**40``, then 3. ``-v * 2**40``: an entry that does not follow its source there is clipped,
       and its value is the upper, then the lower, bound;
    4. values of random sign and magnitude: every entry must equal ``clip(values[index], low, high)``.

    An observation that fails a check (it computes something else: a sine, a difference of positions, ...,
    or reads other arrays) gets ``None``: it is computed by calling its function at every step. The
    probes cannot tell a clip from some other function agreeing with it on all four, but nothing that
    gymnasium-robotics or Gymnasium computes does, and the tests compare the gathers with the functions.
    """
    import mujoco

    model = sim.model
    layout = _source_layout(sim.data)
    size = max(stop for _, stop in layout.values())
    rng = np.random.default_rng(0)
    # Strictly increasing with irregular gaps: no sum, difference or product of two values is a value.
    small = 2.0**-12 * (1.0 + (np.arange(size) + rng.uniform(0.1, 0.9, size)) / size)
    check = rng.standard_normal(size) * 10.0 ** rng.uniform(-3.0, 3.0, size)
    outputs: list[list[np.ndarray | None]] = []
    saved = sim.data
    try:
        for values in (small, small * 2.0**40, -small * 2.0**40, check):
            probe = mujoco.MjData(model)
            for name, (start, stop) in layout.items():
                field = getattr(probe, name)
                field[...] = values[start:stop].reshape(field.shape)
            sim.data = probe
            row: list[np.ndarray | None] = []
            for fn in fns:
                try:
                    row.append(np.asarray(fn(), dtype=np.float64).reshape(-1))
                except Exception:  # reads something a probe lacks: not a gather
                    row.append(None)
            outputs.append(row)
    finally:
        sim.data = saved

    lookup = {value: k for k, value in enumerate(small.tolist())}
    gathers: list[_Gather | None] = []
    for j in range(len(fns)):
        base, up, down, random = (out[j] for out in outputs)
        if any(o is None or o.shape != base.shape for o in (base, up, down, random)):
            gathers.append(None)
            continue
        index = np.array([lookup.get(value, -1) for value in base.tolist()], dtype=np.int64)
        if (index < 0).any():
            gathers.append(None)
            continue
        v = small[index]
        high = np.where(up == v * 2.0**40, np.inf, up)
        low = np.where(down == -v * 2.0**40, -np.inf, down)
        if not ((low <= v).all() and (v <= high).all()) or not np.array_equal(
            np.clip(check[index], low, high), random
        ):
            gathers.append(None)
            continue
        gathers.append(_Gather(index, low, high))
    return gathers


def _clip(x: np.ndarray, low: Any, high: Any, out: np.ndarray, exact_min_max: bool) -> np.ndarray:
    """``np.clip(x, low, high, out=out)``; with ``exact_min_max`` (no bound is a zero, so no -0.0/+0.0 pair
    can differ) as ``np.minimum(np.maximum(...))``, equal (NaN included) and without ``np.clip``'s wrapper,
    which costs several microseconds when its code is cold after the physics."""
    if exact_min_max:
        return np.minimum(np.maximum(x, low, out=out), high, out=out)
    return np.clip(x, low, high, out=out)


@dataclasses.dataclass(frozen=True)
class _Ops:
    """The array operations :class:`_Dynamics` uses: numpy's (the CPU env's, Gymnasium's own arithmetic) or
    torch's (a simulator whose worlds are tensors), so that the formulas are written once."""

    concat: Callable[[tuple[Any, ...]], Any]  # joined along the entries (axis 1)
    all_rows: Callable[[Any], Any]  # bool [n, k] -> [n]
    isfinite: Callable[[Any], Any]
    clip: Callable[[Any, float, float], Any]  # a clipped copy
    square_sum: Callable[[Any], Any]  # [n, k] -> [n]
    norm: Callable[[Any], Any]  # [n, k] -> [n]
    zeros_bool: Callable[[Any], Any]  # like [n] -> bool zeros


NUMPY_OPS = _Ops(
    concat=lambda arrays: np.concatenate(arrays, axis=1),
    all_rows=lambda x: x.all(axis=1),
    isfinite=np.isfinite,
    clip=lambda x, low, high: _clip(x, low, high, np.empty(x.shape), low != 0 and high != 0),
    # np.add.reduce is what np.sum runs (the same pairwise summation of each row) minus its wrapper
    square_sum=lambda x: np.add.reduce(np.square(x), axis=1),
    norm=lambda x: np.linalg.norm(x, axis=1),
    zeros_bool=lambda like: np.zeros(len(like), dtype=bool),
)
TORCH_OPS = _Ops(
    concat=lambda tensors: torch.cat(tensors, 1),
    all_rows=lambda x: x.all(1),
    isfinite=torch.isfinite,
    clip=lambda x, low, high: x.clamp(low, high),
    square_sum=lambda x: x.square().sum(1),
    norm=lambda x: torch.linalg.vector_norm(x, dim=1),
    zeros_bool=lambda like: torch.zeros(len(like), dtype=torch.bool, device=like.device),
)


class _Dynamics:
    """Gymnasium's reward and termination of one v5 locomotion task, vectorised over sub-envs.

    Stepping a sub-env is then what Gymnasium's ``_step_mujoco_simulation`` runs (``ctrl``, ``mj_step``
    times ``frame_skip``, and ``mj_rnePostConstraint`` where an observation reads its outputs), without the
    rest of its ``step`` (observation, info dict, scalar reward terms). :meth:`__call__` repeats the
    ``step``'s float64 arithmetic operation for operation, with the weights and ranges read from the
    Gymnasium env, so rewards and terminations are bit-identical (the tests compare them with Gymnasium's).
    Tasks are recognised by their exact class (:func:`_dynamics_for`); any other env keeps Gymnasium's
    ``step``.

    The formulas run on numpy arrays (``ops=NUMPY_OPS``, this env's) or on torch tensors (``TORCH_OPS``: the
    MuJoCo Warp backend's worlds). ``"reacher"`` (no termination; the distance of the fingertip to the target
    after the step and the control cost) is the Warp backend's only: this env steps Reacher through Gymnasium.

    Attributes:
        kind: ``"forward"`` (HalfCheetah, Swimmer), ``"hopper"``, ``"walker"``, ``"ant"`` or ``"reacher"``.
        fields: the source fields it reads (:meth:`bind` gets views of them).
        before_field, before_key: where the x position is read before the step (``data.qpos[0]``, or
            Ant's ``data.xpos[main_body, 0]``).
    """

    def __init__(self, sim: Any, kind: str, ops: _Ops = NUMPY_OPS) -> None:
        self.kind, self.ops = kind, ops
        self.dt = float(sim.dt)
        if kind == "reacher":
            self.ctrl_cost_weight = sim._reward_control_weight
            self.dist_weight = sim._reward_dist_weight
            self.fingertip, self.target = (int(sim.data.body(name).id) for name in ("fingertip", "target"))
            self.before_field, self.before_key, self.fields = "xpos", (self.fingertip, 0), ("xpos",)
            return
        self.forward_weight = sim._forward_reward_weight
        self.ctrl_cost_weight = sim._ctrl_cost_weight
        if kind == "ant":
            self.before_field, self.before_key = "xpos", (int(sim.data.body(sim._main_body).id), 0)
            self.fields: tuple[str, ...] = ("qpos", "qvel", "cfrc_ext", "xpos")
            self.contact_cost_weight = sim._contact_cost_weight
            self.contact_force_range = sim._contact_force_range
        else:
            self.before_field, self.before_key = "qpos", 0
            self.fields = ("qpos", "qvel") if kind == "hopper" else ("qpos",)
        if kind != "forward":
            self.healthy_reward = sim._healthy_reward
            self.terminate_when_unhealthy = bool(sim._terminate_when_unhealthy)
            self.healthy_z_range = sim._healthy_z_range
        if kind == "hopper":
            self.healthy_state_range = sim._healthy_state_range
        if kind in ("hopper", "walker"):
            self.healthy_angle_range = sim._healthy_angle_range

    def bind(self, views: dict[str, np.ndarray]) -> None:
        """Read the sources from ``views[field]``: ``[num_envs, field size]`` views of the source rows."""
        self._views = views
        self._never = self.ops.zeros_bool(views[self.fields[0]])  # read-only use: copied by the caller
        key = self.before_key
        if self.before_field == "qpos":
            self._x_after = views["qpos"][:, key]
        else:  # xpos, flattened: [num_envs, nbody * 3]
            self._x_after = views["xpos"][:, 3 * key[0] + key[1]]

    def control_cost(self, action: Any) -> Any:
        """The control cost ``[num_envs]`` of the global ``action``s (computed before the physics runs)."""
        return self.ctrl_cost_weight * self.ops.square_sum(action)

    def __call__(self, before: Any, ctrl_cost: Any) -> tuple[Any, Any]:
        """Reward (float64) and terminated (bool) ``[num_envs]`` of the step that started at x ``before``."""
        ops = self.ops
        if self.kind == "reacher":
            xpos = self._views["xpos"]
            tip, target = 3 * self.fingertip, 3 * self.target
            vec = xpos[:, tip : tip + 3] - xpos[:, target : target + 3]
            return -ops.norm(vec) * self.dist_weight - ctrl_cost, self._never
        x_velocity = (self._x_after - before) / self.dt
        if self.kind == "forward":
            return self.forward_weight * x_velocity - ctrl_cost, self._never
        qpos = self._views["qpos"]
        if self.kind == "ant":
            state = ops.concat((qpos, self._views["qvel"]))
            min_z, max_z = self.healthy_z_range
            healthy = ops.all_rows(ops.isfinite(state)) & (min_z <= qpos[:, 2]) & (qpos[:, 2] <= max_z)
            forward_reward = x_velocity * self.forward_weight
        else:
            min_z, max_z = self.healthy_z_range
            min_angle, max_angle = self.healthy_angle_range
            z, angle = qpos[:, 1], qpos[:, 2]
            healthy = (min_z < z) & (z < max_z) & (min_angle < angle) & (angle < max_angle)
            if self.kind == "hopper":
                state = ops.concat((qpos, self._views["qvel"]))[:, 2:]
                min_state, max_state = self.healthy_state_range
                healthy &= ops.all_rows((min_state < state) & (state < max_state))
            forward_reward = self.forward_weight * x_velocity
        rewards = forward_reward + healthy * self.healthy_reward
        if self.kind == "ant":
            low, high = self.contact_force_range
            contact_forces = ops.clip(self._views["cfrc_ext"], low, high)
            costs = ctrl_cost + self.contact_cost_weight * ops.square_sum(contact_forces)
        else:
            costs = ctrl_cost
        terminated = ~healthy & self.terminate_when_unhealthy
        return rewards - costs, terminated


def dynamics_kind(sim: Any) -> str | None:
    """The :class:`_Dynamics` kind of ``sim``'s task (v5 locomotion tasks and Reacher), else ``None``."""
    from gymnasium.envs.mujoco import ant_v5, half_cheetah_v5, hopper_v5, reacher_v5, swimmer_v5, walker2d_v5

    kinds = {
        half_cheetah_v5.HalfCheetahEnv: "forward",
        swimmer_v5.SwimmerEnv: "forward",
        hopper_v5.HopperEnv: "hopper",
        walker2d_v5.Walker2dEnv: "walker",
        ant_v5.AntEnv: "ant",
        reacher_v5.ReacherEnv: "reacher",
    }
    return kinds.get(type(sim))


def _dynamics_for(sim: Any) -> _Dynamics | None:
    """The vectorised :class:`_Dynamics` of ``sim``'s task, or ``None`` to keep Gymnasium's ``step``
    (Reacher: its observations are not all gathers, so its sub-envs step through Gymnasium anyway)."""
    kind = dynamics_kind(sim)
    if kind in (None, "reacher") or sim.render_mode == "human" or not hasattr(sim, "_step_mujoco_simulation"):
        return None
    return _Dynamics(sim, kind)


def _plain(value: Any) -> Any:
    """``value`` with numpy arrays as tensors and numpy scalars as Python numbers (``weights_only``-safe)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _numpy_state(value: Any) -> Any:
    """Invert :func:`_plain` for a numpy bit-generator state (tensors back to numpy arrays)."""
    if isinstance(value, dict):
        return {key: _numpy_state(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return value.numpy().copy()
    return value


class MaMuJoCoEnv(EnvBase):
    """``num_envs`` gymnasium-robotics MaMuJoCo tasks as one batched TorchRL environment.

    Args:
        scenario: MaMuJoCo task, e.g. ``"HalfCheetah"`` (see :data:`VALID_AGENT_CONFS`).
        agent_conf: agent factorisation, e.g. ``"6x1"``; ``None`` gives one fully observing agent.
        agent_obsk: observation depth ``k`` (joints up to ``k`` hops away are observed), ``>= 0``.
        num_envs: number of independent sub-environments (the batch size).
        max_episode_steps: episodes are truncated after this many steps.
        seed: if given, sub-env ``i`` is seeded with ``seed + i`` at its first reset.
        device: device of the produced tensors (simulation runs on CPU).
        render_mode: ``"rgb_array"`` to enable :meth:`render`; ``None`` (default) builds no renderer.
        width, height: size in pixels of the rendered frames.
        camera_name: the model camera to render from; the default ``"track"`` follows the robot in the
            scenarios whose model defines it (HalfCheetah, Ant, Hopper, Walker2d, Swimmer, Humanoid), the
            others fall back to Gymnasium's free camera.
        max_faults: how many times over the env's life a sub-env that raised during ``step``/``reset`` is
            rebuilt (see the module docstring); one more fault raises a ``RuntimeError``. ``0`` re-raises
            the first fault's exception unchanged.
        clip_actions: clip actions into the actuator bounds before stepping, so the control cost is
            charged on the clipped action; ``False`` (default) steps the action as sampled, exactly as
            gymnasium-robotics' ``parallel_env`` and the paper's code do.
        observation_layout: what each agent observes: ``"gymnasium"`` (default), gymnasium-robotics'
            observations; ``"official"``, the paper code's, which differ on Hopper 3x1 (no forward
            velocity), Walker2d 2x3 (no torso) and Ant 2x4 (no contact forces, the torso's x and y) and
            equal gymnasium-robotics' on the paper's other tasks (see
            :mod:`~fp3o_lightning.envs.observation_layouts`).
        xml_file: the MuJoCo model simulated, as Gymnasium's ``xml_file`` reads it: a path (starting with
            ``/``, ``.`` or ``~``) or a file of Gymnasium's MuJoCo assets; ``None`` (default): the task's v5
            model. ``walker2d.xml`` is the Walker2d model of gym's v2 to v4, which the paper's code
            simulated: its right foot has friction 0.9, where v5 gives both feet 1.9. Not for the
            many-segment scenarios, whose model is generated from ``agent_conf``.
        gym_kwargs: further arguments of the Gymnasium MuJoCo task gymnasium-robotics factorises (reward
            weights, ranges, noise; e.g. ``{contact_cost_weight: 0}``, which gives Ant the reward of the
            paper's code: it ran MuJoCo 2.0, which leaves the contact forces at zero, so its Ant paid no
            contact cost). ``None`` (default): the task's defaults.
        timestep: MuJoCo's simulation timestep in seconds (each env step simulates the task's frame skip
            times this); ``None`` (default): the model file's. ``0.005`` gives ManySegmentSwimmer the
            paper code's: its generated model steps 0.005 s, gymnasium-robotics' 0.01 s (as Gymnasium's
            Swimmer), so the paper's agents act every 0.02 s, ours every 0.04 s by default.

    Attributes:
        scenario, agent_conf, agent_obsk, num_envs, max_episode_steps, render_mode, max_faults,
            clip_actions, observation_layout, xml_file, gym_kwargs, timestep: the constructor arguments.
        faults: sub-env rebuilds so far (kept in the saved state).
        n_agents: number of agents; agent_names: gymnasium-robotics agent names (``"agent_0"``, ...).
        observation_sizes / action_sizes: per-agent unpadded observation / action sizes.
        max_obs_dim / max_action_dim: padded sizes; state_size: size of ``"state"``.
        observation_mask / action_mask: bool ``[n_agents, max_*_dim]``, True on the unpadded entries.
    """

    batch_locked = True

    def __init__(
        self,
        scenario: str,
        agent_conf: str | None,
        agent_obsk: int = 1,
        num_envs: int = 1,
        max_episode_steps: int = 1000,
        seed: int | None = None,
        device: torch.device | str = "cpu",
        render_mode: str | None = None,
        width: int = 480,
        height: int = 480,
        camera_name: str | None = "track",
        max_faults: int = 10,
        clip_actions: bool = False,
        observation_layout: Literal["gymnasium", "official"] = "gymnasium",
        xml_file: str | None = None,
        gym_kwargs: dict[str, Any] | None = None,
        timestep: float | None = None,
    ) -> None:
        if not isinstance(agent_obsk, int) or isinstance(agent_obsk, bool) or agent_obsk < 0:
            raise ValueError(f"agent_obsk must be an integer >= 0, got {agent_obsk!r}.")
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}.")
        if not isinstance(max_episode_steps, int) or max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be an integer >= 1, got {max_episode_steps!r}.")
        if not isinstance(max_faults, int) or isinstance(max_faults, bool) or max_faults < 0:
            raise ValueError(f"max_faults must be an integer >= 0, got {max_faults!r}.")
        if observation_layout not in OBSERVATION_LAYOUTS:
            raise ValueError(
                f"observation_layout must be one of {OBSERVATION_LAYOUTS}, got {observation_layout!r}."
            )
        if render_mode is not None and render_mode not in RENDER_MODES:
            raise ValueError(f"render_mode must be None or one of {RENDER_MODES}, got {render_mode!r}.")
        for name, size in (("width", width), ("height", height)):
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {size!r}.")
        _check_scenario(scenario, agent_conf)
        _check_task_options(scenario, xml_file, gym_kwargs)
        _check_timestep(timestep)
        super().__init__(device=device, batch_size=torch.Size([num_envs]))

        self.scenario = scenario
        self.agent_conf = agent_conf
        self.agent_obsk = agent_obsk
        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps
        self.render_mode = render_mode
        self.max_faults = max_faults
        self.clip_actions = bool(clip_actions)
        self.observation_layout = observation_layout
        self.xml_file, self.gym_kwargs, self.timestep = xml_file, dict(gym_kwargs or {}), timestep
        self._faults = 0

        task_kwargs = self.gym_kwargs | ({} if xml_file is None else {"xml_file": xml_file})
        if render_mode is not None:
            configure_headless_gl()
            task_kwargs |= {"render_mode": render_mode, "width": width, "height": height}
            task_kwargs["camera_name"] = camera_name
        self._rendered = False
        self._gym_kwargs = task_kwargs
        self._penvs = self._make_parallel_envs(num_envs)
        penv = self._penvs[0]
        # Stepping the unwrapped MuJoCo env skips Gymnasium's TimeLimit (we apply our own) and checkers.
        self._sims = [p.single_agent_env.unwrapped for p in self._penvs]
        self.agent_names: list[str] = list(penv.possible_agents)
        self.n_agents = len(self.agent_names)
        self.observation_sizes: list[int] = [
            int(penv.observation_space(a).shape[0]) for a in self.agent_names
        ]
        self.action_sizes: list[int] = [len(part) for part in penv.agent_action_partitions]
        self.state_size = int(penv.single_agent_env.observation_space.shape[0])
        self.max_obs_dim = max(self.observation_sizes)
        self.max_action_dim = max(self.action_sizes)

        self._build_action_mapping(penv)
        self._make_specs()

        n, a = num_envs, self.n_agents
        self.observation_mask = torch.zeros(a, self.max_obs_dim, dtype=torch.bool)
        for i, d in enumerate(self.observation_sizes):
            self.observation_mask[i, :d] = True
        self.action_mask = torch.from_numpy(self._act_valid.copy())
        # Preallocated per-step buffers (padding entries are never written, so they stay zero).
        self._obs = np.zeros((n, a, self.max_obs_dim), dtype=np.float32)
        self._state = np.zeros((n, self.state_size), dtype=np.float32)
        self._reward = np.zeros((n, 1), dtype=np.float32)
        self._terminated = np.zeros((n, 1), dtype=bool)
        self._truncated = np.zeros((n, 1), dtype=bool)
        self._faulted = np.zeros((n, 1), dtype=bool)
        # True where a faulted step rebuilt and reset the sub-env: the auto-reset that follows keeps it.
        self._fresh = np.zeros(n, dtype=bool)
        self._elapsed = np.zeros(n, dtype=np.int64)
        self._pending_seeds: list[int | None] = [None] * n
        self._base_seed: int | None = None
        self._agents_batch = torch.Size([n, a])
        self._to_device = self.device.type != "cpu"
        # rand_action's bounds, on the CPU, and its generator (None: torch's global one; see _set_seed).
        self._rand_low = torch.from_numpy(self._act_low).expand(n, a, self.max_action_dim)
        self._rand_high = torch.from_numpy(self._act_high).expand(n, a, self.max_action_dim)
        self._rand_span = self._rand_high - self._rand_low
        self._action_generator: torch.Generator | None = None
        self._build_gathers()
        if seed is not None:
            self.set_seed(seed)

    # ------------------------------------------------------------------ setup
    def _make_parallel_envs(self, count: int) -> list[Any]:
        penvs = _make_parallel_envs(
            self.scenario,
            self.agent_conf,
            self.agent_obsk,
            count,
            self.observation_layout,
            **self._gym_kwargs,
        )
        if self.timestep is not None:
            for penv in penvs:
                _set_timestep(penv.single_agent_env.unwrapped, self.timestep)
        return penvs

    def _build_action_mapping(self, penv: Any) -> None:
        """Precompute the padded-agent-action -> global-action gather and the per-entry bounds."""
        global_space = penv.single_agent_env.action_space
        n_global = int(global_space.shape[0])
        agent_idx = np.full(n_global, -1, dtype=np.int64)
        slot_idx = np.full(n_global, -1, dtype=np.int64)
        low = -np.ones((self.n_agents, self.max_action_dim), dtype=np.float32)
        high = np.ones((self.n_agents, self.max_action_dim), dtype=np.float32)
        valid = np.zeros((self.n_agents, self.max_action_dim), dtype=bool)
        for i, part in enumerate(penv.agent_action_partitions):
            for j, node in enumerate(part):
                for g in np.atleast_1d(node.act_ids):
                    if agent_idx[g] != -1:
                        raise RuntimeError(
                            f"Global action {g} is mapped twice in {self.scenario} {self.agent_conf}."
                        )
                    agent_idx[g], slot_idx[g] = i, j
                    low[i, j], high[i, j] = global_space.low[g], global_space.high[g]
                valid[i, j] = True
        if (agent_idx < 0).any():
            raise RuntimeError(f"Some global actions are unmapped in {self.scenario} {self.agent_conf}.")
        self._act_agent, self._act_slot = agent_idx, slot_idx
        self._act_low, self._act_high, self._act_valid = low, high, valid
        # The same per global action: its index in a flattened [n_agents * max_action_dim] action, its bounds.
        self._act_flat = agent_idx * self.max_action_dim + slot_idx
        self._global_low = low[agent_idx, slot_idx].astype(np.float64)
        self._global_high = high[agent_idx, slot_idx].astype(np.float64)
        # np.maximum/np.minimum clip like np.clip (NaN included) except a -0.0/+0.0 pair at a zero bound.
        self._clip_by_min_max = bool((self._global_low != 0).all() and (self._global_high != 0).all())

    def _build_gathers(self) -> None:
        """Trace the observations into gathers from a per-sub-env source row, and pick the step path.

        Each sub-env ``i`` has a float64 row ``self._src[i]``: the :data:`_SOURCE_FIELDS` the gathers and
        the :class:`_Dynamics` read, copied from its ``MjData`` after every step and reset
        (:meth:`_copy_sources`), then a constant 0 that padding entries gather. All gathered agents'
        observations and the state are then one ``take`` (and one ``clip`` where some entry is clipped)
        over all sub-envs (:meth:`_gather`). Agents whose observation is not a gather (see
        :func:`_trace_gathers`) are computed by gymnasium-robotics' ``_get_obs_agent`` as before, and so is
        the state by Gymnasium's ``_get_obs``. The plan depends on the model only, so it holds for sub-envs
        rebuilt after a fault (a new ``MjData`` is bound by :meth:`_bind` at its first use).
        """
        penv, sim = self._penvs[0], self._sims[0]
        fns: list[Callable[[], Any]] = [
            functools.partial(penv._get_obs_agent, a) for a in range(self.n_agents)
        ]
        traced = _trace_gathers(sim, [*fns, sim._get_obs])
        agent_gathers, state_gather = traced[:-1], traced[-1]
        self._dynamics = _dynamics_for(sim)
        self._gathered_agents = [a for a, g in enumerate(agent_gathers) if g is not None]
        self._fallback_agents = [a for a, g in enumerate(agent_gathers) if g is None]
        self._state_gathered = state_gather is not None

        # The source row holds only the fields something reads, in _SOURCE_FIELDS order.
        full_layout = _source_layout(sim.data)
        used = set() if self._dynamics is None else set(self._dynamics.fields)
        parts = [g for g in traced if g is not None]
        for g in parts:
            for name, (start, stop) in full_layout.items():
                if ((g.index >= start) & (g.index < stop)).any():
                    used.add(name)
        remap = np.full(max(stop for _, stop in full_layout.values()), -1, dtype=np.int64)
        self._src_fields: list[tuple[str, int, int]] = []
        width = 0
        for name, (start, stop) in full_layout.items():
            if name in used:
                remap[start:stop] = np.arange(width, width + stop - start)
                self._src_fields.append((name, width, width + stop - start))
                width += stop - start
        zero = width  # the constant-0 column
        self._src = np.zeros((self.num_envs, width + 1), dtype=np.float64)

        # One index (and clip bounds) over [gathered agents x max_obs_dim | state].
        g_count, obs_dim = len(self._gathered_agents), self.max_obs_dim
        index = np.full(g_count * obs_dim + (self.state_size if self._state_gathered else 0), zero, np.int64)
        low, high = np.full(index.shape, -np.inf), np.full(index.shape, np.inf)
        spans = [(j * obs_dim, agent_gathers[a]) for j, a in enumerate(self._gathered_agents)]
        if state_gather is not None:
            spans.append((g_count * obs_dim, state_gather))
        for offset, g in spans:
            end = offset + len(g.index)
            index[offset:end], low[offset:end], high[offset:end] = remap[g.index], g.low, g.high
        self._gather_index = index
        self._gather_obs_end = g_count * obs_dim
        clipped = np.isfinite(low).any() or np.isfinite(high).any()
        self._gather_bounds = (low, high) if clipped else None
        self._gather_min_max = bool((low != 0).all() and (high != 0).all())
        self._all_gathered = not self._fallback_agents
        # Gymnasium's physics step ends with mj_rnePostConstraint, whose only outputs (cacc, cfrc_int,
        # cfrc_ext) no later step reads: it is skipped where nothing observes them either.
        self._post_constraint = bool(used & _POST_CONSTRAINT_FIELDS) or not (
            self._all_gathered and self._state_gathered
        )

        # Per sub-env: views of its source row shaped like the MjData fields (see _bind).
        self._src_shapes = {name: getattr(sim.data, name).shape for name, _, _ in self._src_fields}
        self._bound: list[Any] = [None] * self.num_envs
        self._copies: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(self.num_envs)]
        self._x_views: list[np.ndarray | None] = [None] * self.num_envs
        self._ctrl: list[np.ndarray | None] = [None] * self.num_envs
        self._before = np.zeros(self.num_envs, dtype=np.float64)
        if self._dynamics is not None:
            self._dynamics.bind({name: self._src[:, start:stop] for name, start, stop in self._src_fields})

    def _make_specs(self) -> None:
        n, a = self.num_envs, self.n_agents
        low = torch.from_numpy(self._act_low).expand(n, a, self.max_action_dim).clone()
        high = torch.from_numpy(self._act_high).expand(n, a, self.max_action_dim).clone()
        action = Bounded(low=low, high=high, shape=(n, a, self.max_action_dim), device=self.device)
        set_contract_specs(self, self.max_obs_dim, self.state_size, action, flags=("faulted",))

    # ------------------------------------------------------------------ core
    def _bind(self, i: int) -> None:
        """Pair sub-env ``i``'s ``MjData`` arrays with its source row (``MjData`` arrays never move, but
        each attribute access builds a new numpy view, which costs as much as the copy)."""
        data = self._sims[i].data
        self._copies[i] = [
            (self._src[i, start:stop].reshape(self._src_shapes[name]), getattr(data, name))
            for name, start, stop in self._src_fields
        ]
        if self._dynamics is not None:
            self._x_views[i] = getattr(data, self._dynamics.before_field)
        self._ctrl[i] = data.ctrl
        self._bound[i] = data

    def _copy_sources(self, i: int) -> None:
        """Copy sub-env ``i``'s simulator arrays into its source row."""
        if self._sims[i].data is not self._bound[i]:
            self._bind(i)
        for row, array in self._copies[i]:
            row[...] = array

    def _read(self, i: int, state: np.ndarray | None) -> None:
        """Take in sub-env ``i`` after a step or reset: its source row and the observations not gathered.

        ``state`` is Gymnasium's observation when its ``step``/``reset`` ran (``None`` otherwise); the
        gathered observations are written by :meth:`_gather`.
        """
        self._copy_sources(i)
        if self._fallback_agents:
            penv, obs = self._penvs[i], self._obs[i]
            for a in self._fallback_agents:
                obs[a, : self.observation_sizes[a]] = penv._get_obs_agent(a)
        if not self._state_gathered:
            self._state[i] = self._sims[i]._get_obs() if state is None else state

    def _gather(self, rows: Sequence[int] | None = None) -> None:
        """Write the gathered observations and state of sub-envs ``rows`` (all if ``None``) from the rows."""
        src = self._src if rows is None else self._src[rows]
        values = src.take(self._gather_index, axis=1)
        if self._gather_bounds is not None:
            _clip(values, *self._gather_bounds, out=values, exact_min_max=self._gather_min_max)
        end = self._gather_obs_end
        obs = values[:, :end].reshape(len(src), len(self._gathered_agents), self.max_obs_dim)
        if rows is None:
            if self._all_gathered:
                self._obs[...] = obs
            else:
                self._obs[:, self._gathered_agents] = obs
            if self._state_gathered:
                self._state[...] = values[:, end:]
            return
        for j, i in enumerate(rows):
            self._obs[i, self._gathered_agents] = obs[j]
            if self._state_gathered:
                self._state[i] = values[j, end:]

    def _output(self, reward: bool) -> TensorDictBase:
        """Pack copies of the buffers into the output TensorDict (one ``from_numpy`` per key).

        The tensors are built here with the spec shapes and dtypes, so the unchecked (and much cheaper)
        ``TensorDict._new_unsafe`` constructor is used.
        """
        data = {
            "state": torch.from_numpy(self._state.copy()),
            "done": torch.from_numpy(np.logical_or(self._terminated, self._truncated)),
            "terminated": torch.from_numpy(self._terminated.copy()),
            "truncated": torch.from_numpy(self._truncated.copy()),
            "faulted": torch.from_numpy(self._faulted.copy()),
        }
        if reward:
            data["reward"] = torch.from_numpy(self._reward.copy())
        obs = torch.from_numpy(self._obs.copy())
        if self._to_device:
            data = {key: value.to(self.device, non_blocking=True) for key, value in data.items()}
            obs = obs.to(self.device, non_blocking=True)
        data["agents"] = TensorDict._new_unsafe(
            {"observation": obs}, batch_size=self._agents_batch, device=self.device
        )
        return TensorDict._new_unsafe(data, batch_size=self.batch_size, device=self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get(("agents", "action"))
        if action.requires_grad:
            action = action.detach()
        action = action.numpy() if action.is_cpu else action.cpu().numpy()
        # Float32 agent actions -> float64 global actions, as gymnasium-robotics does (clipping after the
        # gather, and in float64, gives the same values: the bounds are float32 numbers).
        global_action = action.reshape(self.num_envs, -1).take(self._act_flat, axis=1).astype(np.float64)
        if self.clip_actions:
            _clip(global_action, self._global_low, self._global_high, global_action, self._clip_by_min_max)
        self._faulted.fill(False)
        self._fresh.fill(False)
        if self._dynamics is None:
            self._step_gymnasium(global_action)
        else:
            self._step_vectorised(global_action)
        self._gather()
        return self._output(reward=True)

    def _step_gymnasium(self, global_action: np.ndarray) -> None:
        """Step every sub-env through Gymnasium's ``step`` (tasks without :class:`_Dynamics`)."""
        for i, sim in enumerate(self._sims):
            try:
                state, reward, terminated, truncated, _ = sim.step(global_action[i])
                self._read(i, state)
            except Exception as err:
                self._recover(i, err, "step")
                self._cut_short(i)
                continue
            self._elapsed[i] += 1
            self._reward[i, 0] = reward
            self._terminated[i, 0] = terminated
            self._truncated[i, 0] = truncated or self._elapsed[i] >= self.max_episode_steps

    def _step_vectorised(self, global_action: np.ndarray) -> None:
        """Step every sub-env's physics, then compute all rewards and terminations at once."""
        import mujoco  # imported once the env is built (after configure_headless_gl)

        dynamics, before, bound = self._dynamics, self._before, self._bound
        key = dynamics.before_key
        copy_only = self._all_gathered and self._state_gathered
        post_constraint = self._post_constraint
        # Before the physics, which evicts numpy's code from the CPU caches (measurably slower after it).
        ctrl_cost = dynamics.control_cost(global_action)
        faulted = []
        for i, sim in enumerate(self._sims):
            try:
                if sim.data is not bound[i]:
                    self._bind(i)
                before[i] = self._x_views[i][key]
                # Gymnasium's _step_mujoco_simulation, with the ctrl view bound once.
                self._ctrl[i][:] = global_action[i]
                mujoco.mj_step(sim.model, bound[i], nstep=sim.frame_skip)
                if post_constraint:
                    mujoco.mj_rnePostConstraint(sim.model, bound[i])
                if copy_only:  # self._read, inlined
                    for row, array in self._copies[i]:
                        row[...] = array
                else:
                    self._read(i, None)
            except Exception as err:
                self._recover(i, err, "step")
                faulted.append(i)
        reward, terminated = dynamics(before, ctrl_cost)
        self._reward[:, 0] = reward
        self._terminated[:, 0] = terminated
        self._elapsed += 1
        np.greater_equal(self._elapsed, self.max_episode_steps, out=self._truncated[:, 0])
        for i in faulted:
            self._cut_short(i)

    def _cut_short(self, i: int) -> None:
        """Mark sub-env ``i``'s step as a fault's: reward 0, truncated, and its rebuilt reset kept."""
        self._fresh[i] = True
        self._elapsed[i] = 0
        self._reward[i, 0] = 0.0
        self._terminated[i, 0] = False
        self._truncated[i, 0] = True

    def _step_proc_data(self, next_tensordict_out: TensorDictBase) -> TensorDictBase:
        """Skip TorchRL's post-step completion unless ``run_type_checks`` is set.

        :meth:`_step` already returns every reward and done key with the spec shapes and dtypes, so
        ``EnvBase._step_proc_data`` (reshaping rewards, filling missing done keys) would change nothing, at a
        cost comparable to a tenth of the simulation step of HalfCheetah.
        """
        if self.run_type_checks:
            return super()._step_proc_data(next_tensordict_out)
        return next_tensordict_out

    def step_and_maybe_reset(self, tensordict: TensorDictBase) -> tuple[TensorDictBase, TensorDictBase]:
        """TorchRL's ``step_and_maybe_reset`` (what collectors call), with the same results, faster.

        Like TorchRL's own batched environments (``ParallelEnv``, ``SerialEnv``), this batched env overrides
        it: for an input that needs none of ``EnvBase.step``'s generic handling (no partial ``"_step"``, no
        preset ``"next"``, on the env's device, no type checks or hooks) it steps, applies TorchRL's
        ``step_mdp``, and calls ``maybe_reset`` only when a sub-env finished. That saves about a tenth of a
        HalfCheetah step. Any other input takes the generic path.
        """
        if (
            self.run_type_checks
            or self._post_step_mdp_hooks is not None
            or self.__dict__.get("_torchrl_native_autoreset", False)
            or tensordict.device != self.device
            or tensordict.get("_step", None) is not None
            or tensordict.get("next", None) is not None
        ):
            return super().step_and_maybe_reset(tensordict)
        next_tensordict = self._step(tensordict)
        tensordict._set_str("next", next_tensordict, validated=True, inplace=False, non_blocking=False)
        tensordict_ = self._step_mdp(tensordict)
        if self._terminated.any() or self._truncated.any():  # this step's done flags, still in the buffers
            tensordict_ = self.maybe_reset(tensordict_)
        return tensordict, tensordict_

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        reset = None if tensordict is None else tensordict.get("_reset", None)
        if reset is None:
            indices: Sequence[int] = range(self.num_envs)
        else:
            indices = np.flatnonzero(reset.reshape(self.num_envs).cpu().numpy()).tolist()
        self._faulted.fill(False)
        for i in indices:
            seed, self._pending_seeds[i] = self._pending_seeds[i], None
            # A sub-env rebuilt by a faulted step was reset then: its new episode starts from that reset.
            if not (self._fresh[i] and seed is None):
                try:
                    state, _ = self._sims[i].reset(seed=seed)
                    self._read(i, state)
                except Exception as err:
                    self._recover(i, err, "reset")
            self._fresh[i] = False
            self._elapsed[i] = 0
            self._terminated[i, 0] = self._truncated[i, 0] = False
        if len(indices) == self.num_envs:
            self._gather()
        elif len(indices):
            self._gather(list(indices))
        return self._output(reward=False)

    def _set_seed(self, seed: int | None) -> None:
        """Seed sub-env ``i`` with ``seed + i`` at its next reset (``None`` clears pending seeds).

        ``seed`` is also the entropy of the seeds of rebuilt sub-envs (:meth:`fault_seed`) and the seed of
        :meth:`rand_action`'s generator (``None``: torch's global generator again).
        """
        self._base_seed = None if seed is None else int(seed)
        self._pending_seeds = [None if seed is None else int(seed) + i for i in range(self.num_envs)]
        self._action_generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def rand_action(self, tensordict: TensorDictBase | None = None) -> TensorDictBase:
        """Uniform random actions in the action spec's bounds, at ``("agents", "action")`` of
        ``tensordict`` (or of a new TensorDict), float32 ``[num_envs, n_agents, max_action_dim]``.

        They are drawn from the env's own generator, seeded by :meth:`set_seed` and kept in the saved state,
        so a seeded env replays the same actions whatever else uses torch's global generator; an unseeded
        env draws from the global one, as TorchRL's ``EnvBase.rand_action`` does. That method (which
        ``rollout`` without a policy and ``rand_step`` call) samples the whole ``Composite`` action spec at
        a cost above a HalfCheetah step; this samples the one ``Bounded`` leaf.
        """
        uniform = torch.rand(self._rand_low.shape, generator=self._action_generator)
        action = torch.minimum(torch.addcmul(self._rand_low, uniform, self._rand_span), self._rand_high)
        if self._to_device:
            action = action.to(self.device)
        if tensordict is None:
            agents = TensorDict._new_unsafe(
                {"action": action}, batch_size=self._agents_batch, device=self.device
            )
            return TensorDict._new_unsafe({"agents": agents}, batch_size=self.batch_size, device=self.device)
        tensordict.set(("agents", "action"), action)
        return tensordict

    # ------------------------------------------------------------------ faults
    @property
    def faults(self) -> int:
        """How many times a sub-env was rebuilt after raising (over the env's life, saved states included)."""
        return self._faults

    def fault_seed(self, index: int, fault: int) -> int | None:
        """The reset seed of sub-env ``index`` rebuilt after the env's ``fault``-th fault (from 1).

        ``SeedSequence(seed, spawn_key=(index, fault))`` of the env's seed (the constructor's or the last
        :meth:`set_seed`'s), as a 32-bit integer: deterministic, distinct per sub-env and fault, and
        independent of the other sub-envs' generators. ``None`` when the env is unseeded (the rebuilt
        sub-env then draws fresh OS entropy, like an unseeded reset).
        """
        if self._base_seed is None:
            return None
        sequence = np.random.SeedSequence(self._base_seed, spawn_key=(index, fault))
        return int(sequence.generate_state(1)[0])

    def _rebuild(self, index: int) -> None:
        """Replace sub-env ``index`` by a fresh ``parallel_env`` built as the constructor builds them."""
        penv = self._make_parallel_envs(1)[0]
        old, self._penvs[index] = self._penvs[index], penv
        self._sims[index] = penv.single_agent_env.unwrapped
        with contextlib.suppress(Exception):  # a crashed simulator may fail to close; it is dropped anyway
            old.close()

    def _recover(self, index: int, err: Exception, during: str) -> None:
        """Rebuild sub-env ``index`` after ``err`` (raised during ``during``) and reset it
        (:func:`~fp3o_lightning.envs.faults.rebuild_after_fault`, which raises past ``max_faults``).

        Writes the reset observation and state into the buffers and sets ``faulted``; the caller sets the
        done flags and reward.
        """

        def rebuild(fault: int) -> None:
            self._rebuild(index)
            state, _ = self._sims[index].reset(seed=self.fault_seed(index, fault))
            self._read(index, state)  # the caller gathers

        label = self.scenario if self.agent_conf is None else f"{self.scenario} {self.agent_conf}"
        rebuild_after_fault(self, label, index, err, during, rebuild, cause="the simulator")
        self._elapsed[index] = 0
        self._faulted[index, 0] = True

    # ------------------------------------------------------------------ checkpointing
    #: Version of the :meth:`get_extra_state` layout. Format 2 added ``"faults"``, ``"seed"`` and ``"fresh"``;
    #: format-1 states still load (as an env with no faults that keeps this env's seed for rebuilds).
    _STATE_FORMAT = 2
    _STATE_FORMATS = (1, 2)
    #: ``mjData`` fields derived from the state, kept in the extra state beside MuJoCo's integration state.
    #: ``mj_setState`` leaves them as they were, and they are not recomputed before the next step's physics,
    #: but Gymnasium reads some before simulating (Ant's ``xpos``, Humanoid's ``xipos`` for the forward
    #: velocity) and the observations (``cfrc_ext``, ``cinert``, ``cvel``, ``qfrc_actuator``) and renders
    #: read others. Recomputing them with ``mj_forward`` would not do: after ``mj_step`` they describe the
    #: state at the start of the last substep, and ``mj_forward`` overwrites the solver warm start.
    _DERIVED_FIELDS = (
        "xpos",
        "xquat",
        "xmat",
        "xipos",
        "ximat",
        "xanchor",
        "xaxis",
        "geom_xpos",
        "geom_xmat",
        "site_xpos",
        "site_xmat",
        "subtree_com",
        "cdof",
        "cinert",
        "cvel",
        "cacc",
        "cfrc_int",
        "cfrc_ext",
        "qfrc_actuator",
        "actuator_force",
        "actuator_length",
        "actuator_velocity",
        "sensordata",
        "qacc",
    )

    def _state_config(self) -> dict[str, Any]:
        """The constructor arguments a saved env state must match to be loaded."""
        return {
            "scenario": self.scenario,
            "agent_conf": self.agent_conf,
            "agent_obsk": self.agent_obsk,
            "num_envs": self.num_envs,
        }

    def get_extra_state(self) -> dict[str, Any]:
        """The full simulation state, stored by :meth:`state_dict` under the ``"_extra_state"`` key.

        With it, ``env_b.load_state_dict(env_a.state_dict())`` on an env built with the same ``scenario``,
        ``agent_conf``, ``agent_obsk`` and ``num_envs`` (any ``seed``) makes ``env_b`` continue bit for bit
        like ``env_a``: the same steps, resets (initial-state noise included) and outputs. It holds only
        tensors, strings, ints and ``None`` in dicts and lists, so ``torch.load(..., weights_only=True)``
        reads it back. Per sub-env it has:

        * ``"physics"``: MuJoCo's integration state (``mj_getState`` with ``mjSTATE_INTEGRATION``: time,
          qpos, qvel, act, solver warm start, ctrl, applied forces, mocap, ...), float64
          ``[num_envs, size]``;
        * ``"derived"``: the derived ``mjData`` fields of :attr:`_DERIVED_FIELDS` (positions, contact forces,
          ... left by the last step), float64;
        * ``"elapsed"``: the steps since the last reset, for truncation;
        * ``"buffers"``: the env's last observation, state, reward and done flags (a partial reset
          returns the other sub-envs' entries from them);
        * ``"np_random"`` / ``"np_random_seed"``: the Gymnasium env's generator state (it draws the initial
          states of later resets) and seed;
        * ``"pending_seeds"``: seeds given to :meth:`set_seed` and not yet used by a reset;
        * ``"action_generator"``: the state of :meth:`rand_action`'s generator (``None`` when the env is
          unseeded; states saved before it existed load and leave the env's generator as it is);
        * ``"fresh"``: which sub-envs were rebuilt by the last step (their next auto-reset keeps that reset);

        and ``"faults"`` (:attr:`faults`, so a resumed run keeps counting towards ``max_faults``), ``"seed"``
        (the env's seed, from which the seeds of rebuilt sub-envs are derived), ``"format"`` and ``"config"``
        (the constructor arguments above and ``max_episode_steps``).

        It does **not** include the current observation TensorDict (what the last ``reset`` or
        ``step_and_maybe_reset`` returned): the caller (e.g. a collector) keeps it and passes it, with the
        actions, to the next step after loading.
        """
        import mujoco

        signature = mujoco.mjtState.mjSTATE_INTEGRATION
        size = mujoco.mj_stateSize(self._sims[0].model, signature)
        physics = np.empty((self.num_envs, size), dtype=np.float64)
        derived: dict[str, list[np.ndarray]] = {name: [] for name in self._DERIVED_FIELDS}
        for i, sim in enumerate(self._sims):
            mujoco.mj_getState(sim.model, sim.data, physics[i], signature)
            for name in self._DERIVED_FIELDS:
                derived[name].append(np.array(getattr(sim.data, name), dtype=np.float64, copy=True))
        return {
            "format": self._STATE_FORMAT,
            "config": {**self._state_config(), "max_episode_steps": self.max_episode_steps},
            "signature": int(signature),
            "physics": torch.from_numpy(physics),
            "derived": {name: torch.from_numpy(np.stack(arrays)) for name, arrays in derived.items()},
            "elapsed": torch.from_numpy(self._elapsed.copy()),
            "buffers": {
                "observation": torch.from_numpy(self._obs.copy()),
                "state": torch.from_numpy(self._state.copy()),
                "reward": torch.from_numpy(self._reward.copy()),
                "terminated": torch.from_numpy(self._terminated.copy()),
                "truncated": torch.from_numpy(self._truncated.copy()),
            },
            # ``np_random`` creates the generator if no reset made it yet, as the next reset would.
            "np_random": [_plain(sim.np_random.bit_generator.state) for sim in self._sims],
            "np_random_seed": [_plain(sim._np_random_seed) for sim in self._sims],
            "pending_seeds": [None if s is None else int(s) for s in self._pending_seeds],
            "action_generator": None
            if self._action_generator is None
            else self._action_generator.get_state(),
            "fresh": torch.from_numpy(self._fresh.copy()),
            "faults": int(self._faults),
            "seed": self._base_seed,
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore a state made by :meth:`get_extra_state` (called by :meth:`load_state_dict`).

        The whole state is checked before anything is changed. It restores :attr:`faults` (a state saved with
        more faults than this env's ``max_faults`` loads, and the next fault raises) and the seed that the
        seeds of rebuilt sub-envs derive from. States of format 1 (saved before fault recovery existed)
        load too, with no faults counted and this env's own seed kept.

        Raises:
            ValueError: if ``state`` is not such a state, or comes from an env with a different
                ``scenario``, ``agent_conf``, ``agent_obsk`` or ``num_envs`` (``max_episode_steps`` and
                ``max_faults`` may differ: the restored step counters then count towards the new limit).
        """
        import mujoco

        name = type(self).__name__
        check_saved_state(
            name,
            state,
            self._STATE_FORMATS,
            self._state_config(),
            "Build the env with the same scenario, agent_conf, agent_obsk and num_envs as the saved one.",
        )
        signature = mujoco.mjtState.mjSTATE_INTEGRATION
        size = mujoco.mj_stateSize(self._sims[0].model, signature)
        physics = state["physics"]
        if state["signature"] != int(signature) or tuple(physics.shape) != (self.num_envs, size):
            raise ValueError(
                f"Cannot load the {name} state: its MuJoCo state has shape {tuple(physics.shape)} and "
                f"signature {state['signature']}, this env's has {(self.num_envs, size)} and "
                f"{int(signature)} (a different MuJoCo or model version?)."
            )
        derived = {key: state["derived"][key].numpy() for key in self._DERIVED_FIELDS}
        for key, value in derived.items():
            expected = (self.num_envs, *np.shape(getattr(self._sims[0].data, key)))
            if value.shape != expected:
                raise ValueError(
                    f"Cannot load the {name} state: {key!r} has shape {value.shape}, not {expected}."
                )
        if state["format"] >= 2 and tuple(state["fresh"].shape) != (self.num_envs,):
            raise ValueError(
                f"Cannot load the {name} state: 'fresh' has shape {tuple(state['fresh'].shape)}, "
                f"not {(self.num_envs,)}."
            )
        generators = []
        for rng_state in state["np_random"]:
            generator = np.random.Generator(getattr(np.random, rng_state["bit_generator"])())
            generator.bit_generator.state = _numpy_state(rng_state)
            generators.append(generator)
        action_generator = self._action_generator
        if "action_generator" in state:
            saved = state["action_generator"]
            action_generator = None if saved is None else torch.Generator().set_state(saved)

        physics = physics.numpy()
        for i, sim in enumerate(self._sims):
            mujoco.mj_setState(sim.model, sim.data, np.ascontiguousarray(physics[i]), signature)
            for key, value in derived.items():
                getattr(sim.data, key)[...] = value[i]
            sim.np_random = generators[i]
            sim._np_random_seed = state["np_random_seed"][i]
            self._copy_sources(i)
        buffers = state["buffers"]
        self._elapsed[:] = state["elapsed"].numpy()
        self._obs[:] = buffers["observation"].numpy()
        self._state[:] = buffers["state"].numpy()
        self._reward[:] = buffers["reward"].numpy()
        self._terminated[:] = buffers["terminated"].numpy()
        self._truncated[:] = buffers["truncated"].numpy()
        self._pending_seeds = list(state["pending_seeds"])
        self._action_generator = action_generator
        if state["format"] >= 2:
            self._fresh[:] = state["fresh"].numpy()
            self._faults = int(state["faults"])
            self._base_seed = state["seed"]
        else:  # format 1 predates fault recovery
            self._fresh[:] = False
            self._faults = 0

    def render(self, index: int = 0) -> np.ndarray:
        """Render sub-env ``index`` as it is now: a ``[height, width, 3]`` uint8 RGB frame.

        Raises:
            RuntimeError: if the env was built without ``render_mode="rgb_array"``, or if MuJoCo cannot
                create an off-screen OpenGL context (the message names the packages to install).
        """
        if self.render_mode is None:
            raise RuntimeError(f"{type(self).__name__} was built without render_mode='rgb_array'.")
        if not -self.num_envs <= index < self.num_envs:
            raise IndexError(f"index {index} is out of range for {self.num_envs} sub-environments.")
        try:
            frame = self._sims[index].render()
        except Exception as err:
            if self._rendered:
                raise
            raise RuntimeError(
                f"MuJoCo could not render off-screen with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} "
                f"({type(err).__name__}: {err}). {_gl_install_hint()}"
            ) from err
        self._rendered = True
        return np.ascontiguousarray(frame, dtype=np.uint8)

    @property
    def render_fps(self) -> float:
        """Frames per second of real time: Gymnasium's ``metadata["render_fps"]``, else ``1 / dt``."""
        sim = self._sims[0]
        fps = sim.metadata.get("render_fps")
        return float(fps) if fps else 1.0 / float(sim.dt)

    def close(self, *, raise_if_closed: bool = True) -> None:
        """Close the underlying gymnasium-robotics environments."""
        for penv in self.__dict__.get("_penvs", []):
            penv.close()
        super().close(raise_if_closed=raise_if_closed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(scenario={self.scenario!r}, agent_conf={self.agent_conf!r}, "
            f"agent_obsk={self.agent_obsk}, num_envs={self.num_envs}, n_agents={self.n_agents}, "
            f"observation_sizes={self.observation_sizes}, action_sizes={self.action_sizes}, "
            f"state_size={self.state_size}, max_episode_steps={self.max_episode_steps}, device={self.device})"
        )
