"""Batched TorchRL environment over JaxMARL's SMAX: SMAC-style maps without StarCraft II.

:class:`SMAXEnv` runs ``num_envs`` copies of JaxMARL's ``HeuristicEnemySMAX`` (the SMAX simulator, allies
controlled by the learner, enemies by SMAX's built-in heuristic) as one JAX program: every step or reset
is a single call of an ahead-of-time compiled, ``jax.vmap``-ed function over all sub-envs (no Python
loop over sub-envs or agents), and its outputs become torch tensors through DLPack without a copy. The
data it produces (batch size ``[num_envs]``; ``A`` = ``n_agents``, the allies):

* ``("agents", "observation")`` float32 ``[num_envs, A, obs]``: SMAX's per-ally observation
  (``observation_type="unit_list"`` by default: the features of the other units within sight range,
  then the ally's own), followed with ``obs_last_action`` (the default, as SMAC's ``obs_last_action`` in
  the paper's code) by the one-hot of the ally's previous action (zeros after a reset).
* ``("agents", "alive")`` bool ``[num_envs, A]``: whether each ally is alive (SMAX's ``unit_alive``);
  trainers mask dead agents out of their policy loss.
* ``("agents", "action_mask")`` bool ``[num_envs, A, n_actions]``: the actions available at the *next*
  step (SMAX's ``get_avail_actions``), True = allowed. Actions are ``0-3`` move, ``4`` stop, ``5 + j``
  attack enemy ``j`` (allowed when ``j`` is alive and within attack range). A dead ally may only stop
  (action ``4``, SMAX's no-op; SMAC's no-op is ``0``).
* ``("agents", "action")`` int64 ``[num_envs, A]`` (input, ``Categorical(n_actions)``). An index outside
  ``[0, n_actions)`` raises a ``ValueError``; unavailable actions are not checked: SMAX ignores them (an
  attack on a dead or out-of-range unit does nothing, like stop).
* ``"state"`` float32 ``[num_envs, state]``: SMAX's ``get_world_state`` (features of every unit, allies
  and enemies, then their teams and types; positions in map units, not normalised).
* ``"reward"`` float32 ``[num_envs, 1]``: the team reward. SMAX gives every ally the same reward, that of
  team 0 (the allies); this is ``ally_0``'s: the enemies' health lost in the step, as a fraction of their
  full health summed over enemies and divided by their number, plus ``won_battle_bonus`` (1.0) on the step
  that wins the battle. Allies keep the team reward when dead. (SMAC scales its reward differently.)
* ``"done"``, ``"terminated"``, ``"truncated"`` bool ``[num_envs, 1]``: terminated when a team is wiped
  out, truncated after ``max_episode_steps`` steps otherwise (SMAX's ``max_steps``, but counted here: SMAX
  itself ends its episodes one step later, as it tests the limit before counting the step).
* ``"won"`` bool ``[num_envs, 1]`` (an observation): True only on the last step of a won battle (every
  enemy dead and at least one ally alive, exactly when SMAX pays the win bonus); False on resets.

Finished sub-envs are reset through TorchRL's ``"_reset"`` key: the compiled reset draws a fresh initial
state for every sub-env and keeps it only where ``"_reset"`` is True (a ``jnp.where`` select), so the
others keep their state and random key.

Randomness: each sub-env has its own JAX PRNG key (raw key data of JAX's default implementation), split
at every step and reset; SMAX's heuristic enemies and weapon cooldowns use it. The keys are derived from
the seed with ``numpy.random.SeedSequence(seed)`` (fresh OS entropy when unseeded), so the same seed gives
the same rollouts for the same actions. :meth:`SMAXEnv.set_seed` replaces the keys (the states are kept,
the next reset draws from the new keys); ``set_seed(None)`` changes nothing.

Maps: :data:`SMAX_MAPS` lists JaxMARL's SMAX scenarios. Of the paper's six SMAC maps (Table 2)
(:data:`PAPER_MAPS`) SMAX has 3s5z, 5m_vs_6m and 6h_vs_8z, and lacks bane_vs_bane, 2c_vs_64zg and
corridor: those, and the other SMAC maps SMAX lacks (:data:`SMAC_ONLY_MAPS`), raise a ``ValueError``
saying they need StarCraft II through the ``smacv2`` env. SMAX's maps are re-implementations of SMAC's
(its own unit stats and heuristic enemies, all episodes 100 steps long by default); results are not
comparable with SMAC's.

Compilation: the reset and step programs are compiled once per map, SMAX options, ``num_envs`` and JAX
device (the step limit is an input, not compiled in), and cached for the process (an evaluation env with
the same settings reuses them);
:attr:`SMAXEnv.compile_time_s` is the time spent compiling for this env (0 on a cache hit).

JAX device: with ``device="cpu"`` (the default) JAX is set to the CPU platform before its first use (no
probing of GPUs, no warnings), unless ``JAX_PLATFORMS`` is set or JAX is already initialised; the
simulation then runs on JAX's CPU device in any case. With a CUDA ``device`` the simulation runs on
JAX's GPU when this JAX has one (outputs reach torch without a copy), else on its CPU, the outputs being
copied to the device.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Categorical
from torchrl.envs import EnvBase

from fp3o_lightning.envs.specs import set_contract_specs
from fp3o_lightning.envs.state import check_saved_state

__all__ = ["PAPER_MAPS", "SMAC_ONLY_MAPS", "SMAX_MAPS", "SMAXEnv", "clear_compile_cache"]

#: JaxMARL 0.2's SMAX scenarios (``jaxmarl.environments.smax.smax_env.MAP_NAME_TO_SCENARIO``): SMAC map
#: names with fixed units, and the SMACv2-style ``smacv2_<n>_units`` maps (``n`` vs ``n`` units of random
#: types at random positions, drawn at every reset). Scenarios added with JaxMARL's ``register_scenario``
#: are accepted too.
SMAX_MAPS: tuple[str, ...] = (
    "3m",
    "2s3z",
    "25m",
    "3s5z",
    "8m",
    "5m_vs_6m",
    "10m_vs_11m",
    "27m_vs_30m",
    "3s5z_vs_3s6z",
    "3s_vs_5z",
    "6h_vs_8z",
    "smacv2_5_units",
    "smacv2_10_units",
    "smacv2_20_units",
)
#: The paper's SMAC maps (Table 2); SMAX has 3s5z, 5m_vs_6m and 6h_vs_8z.
PAPER_MAPS: tuple[str, ...] = ("bane_vs_bane", "2c_vs_64zg", "3s5z", "5m_vs_6m", "corridor", "6h_vs_8z")
#: SMAC maps that SMAX does not have: they need StarCraft II (the ``smacv2`` env).
SMAC_ONLY_MAPS: tuple[str, ...] = (
    "8m_vs_9m",
    "MMM",
    "MMM2",
    "3s_vs_3z",
    "3s_vs_4z",
    "1c3s5z",
    "2m_vs_1z",
    "corridor",
    "2s_vs_1sc",
    "so_many_baneling",
    "bane_vs_bane",
    "2c_vs_64zg",
)
#: SMACv2's scenario and map names (``protoss_5_vs_5``, ``10gen_zerg``, ...): StarCraft II as well.
_SMACV2_NAME = re.compile(r"^((protoss|terran|zerg)_\d+_vs_\d+|10gen_(protoss|terran|zerg))$")
#: SMAX options set by the constructor's own arguments (or unsupported).
_RESERVED_KWARGS = {
    "scenario": "map_name",
    "max_steps": "max_episode_steps",
    "num_allies": "map_name",
    "num_enemies": "map_name",
    "smacv2_position_generation": "map_name (the smacv2_<n>_units maps)",
    "smacv2_unit_type_generation": "map_name (the smacv2_<n>_units maps)",
}


# ---------------------------------------------------------------------------------------------- JAX set-up
def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume initialised (change nothing)
        return True


def _jax_device(device: torch.device) -> Any:
    """The JAX device to simulate on for torch ``device`` (sets JAX's platform to CPU if still possible)."""
    import jax

    if device.type == "cuda":
        try:
            gpus = jax.devices("cuda")
        except RuntimeError:
            gpus = []
        if gpus:
            index = device.index if device.index is not None else torch.cuda.current_device()
            return gpus[index]
        warnings.warn(
            "SMAXEnv: this JAX has no CUDA backend; SMAX runs on the CPU and its outputs are copied to "
            f"{device}. Install a CUDA build of JAX to simulate on the GPU.",
            RuntimeWarning,
            stacklevel=3,
        )
    elif not os.environ.get("JAX_PLATFORMS") and not _backends_initialized():
        jax.config.update("jax_platforms", "cpu")
    return jax.devices("cpu")[0]


def _import_smax() -> Any:
    """Import ``jaxmarl`` quietly and return its ``smax`` environments module.

    JaxMARL's import prints two lines about optional environments to stdout, and its MABrax module
    resets ``sys.stdout``/``sys.stderr`` to ``sys.__stdout__``/``sys.__stderr__`` (undoing any capture,
    e.g. pytest's). Both are undone here.
    """
    if "jaxmarl.environments.smax" in sys.modules:
        return sys.modules["jaxmarl.environments.smax"]
    saved = sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__
    with open(os.devnull, "w") as devnull:
        try:
            sys.stdout = sys.__stdout__ = devnull
            import jaxmarl  # noqa: F401
            import jaxmarl.environments.smax as smax
        finally:
            sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__ = saved
    return smax


def _check_map(map_name: str, known: list[str]) -> None:
    """Raise a ``ValueError`` for a map SMAX does not have, listing the valid names."""
    if map_name in known:
        return
    valid = ", ".join(known)
    if map_name in SMAC_ONLY_MAPS or _SMACV2_NAME.match(str(map_name)):
        raise ValueError(
            f"SMAC map {map_name!r} is not in SMAX (JaxMARL's re-implementation of SMAC): it needs "
            f"StarCraft II, through the `smacv2` env (env name 'smacv2', `pip install "
            f"'fp3o-lightning[smacv2]'` plus the StarCraft II binary and maps). SMAX maps: {valid}."
        )
    raise ValueError(f"Unknown SMAX map {map_name!r}; valid map names: {valid}.")


def _freeze(value: Any) -> Any:
    """A hashable stand-in for an SMAX option value (for the compile cache key)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy / JAX / torch arrays
        array = np.asarray(value)
        return ("array", str(array.dtype), array.shape, array.tobytes())
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


# ---------------------------------------------------------------------------------------------- programs
@dataclass
class _Program:
    """The compiled reset/step of one configuration, shared by the envs built with it."""

    env: Any  # jaxmarl HeuristicEnemySMAX
    reset: Any  # (keys, states, mask) -> (keys, states, outputs)
    step: Any  # (keys, states, actions, step limit) -> (keys, states, outputs)
    state_template: Any  # zero states pytree (the reset's input before the first reset)
    compile_time_s: float


_PROGRAMS: dict[tuple, _Program] = {}


def _build_program(map_name: str, num_envs: int, smax_kwargs: dict, jdev: Any) -> _Program:
    import jax
    import jax.numpy as jnp
    from jax import lax

    smax = _import_smax()
    with jax.default_device(jdev):
        env = smax.HeuristicEnemySMAX(scenario=smax.map_name_to_scenario(map_name), **smax_kwargs)
    agents = list(env.agents)
    n_allies = env.num_allies

    def strong(tree: Any) -> Any:
        # Weakly typed leaves (e.g. ``jnp.array(0)``) would change the programs' signatures once restored.
        return jax.tree.map(lambda x: lax.convert_element_type(x, jnp.asarray(x).dtype), tree)

    def observe(state: Any) -> tuple:
        obs = env.get_obs(state)
        avail = env.get_avail_actions(state)
        return (
            jnp.stack([obs[a] for a in agents]).astype(jnp.float32),
            jnp.stack([avail[a] for a in agents]).astype(jnp.bool_),
            env.get_world_state(state).astype(jnp.float32),
            state.state.unit_alive[:n_allies].astype(jnp.bool_),
        )

    def flags(state: Any, limit: Any) -> tuple:
        alive = state.state.unit_alive
        allies_dead = ~jnp.any(alive[:n_allies])
        enemies_dead = ~jnp.any(alive[n_allies:])
        terminated = allies_dead | enemies_dead
        # The step limit is an input (one program for any limit) and applied here: SMAX's own ``done`` tests
        # its ``max_steps`` before counting the step (episodes of max_steps + 1 steps), and is not used.
        truncated = (state.state.step >= limit) & ~terminated
        won = enemies_dead & ~allies_dead
        return terminated, truncated, won

    def reset_one(key, state, reset):
        new_key, reset_key = jax.random.split(key)
        _, fresh = env.reset(reset_key)
        state = jax.tree.map(lambda a, b: jnp.where(reset, a, b), strong(fresh), state)
        key = jnp.where(reset, new_key, key)
        obs, mask, world, alive = observe(state)
        false = jnp.zeros((1,), jnp.bool_)
        return key, state, (obs, mask, world, alive, jnp.zeros((1,), jnp.float32), false, false, false, false)

    def step_one(key, state, action, limit):
        key, step_key = jax.random.split(key)
        actions = {a: action[i] for i, a in enumerate(agents)}
        _, state, rewards, _, _ = env.step_env(step_key, state, actions)
        state = strong(state)
        obs, mask, world, alive = observe(state)
        terminated, truncated, won = flags(state, limit)
        reward = jnp.asarray(rewards[agents[0]], jnp.float32).reshape(1)
        done_flags = (terminated | truncated, terminated, truncated, won)
        return key, state, (obs, mask, world, alive, reward, *(f.reshape(1) for f in done_flags))

    key_words = jax.random.key_data(jax.random.key(0)).shape[-1]
    keys = jax.device_put(np.zeros((num_envs, key_words), np.uint32), jdev)
    one_state = jax.eval_shape(lambda k: strong(env.reset(k)[1]), jax.random.PRNGKey(0))
    template = jax.tree.map(
        lambda s: jax.device_put(np.zeros((num_envs, *s.shape), s.dtype), jdev), one_state
    )
    mask = jax.device_put(np.ones(num_envs, np.bool_), jdev)
    actions = jax.device_put(np.zeros((num_envs, n_allies), np.int32), jdev)
    start = time.perf_counter()
    reset = jax.jit(jax.vmap(reset_one)).lower(keys, template, mask).compile()
    limit = jax.device_put(np.int32(1), jdev)
    step = (
        jax.jit(jax.vmap(step_one, in_axes=(0, 0, 0, None))).lower(keys, template, actions, limit).compile()
    )
    return _Program(env, reset, step, template, time.perf_counter() - start)


def _program(map_name: str, num_envs: int, smax_kwargs: dict, jdev: Any) -> tuple[_Program, bool]:
    """The cached program for this configuration and whether it was compiled now."""
    key = (map_name, num_envs, _freeze(smax_kwargs), str(jdev))
    if key in _PROGRAMS:
        return _PROGRAMS[key], False
    program = _build_program(map_name, num_envs, smax_kwargs, jdev)
    _PROGRAMS[key] = program
    return program, True


# ---------------------------------------------------------------------------------------------- the env
class SMAXEnv(EnvBase):
    """``num_envs`` SMAX battles (JaxMARL's ``HeuristicEnemySMAX``) as one batched TorchRL environment.

    Args:
        map_name: an SMAX map (:data:`SMAX_MAPS`), e.g. ``"3m"``, ``"3s5z"`` or ``"smacv2_5_units"``.
        num_envs: number of independent sub-environments (the batch size).
        max_episode_steps: episodes are truncated after this many steps; ``None``: SMAX's default
            ``max_steps`` (100, for every map; SMAC's limits are per map, e.g. 150 for 3s5z).
        seed: seed of the sub-envs' JAX keys (see the module docstring); ``None``: fresh OS entropy.
        device: device of the produced tensors (see the module docstring for where JAX simulates).
        obs_last_action: append each agent's previous action (one-hot) to its observation, as SMAC's
            ``obs_last_action`` (the paper's code).
        **smax_kwargs: further options of ``HeuristicEnemySMAX`` and ``SMAX``, e.g. ``attack_mode``
            (``"closest"`` or ``"random"``), ``enemy_shoots``, ``observation_type`` (``"unit_list"`` or
            ``"conic"``), ``won_battle_bonus``, ``walls_cause_death``, ``see_enemy_actions``. Only discrete
            actions are supported; the map sets the units, ``max_episode_steps`` the step limit.

    Attributes:
        map_name, num_envs: the constructor arguments.
        max_episode_steps: the episode step limit in force (SMAX's default when built with ``None``).
        n_agents: number of allies (agents); n_enemies: number of enemies.
        n_actions: actions per agent (5 + ``n_enemies``); obs_size, state_size: the feature sizes.
        compile_time_s: seconds spent compiling the reset and step programs for this env (0 when reused).

    Raises:
        ValueError: for a map SMAX does not have (listing the valid names; the SMAC maps it lacks say that
            they need StarCraft II via the ``smacv2`` env), or invalid arguments.
    """

    #: the paper's code gives SMAC critics MAPPO's agent-specific global state (``critic_input="auto"``)
    agent_specific_state = True
    batch_locked = True

    def __init__(
        self,
        map_name: str = "3m",
        num_envs: int = 1,
        max_episode_steps: int | None = None,
        seed: int | None = None,
        device: torch.device | str = "cpu",
        obs_last_action: bool = True,
        **smax_kwargs: Any,
    ) -> None:
        if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}.")
        steps = max_episode_steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ValueError(f"max_episode_steps must be None or an integer >= 1, got {max_episode_steps!r}.")
        for name, instead in _RESERVED_KWARGS.items():
            if name in smax_kwargs:
                raise ValueError(f"SMAXEnv sets SMAX's {name!r} itself: use {instead} instead.")
        if smax_kwargs.get("action_type", "discrete") != "discrete":
            raise ValueError(f"SMAXEnv supports discrete actions only, got {smax_kwargs['action_type']!r}.")
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        jdev = _jax_device(self.device)
        smax = _import_smax()
        _check_map(map_name, list(smax.smax_env.MAP_NAME_TO_SCENARIO))

        program, compiled = _program(map_name, num_envs, smax_kwargs, jdev)
        env = program.env
        self._program = program
        self._jax_device_ = jdev
        self.map_name = map_name
        self.num_envs = num_envs
        self.smax_kwargs = dict(smax_kwargs)
        self.max_episode_steps = int(env.max_steps if max_episode_steps is None else max_episode_steps)
        self._limit = self._put(np.int32(min(self.max_episode_steps, np.iinfo(np.int32).max)))
        self.n_agents = int(env.num_allies)
        self.n_enemies = int(env.num_enemies)
        self.n_actions = int(env.num_ally_actions)
        self.obs_last_action = bool(obs_last_action)
        self.obs_size = int(env.obs_size) + (self.n_actions if self.obs_last_action else 0)
        self.state_size = int(env.state_size)
        self.compile_time_s = program.compile_time_s if compiled else 0.0
        self._states = program.state_template
        self._seed: int | None = None
        self._agents_batch = torch.Size([num_envs, self.n_agents])
        self._last_action = torch.full(self._agents_batch, -1, dtype=torch.int64)  # -1: none since a reset
        self._to_device = jdev.platform == "cpu" and self.device.type != "cpu"
        self._make_specs()
        self._seed_keys(seed)

    def _key_shape(self) -> tuple[int, ...]:
        import jax

        return (self.num_envs, jax.random.key_data(jax.random.key(0)).shape[-1])

    def _make_specs(self) -> None:
        n, a, k = self.num_envs, self.n_agents, self.n_actions
        action = Categorical(k, shape=(n, a), dtype=torch.int64, device=self.device)
        set_contract_specs(
            self, self.obs_size, self.state_size, action, n_actions=k, flags=("won",), agent_flags=("alive",)
        )

    # ------------------------------------------------------------------ core
    def _put(self, array: np.ndarray) -> Any:
        import jax

        return jax.device_put(array, self._jax_device_)

    def _output(self, outputs: tuple, reward: bool) -> TensorDictBase:
        """The program's outputs as a TensorDict, each array handed to torch through DLPack (no copy)."""
        import jax

        outputs = jax.block_until_ready(outputs)
        obs, mask, state, alive, rew, done, terminated, truncated, won = (
            torch.from_dlpack(x) for x in outputs
        )
        data = {"state": state, "done": done, "terminated": terminated, "truncated": truncated, "won": won}
        if reward:
            data["reward"] = rew
        if self.obs_last_action:  # one-hot of the previous action; index -1 (none) gives zeros
            last = torch.nn.functional.one_hot(self._last_action + 1, self.n_actions + 1)[..., 1:]
            obs = torch.cat([obs, last.to(obs.device, obs.dtype)], -1)
        agents = {"observation": obs, "action_mask": mask, "alive": alive}
        if self._to_device:
            data = {key: value.to(self.device, non_blocking=True) for key, value in data.items()}
            agents = {key: value.to(self.device, non_blocking=True) for key, value in agents.items()}
        data["agents"] = TensorDict._new_unsafe(agents, batch_size=self._agents_batch, device=self.device)
        return TensorDict._new_unsafe(data, batch_size=self.batch_size, device=self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        # A private int32 copy: JAX may read it asynchronously, and it must not alias the caller's tensor.
        action = tensordict.get(("agents", "action")).detach().to("cpu", torch.int32, copy=True)
        low, high = torch.aminmax(action)
        if low < 0 or high >= self.n_actions:  # JAX would clamp the index: an attack on the last unit
            raise ValueError(
                f"{type(self).__name__} {self.map_name}: actions must be in [0, {self.n_actions}), got "
                f"values in [{int(low)}, {int(high)}]."
            )
        self._keys, self._states, outputs = self._program.step(
            self._keys, self._states, self._put(action.numpy()), self._limit
        )
        self._last_action = action.long()
        return self._output(outputs, reward=True)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        reset = None if tensordict is None else tensordict.get("_reset", None)
        if reset is None:
            mask = np.ones(self.num_envs, dtype=np.bool_)
        else:
            mask = reset.detach().reshape(self.num_envs, -1).any(-1).cpu().numpy().astype(np.bool_)
        self._keys, self._states, outputs = self._program.reset(self._keys, self._states, self._put(mask))
        self._last_action[torch.from_numpy(mask)] = -1
        return self._output(outputs, reward=False)

    def _set_seed(self, seed: int | None) -> None:
        """Derive the sub-envs' JAX keys from ``seed``; the states are kept. ``None`` changes nothing."""
        if seed is not None:
            self._seed_keys(seed)

    def _seed_keys(self, seed: int | None) -> None:
        """Derive the keys from ``SeedSequence(seed)`` (fresh OS entropy for ``None``)."""
        sequence = np.random.SeedSequence(None if seed is None else int(seed) % 2**128)
        self._seed = int(sequence.entropy)
        shape = self._key_shape()
        words = sequence.generate_state(int(np.prod(shape)), dtype=np.uint32).reshape(shape)
        self._keys = self._put(words)

    @property
    def seed(self) -> int:
        """The seed the current keys were derived from (the OS entropy drawn when unseeded)."""
        return self._seed

    # ------------------------------------------------------------------ checkpointing
    _STATE_FORMAT = 1

    def _state_config(self) -> dict[str, Any]:
        """The settings a saved state must match to be loaded."""
        return {
            "map_name": self.map_name,
            "num_envs": self.num_envs,
            "smax_kwargs": repr(sorted(self.smax_kwargs.items())),
        }

    def get_extra_state(self) -> dict[str, Any]:
        """The full simulator state, stored by :meth:`state_dict` under the ``"_extra_state"`` key.

        ``"keys"``: the sub-envs' JAX PRNG key data (int64 ``[num_envs, words]``); ``"state"``: every leaf
        of the batched JaxMARL state (units, health, cooldowns, step counters, the heuristic enemies'
        memory, ...) as a tensor, by its pytree path; ``"last_action"`` (int64 ``[num_envs, A]``, -1 after a
        reset); ``"seed"`` (an int), ``"format"`` and ``"config"``.
        Only tensors, ints and strings, so ``torch.load(..., weights_only=True)`` reads it. After
        ``other.load_state_dict(env.state_dict())`` (same map, options and ``num_envs``), ``other``
        continues bit for bit like ``env`` given the same actions and TensorDicts (the current observation
        TensorDict itself is the caller's to keep).
        """
        import jax

        leaves = jax.tree_util.tree_flatten_with_path(self._states)[0]
        return {
            "format": self._STATE_FORMAT,
            "config": {**self._state_config(), "max_episode_steps": self.max_episode_steps},
            "seed": self._seed,
            "keys": torch.from_numpy(np.asarray(self._keys).astype(np.int64)),
            "last_action": self._last_action.clone(),
            "state": {jax.tree_util.keystr(path): torch.from_numpy(np.array(leaf)) for path, leaf in leaves},
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore a state made by :meth:`get_extra_state` (called by :meth:`load_state_dict`).

        Raises:
            ValueError: if ``state`` is not such a state or comes from an env with another map, SMAX
                options or ``num_envs``; nothing is changed then. ``max_episode_steps`` may differ: the
                restored step counters then count towards this env's limit.
        """
        import jax

        name = type(self).__name__
        check_saved_state(
            name,
            state,
            (self._STATE_FORMAT,),
            self._state_config(),
            "Build the env with the same map_name, SMAX options and num_envs as the saved one.",
        )
        keys = state["keys"].numpy()
        if keys.shape != self._key_shape():
            raise ValueError(f"Cannot load the {name} state: its keys have shape {keys.shape}.")
        paths, treedef = jax.tree_util.tree_flatten_with_path(self._states)
        saved = state["state"]
        names = [jax.tree_util.keystr(path) for path, _ in paths]
        if sorted(saved) != sorted(names):
            raise ValueError(
                f"Cannot load the {name} state: its simulator state has fields {sorted(saved)}, this env's "
                f"{sorted(names)} (another JaxMARL version?)."
            )
        leaves = []
        for key, (_, leaf) in zip(names, paths, strict=True):
            value = saved[key].numpy()
            if value.shape != leaf.shape:
                raise ValueError(
                    f"Cannot load the {name} state: {key} has shape {value.shape}, not {tuple(leaf.shape)}."
                )
            leaves.append(self._put(value.astype(leaf.dtype)))
        self._states = jax.tree_util.tree_unflatten(treedef, leaves)
        self._keys = self._put(keys.astype(np.uint32))
        self._seed = state["seed"]
        # States saved before obs_last_action carry none: no previous action, as after a reset.
        self._last_action = state.get("last_action", torch.full(self._agents_batch, -1)).clone()


def clear_compile_cache() -> None:
    """Drop the cached compiled programs (the next env built compiles again)."""
    _PROGRAMS.clear()
