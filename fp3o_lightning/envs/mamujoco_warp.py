"""Multi-Agent MuJoCo simulated by MuJoCo Warp: thousands of worlds in one ``mjw.Data``, on the GPU (or,
slowly, on the CPU), the same tasks as :class:`~fp3o_lightning.envs.mamujoco.MaMuJoCoEnv` (``backend: warp``).

The task comes from gymnasium-robotics as the CPU environment builds it (that environment, with one
sub-env, is kept as the task's description and renderer): the v5 XML model (the generated one for the many-
segment scenarios), its frame skip, integrator and solver, the agent partitions and the action mapping, the
observations and the state as a program of gathers (:mod:`~fp3o_lightning.envs.mamujoco_task`), the v5
reward terms, healthy checks and termination (:class:`~fp3o_lightning.envs.mamujoco._Dynamics`, the same
formulas on tensors), and the reset noise of each task's ``reset_model``. One step writes every world's
controls, runs the frame-skip loop of ``mjw.step`` (captured once as a CUDA graph on the GPU), then computes
observations, rewards and flags of all worlds with tensor operations on zero-copy torch views of the Warp
arrays: no per-world Python.

Differences from the CPU environment, by design: the simulation is float32; the reset noise is drawn from a
seeded torch generator (same distributions, not the same numbers as Gymnasium's numpy streams); MuJoCo
Warp's contact frames can differ from C MuJoCo's, so trajectories with contacts diverge while their
statistics agree. A world whose state becomes NaN or infinite is reset, its step marked ``faulted`` (its
episode cut short, reward 0, ``truncated``), and counted (:attr:`MaMuJoCoWarpEnv.nonfinite_resets`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Literal

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded
from torchrl.envs import EnvBase

from fp3o_lightning.envs.mamujoco import (
    _SOURCE_FIELDS,
    TORCH_OPS,
    MaMuJoCoEnv,
    _Dynamics,
    _source_layout,
    dynamics_kind,
)
from fp3o_lightning.envs.mamujoco_task import ObservationProgram, ResetNoise, trace_program
from fp3o_lightning.envs.specs import set_contract_specs
from fp3o_lightning.envs.state import check_saved_state

#: The ``mjw.Data`` arrays a saved state holds: the integration state, and the derived arrays the
#: observations and rewards read (after a step they describe the start of its last substep, as in C MuJoCo).
_STATE_FIELDS = ("qpos", "qvel", "act", "qacc_warmstart", "ctrl", "time", *_SOURCE_FIELDS[2:])


def _warp() -> tuple[Any, Any]:
    """``warp`` and ``mujoco_warp``, imported quietly."""
    import warp as wp

    wp.config.log_level = logging.WARNING  # before Warp initialises: no banner of its devices
    import mujoco_warp as mjw

    wp.init()
    return wp, mjw


def _contact_capacity(sim: Any, steps: int = 400) -> tuple[int, int]:
    """The most contacts and constraint rows C MuJoCo needs on ``sim``'s task under random actions."""
    import mujoco

    data = mujoco.MjData(sim.model)
    rng = np.random.default_rng(0)
    ncon = nefc = 0
    low, high = sim.model.actuator_ctrlrange.T
    for step in range(steps):
        if step % 100 == 0:
            mujoco.mj_resetData(sim.model, data)
            data.qpos[:] = sim.init_qpos + rng.uniform(-0.1, 0.1, sim.model.nq)
        data.ctrl[:] = rng.uniform(low, high)
        mujoco.mj_step(sim.model, data, nstep=sim.frame_skip)
        ncon, nefc = max(ncon, data.ncon), max(nefc, data.nefc)
    return ncon, nefc


class MaMuJoCoWarpEnv(EnvBase):
    """``num_envs`` worlds of a MaMuJoCo task simulated by MuJoCo Warp on ``device``.

    ``scenario``, ``agent_conf``, ``agent_obsk``, ``max_episode_steps``, ``clip_actions``,
    ``observation_layout``, ``xml_file``, ``gym_kwargs`` and ``timestep`` are
    :class:`~fp3o_lightning.envs.mamujoco.MaMuJoCoEnv`'s options.

    Args:
        num_envs: worlds simulated in parallel (the batch size): thousands on a GPU.
        seed: seeds the reset noise and :meth:`rand_action`.
        device: where the worlds are simulated and every tensor lives (``"cuda"``; ``"cpu"`` runs, slowly).
        nconmax: contacts allocated per world (default: four times the most C MuJoCo needs under random
            actions, at least 16); a step that needs more raises an error that names this option.
        njmax: constraint rows allocated per world (default: likewise from C MuJoCo).
        graph: on CUDA, capture the frame-skip loop once as a CUDA graph and replay it every step.

    ``render_mode``, ``width``, ``height`` and ``camera_name`` are for :meth:`render` (one world copied into C
    MuJoCo). The attributes are :class:`~fp3o_lightning.envs.mamujoco.MaMuJoCoEnv`'s (``n_agents``,
    ``observation_sizes``, ``action_sizes``, ``max_obs_dim``, ``max_action_dim``, ``state_size``, ...), and
    ``nconmax``, ``njmax`` and ``nonfinite_resets`` (worlds reset for a non-finite state, kept in the saved
    state).
    """

    simulates_on_device = True
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
        clip_actions: bool = False,
        observation_layout: Literal["gymnasium", "official"] = "gymnasium",
        xml_file: str | None = None,
        gym_kwargs: dict[str, Any] | None = None,
        timestep: float | None = None,
        nconmax: int | None = None,
        njmax: int | None = None,
        graph: bool = True,
        render_mode: str | None = None,
        width: int = 480,
        height: int = 480,
        camera_name: str | None = "track",
    ) -> None:
        task = MaMuJoCoEnv(
            scenario,
            agent_conf,
            agent_obsk,
            num_envs=1,
            max_episode_steps=max_episode_steps,
            clip_actions=clip_actions,
            observation_layout=observation_layout,
            xml_file=xml_file,
            gym_kwargs=gym_kwargs,
            timestep=timestep,
            render_mode=render_mode,
            width=width,
            height=height,
            camera_name=camera_name,
        )
        sim = task._sims[0]
        self._check_supported(sim.model)
        kind = dynamics_kind(sim)
        if kind is None:
            raise ValueError(
                f"{scenario} {agent_conf}: the 'warp' backend knows the rewards of the v5 locomotion tasks "
                "and Reacher only; use backend 'cpu'"
            )
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        object.__setattr__(self, "_task", task)  # not a sub-module: its state is not this env's
        self.scenario, self.agent_conf, self.agent_obsk = scenario, agent_conf, agent_obsk
        self.num_envs, self.max_episode_steps = num_envs, max_episode_steps
        self.clip_actions, self.observation_layout, self.xml_file = clip_actions, observation_layout, xml_file
        self.gym_kwargs, self.timestep = task.gym_kwargs, timestep
        self.render_mode = render_mode
        for name in ("n_agents", "agent_names", "observation_sizes", "action_sizes", "max_obs_dim"):
            setattr(self, name, getattr(task, name))
        self.max_action_dim, self.state_size = task.max_action_dim, task.state_size
        self.observation_mask, self.action_mask = task.observation_mask, task.action_mask
        self._substeps = int(sim.frame_skip)  # (not "frame_skip", which TorchRL repeats steps by)
        self._dynamics = _Dynamics(sim, kind, TORCH_OPS)
        self._build_program(task, sim)
        self._build_simulator(sim, nconmax, njmax)
        self._dynamics.bind(self._source_views())
        self._noise = ResetNoise.of(sim)
        self._act_flat = torch.as_tensor(task._act_flat, device=self.device)
        self._act_low = torch.as_tensor(task._global_low, dtype=torch.float32, device=self.device)
        self._act_high = torch.as_tensor(task._global_high, dtype=torch.float32, device=self.device)
        self._elapsed = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self._generator = torch.Generator()
        self.nonfinite_resets = 0
        self._graph_wanted, self._graph, self._simulated = graph, None, 0
        self._make_specs(task)
        if seed is not None:
            self.set_seed(seed)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _check_supported(model: Any) -> None:
        """Raise, naming the reason and the CPU backend, for what MuJoCo Warp cannot simulate."""
        import mujoco

        if model.opt.solver == mujoco.mjtSolver.mjSOL_PGS:
            raise ValueError(
                "MuJoCo Warp does not support the PGS constraint solver this task's model uses (e.g. "
                "Humanoid-v5); use backend 'cpu'"
            )

    def _build_program(self, task: MaMuJoCoEnv, sim: Any) -> None:
        """The observations and the state as one program over the source fields it reads."""
        penv = task._penvs[0]
        fns = [functools.partial(penv._get_obs_agent, a) for a in range(self.n_agents)] + [sim._get_obs]
        program = trace_program(sim, fns, self.observation_sizes, self.max_obs_dim)
        layout = _source_layout(sim.data)
        used = set(self._dynamics.fields)
        for name, (start, stop) in layout.items():
            if np.isin(np.arange(start, stop), np.concatenate([program.a, program.b])).any():
                used.add(name)
        # The source row holds the fields read, in layout order, then the constant 0 of padding.
        remap = np.full(program.width, -1, dtype=np.int64)
        self._fields: list[tuple[str, tuple[int, ...]]] = []
        width = 0
        for name, (start, stop) in layout.items():
            if name in used:
                remap[start:stop] = np.arange(width, width + stop - start)
                self._fields.append((name, getattr(sim.data, name).shape))
                width += stop - start
        remap[program.width - 1] = width
        remapped = ObservationProgram(
            program.op, remap[program.a], remap[program.b], program.low, program.high, width + 1
        )
        self._program = remapped.to(self.device)
        self._obs_end = self.n_agents * self.max_obs_dim

    def _build_simulator(self, sim: Any, nconmax: int | None, njmax: int | None) -> None:
        wp, mjw = _warp()
        ncon, nefc = _contact_capacity(sim)
        self.nconmax = int(nconmax or max(16, 4 * ncon))
        self.njmax = int(njmax or max(16, 4 * nefc))
        self._wp_device = wp.device_from_torch(self.device)
        try:
            with wp.ScopedDevice(self._wp_device):
                self._model = mjw.put_model(sim.model)
                self._data = mjw.make_data(
                    sim.model, nworld=self.num_envs, nconmax=self.nconmax, njmax=self.njmax
                )
        except NotImplementedError as error:
            raise ValueError(f"MuJoCo Warp cannot simulate this task ({error}); use backend 'cpu'") from error
        self._post_constraint = any(name in ("cfrc_ext",) for name, _ in self._fields)
        self._views = {name: wp.to_torch(getattr(self._data, name)) for name in _STATE_FIELDS}
        self._nacon, self._nefc = wp.to_torch(self._data.nacon), wp.to_torch(self._data.nefc)

    def _source_views(self) -> dict[str, torch.Tensor]:
        """``[num_envs, field size]`` views of the source fields (as :class:`_Dynamics` reads them)."""
        return {name: self._views[name].reshape(self.num_envs, -1) for name, _ in self._fields}

    def _make_specs(self, task: MaMuJoCoEnv) -> None:
        n, a = self.num_envs, self.n_agents
        low = torch.from_numpy(task._act_low).expand(n, a, self.max_action_dim).clone()
        high = torch.from_numpy(task._act_high).expand(n, a, self.max_action_dim).clone()
        action = Bounded(low=low, high=high, shape=(n, a, self.max_action_dim), device=self.device)
        set_contract_specs(self, self.max_obs_dim, self.state_size, action, flags=("faulted",))

    # ------------------------------------------------------------------ simulation
    def _physics(self) -> None:
        """The frame-skip loop (Gymnasium's ``_step_mujoco_simulation``) on every world."""
        _, mjw = _warp()
        for _ in range(self._substeps):
            mjw.step(self._model, self._data)
        if self._post_constraint:
            mjw.rne_postconstraint(self._model, self._data)

    def _simulate(self) -> None:
        """One step of every world, on torch's current stream; on CUDA from the second step on, replaying the
        loop captured as a CUDA graph (the first step compiles and loads the kernels)."""
        wp, _ = _warp()
        stream = (
            wp.stream_from_torch(torch.cuda.current_stream(self.device))
            if self.device.type == "cuda"
            else None
        )
        with (
            wp.ScopedDevice(self._wp_device),
            wp.ScopedStream(stream) if stream else contextlib.nullcontext(),
        ):
            if self._graph is not None:
                wp.capture_launch(self._graph)
            elif self.device.type == "cuda" and self._graph_wanted and self._simulated:
                with wp.ScopedCapture(device=self._wp_device, stream=stream) as capture:
                    self._physics()
                self._graph = capture.graph
                wp.capture_launch(self._graph)
            else:
                self._physics()
        self._simulated += 1

    def _check_capacity(self) -> None:
        """Stop, naming the option to raise, where a step needed more contacts or constraint rows than
        allocated (MuJoCo Warp would drop them)."""
        contacts, rows, capacity = int(self._nacon[0]), int(self._nefc.max()), self._data.naconmax
        if contacts >= capacity or rows >= self.njmax:
            raise RuntimeError(
                f"MuJoCo Warp ran out of contact buffers ({contacts} contacts of {capacity} over all worlds, "
                f"{rows} constraint rows of {self.njmax} per world): contacts would be dropped. Raise "
                f"model.env.nconmax (now {self.nconmax} per world) or model.env.njmax (now {self.njmax})."
            )

    def _observe(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every world's agents' observations ``[N, A, D]`` and state ``[N, S]``."""
        views = self._source_views()
        src = torch.cat([*views.values(), torch.zeros(self.num_envs, 1, device=self.device)], 1)
        values = ObservationProgram.evaluate(self._program, src)
        obs = values[:, : self._obs_end].reshape(self.num_envs, self.n_agents, self.max_obs_dim)
        return obs, values[:, self._obs_end :]

    def _output(
        self,
        reward: torch.Tensor | None,
        terminated: torch.Tensor,
        truncated: torch.Tensor,
        faulted: torch.Tensor,
    ) -> TensorDictBase:
        obs, state = self._observe()
        data = {
            "state": state,
            "done": (terminated | truncated).unsqueeze(-1),
            "terminated": terminated.unsqueeze(-1),
            "truncated": truncated.unsqueeze(-1),
            "faulted": faulted.unsqueeze(-1),
            "agents": TensorDict(
                {"observation": obs}, batch_size=(self.num_envs, self.n_agents), device=self.device
            ),
        }
        if reward is not None:
            data["reward"] = reward.float().unsqueeze(-1)
        return TensorDict(data, batch_size=self.batch_size, device=self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get(("agents", "action")).detach().to(self.device)
        control = action.reshape(self.num_envs, -1)[:, self._act_flat]
        if self.clip_actions:
            control = torch.minimum(torch.maximum(control, self._act_low), self._act_high)
        self._views["ctrl"].copy_(control)
        ctrl_cost = self._dynamics.control_cost(control.double())
        before = self._before()
        self._simulate()
        self._check_capacity()
        reward, terminated = self._dynamics(before, ctrl_cost)
        self._elapsed += 1
        truncated = self._elapsed >= self.max_episode_steps
        state = torch.cat([self._views["qpos"], self._views["qvel"]], 1)
        faulted = ~torch.isfinite(state).all(1)
        if faulted.any():
            count = int(faulted.sum())
            self.nonfinite_resets += count
            self._reset_worlds(faulted)
            reward = torch.where(faulted, 0.0, reward)
            terminated, truncated = terminated & ~faulted, truncated | faulted
        return self._output(reward, terminated, truncated, faulted)

    def _before(self) -> torch.Tensor:
        """What :class:`_Dynamics` reads before the physics: the x position (float64)."""
        dynamics = self._dynamics
        if dynamics.kind == "reacher":
            return torch.zeros(self.num_envs, dtype=torch.float64, device=self.device)
        if dynamics.before_field == "qpos":
            return self._views["qpos"][:, dynamics.before_key].double()
        body, axis = dynamics.before_key
        return self._views["xpos"][:, body, axis].double()

    # ------------------------------------------------------------------ resets
    def _reset_worlds(self, mask: torch.Tensor) -> None:
        """Start new episodes in the worlds where ``mask``: MuJoCo's reset, then Gymnasium's reset noise
        and a forward pass (the derived arrays of every other world are recomputed from their states)."""
        wp, mjw = _warp()
        rows = mask.nonzero().squeeze(-1)
        qpos, qvel = self._noise.sample(len(rows), self._generator, self.device)
        with wp.ScopedDevice(self._wp_device):
            mjw.reset_data(self._model, self._data, reset=wp.from_torch(mask.contiguous()))
            self._views["qpos"][rows] = qpos.float()
            self._views["qvel"][rows] = qvel.float()
            mjw.forward(self._model, self._data)
        self._elapsed[rows] = 0

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        reset = None if tensordict is None else tensordict.get("_reset", None)
        mask = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        if reset is not None:
            mask = reset.reshape(self.num_envs).to(self.device)
        if mask.any():
            self._reset_worlds(mask)
        false = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return self._output(None, false, false, false)

    def _set_seed(self, seed: int | None) -> None:
        """Seed the reset noise and :meth:`rand_action` (``None``: fresh entropy)."""
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(int(seed))

    def rand_action(self, tensordict: TensorDictBase | None = None) -> TensorDictBase:
        """Uniform random actions in the bounds, from the env's own generator."""
        spec = self.full_action_spec["agents", "action"]
        low, high = spec.space.low.cpu(), spec.space.high.cpu()
        action = (low + torch.rand(low.shape, generator=self._generator) * (high - low)).to(self.device)
        tensordict = (
            TensorDict({}, batch_size=self.batch_size, device=self.device)
            if tensordict is None
            else tensordict
        )
        tensordict["agents", "action"] = action
        return tensordict

    # ------------------------------------------------------------------ checkpoints
    _STATE_FORMAT = 1

    def _state_config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("scenario", "agent_conf", "agent_obsk", "num_envs")}

    def get_extra_state(self) -> dict[str, Any]:
        """Every world's simulation state, step counts, the generator and the non-finite resets."""
        return {
            "format": self._STATE_FORMAT,
            "config": self._state_config(),
            "data": {name: view.detach().cpu().clone() for name, view in self._views.items()},
            "elapsed": self._elapsed.cpu().clone(),
            "generator": self._generator.get_state(),
            "nonfinite_resets": self.nonfinite_resets,
        }

    def set_extra_state(self, state: Any) -> None:
        check_saved_state(
            type(self).__name__,
            state,
            (self._STATE_FORMAT,),
            self._state_config(),
            "Build the env with the same scenario, agent_conf, agent_obsk and num_envs.",
        )
        for name, value in state["data"].items():
            self._views[name].copy_(value.to(self.device))
        self._elapsed.copy_(state["elapsed"].to(self.device))
        self._generator.set_state(state["generator"])
        self.nonfinite_resets = int(state["nonfinite_resets"])

    # ------------------------------------------------------------------ rendering
    def render(self, index: int = 0) -> np.ndarray:
        """An RGB frame of world ``index``, copied into C MuJoCo and rendered off-screen (``render_mode``
        ``"rgb_array"`` at construction)."""
        if self.render_mode is None:
            raise RuntimeError("Build the env with render_mode='rgb_array' to render it.")
        sim = self._task._sims[0]
        qpos, qvel = (self._views[k][index].detach().double().cpu().numpy() for k in ("qpos", "qvel"))
        sim.set_state(qpos, qvel)
        return self._task.render(0)

    @property
    def render_fps(self) -> float:
        return self._task.render_fps

    def close(self, *, raise_if_closed: bool = True) -> None:
        self._task.close(raise_if_closed=False)
        super().close(raise_if_closed=raise_if_closed)
