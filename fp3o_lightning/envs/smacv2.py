"""Batched TorchRL environment over SMAC and SMACv2 (StarCraft II), through TorchRL's ``SMACv2Env``.

:class:`SMACv2TaskEnv` owns ``num_envs`` single TorchRL :class:`~torchrl.envs.libs.smacv2.SMACv2Env` instances
(each one StarCraft II process) and steps them inside one :meth:`~SMACv2TaskEnv._step`, concurrently in
threads by default (a step mostly waits for StarCraft II, which runs in its own process). Map names:

* the SMAC maps of smacv2's registry (:data:`SMAC_MAPS`: ``3s5z``, ``corridor``, ``6h_vs_8z``, ...);
* the SMACv2 scenarios ``<race>_<n_units>_vs_<n_enemies>`` (``protoss_5_vs_5``, ``terran_10_vs_10``,
  ``zerg_10_vs_11``, ...): the map ``10gen_<race>`` with the capability config of smacv2's
  ``examples/configs/sc2_gen_<race>.yaml`` (weighted random teams, "surrounded and reflect" start positions)
  and its env settings (:data:`SMACV2_ENV_DEFAULTS`), which ``smacv2_kwargs`` may override;
* ``10gen_<race>`` itself with a ``capability_config`` of your own.

The data it produces (batch size ``[num_envs]``):

* ``("agents", "observation")`` float32 ``[num_envs, n_agents, obs_size]``: smacv2's ``get_obs()``, built
  with ``obs_last_action=True`` unless ``smacv2_kwargs`` say otherwise (each agent's observation ends with
  its previous action, as in the paper's code).
* ``("agents", "alive")`` bool ``[num_envs, n_agents]``: False for a dead agent (one whose only available
  action is the no-op); trainers mask dead agents out of their policy loss.
* ``("agents", "action_mask")`` bool ``[num_envs, n_agents, n_actions]``: the available actions (a dead agent
  has only the no-op, action 0). The action spec's mask follows it, so ``rand_action`` samples valid actions.
* ``("agents", "action")`` int64 ``[num_envs, n_agents]`` (input, ``Categorical(n_actions)``): action indices;
  an unavailable one raises a ``ValueError`` before anything is stepped.
* ``"state"`` float32 ``[num_envs, state_size]``: smacv2's ``get_state()``.
* ``"reward"`` float32 ``[num_envs, 1]``: the team reward (smacv2's, scaled so that a won episode sums to
  about 20).
* ``"done"``, ``"terminated"``, ``"truncated"`` bool ``[num_envs, 1]``: a battle won, lost or drawn
  terminates; reaching the map's episode limit (:attr:`max_episode_steps`) truncates (smacv2 is built with
  ``continuing_episode=True`` so that it says which).
* ``"won"`` bool ``[num_envs, 1]``: True only on the final step of a won episode (smacv2's ``battle_won``).
* ``"faulted"`` bool ``[num_envs, 1]``: True where the episode was cut short by a fault (see below).

StarCraft II starts lazily: constructing the env (or a probe of its specs) starts no game; a sub-env's
StarCraft II process starts at its first reset. Seeds: with ``seed`` (or :meth:`set_seed`), sub-env ``i`` is
built with the 32-bit seed ``SeedSequence(seed, spawn_key=(i,))``, which seeds StarCraft II's game and, for
SMACv2 scenarios, the random generators of smacv2's scenario distributions (unit types and start positions;
smacv2 leaves those unseeded, and its team generation also shuffles with Python's global ``random``). As
StarCraft II takes its seed when it starts, :meth:`set_seed` rebuilds the sub-envs: free before their first
reset, a restart of StarCraft II after it. ``set_seed(None)`` changes nothing. StarCraft II is not fully
deterministic, so equal seeds give similar, not identical, runs.

Faults: a sub-env whose ``step`` or ``reset`` raises an ``Exception`` (a StarCraft II crash, a lost
connection), or that smacv2 restarted by itself after a protocol error, is rebuilt from scratch (a fresh
``SMACv2Env``, closing the old one) and reset, and the run goes on, as in :class:`MaMuJoCoEnv`.
``max_faults`` (default 10) caps the rebuilds over the env's life, :attr:`SMACv2TaskEnv.faults` counts
them, and each one emits an :class:`~fp3o_lightning.envs.faults.EnvFaultWarning`. A sub-env that
faulted while stepping returns its rebuilt instance's reset observation, mask and state, reward 0,
``truncated=True``, ``terminated=False``, ``done=True``, ``won=False`` and ``faulted=True``: trainers
should drop that episode from their statistics. That reset starts the sub-env's next episode (the
auto-reset that follows ``done`` keeps it). A reset that raises is retried on a rebuilt instance
(``faulted=True`` in the reset output). The rebuilt instance ``i`` after the env's ``k``-th fault is
seeded with ``SeedSequence(seed, spawn_key=(i, k))`` (fresh OS entropy for an unseeded env).

Checkpointing: :meth:`~SMACv2TaskEnv.state_dict` keeps the fault count and the seed, not StarCraft II's
game, which cannot be saved. After :meth:`~SMACv2TaskEnv.load_state_dict` the next step resets every sub-env
instead of stepping it and reports the interrupted episodes as cut short (``truncated=True``,
``faulted=True``, reward 0), not counted as faults; so does a step of a sub-env never reset since it was
built (or rebuilt by :meth:`set_seed`).

Requirements: ``pip install 'fp3o-lightning[smacv2]'``, the StarCraft II binary (4.10 on Linux) and the SMAC
maps; the constructor checks them before starting anything and says how to install what is missing.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import os
import platform
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Categorical
from torchrl.envs import EnvBase
from torchrl.envs.libs.smacv2 import SMACv2Env

from fp3o_lightning.envs.faults import rebuild_after_fault
from fp3o_lightning.envs.specs import set_contract_specs

__all__ = [
    "SMAC_MAPS",
    "SMACV2_ENV_DEFAULTS",
    "SMACV2_RACES",
    "SMACv2TaskEnv",
    "check_sc2_installed",
    "check_smacv2_installed",
    "parse_map_name",
    "sc2_path",
    "smacv2_capability_config",
]

#: SMAC maps in smacv2's registry (``smacv2.env.starcraft2.maps.smac_maps``), with their episode limits.
SMAC_MAPS: dict[str, int] = {
    "3m": 60,
    "8m": 120,
    "25m": 150,
    "5m_vs_6m": 70,
    "8m_vs_9m": 120,
    "10m_vs_11m": 150,
    "27m_vs_30m": 180,
    "MMM": 150,
    "MMM2": 180,
    "2s3z": 120,
    "3s5z": 150,
    "3s5z_vs_3s6z": 170,
    "3s_vs_3z": 150,
    "3s_vs_4z": 200,
    "3s_vs_5z": 250,
    "1c3s5z": 180,
    "2m_vs_1z": 150,
    "corridor": 400,
    "6h_vs_8z": 150,
    "2s_vs_1sc": 300,
    "so_many_baneling": 100,
    "bane_vs_bane": 200,
    "2c_vs_64zg": 400,
}
#: The SMACv2 team generation of each race (smacv2's ``examples/configs/sc2_gen_<race>.yaml``): unit types,
#: their probabilities, and the types a team may not consist of only.
SMACV2_RACES: dict[str, dict[str, list[Any]]] = {
    "protoss": {"unit_types": ["stalker", "zealot", "colossus"], "weights": [0.45, 0.45, 0.1]},
    "terran": {
        "unit_types": ["marine", "marauder", "medivac"],
        "weights": [0.45, 0.45, 0.1],
        "exception_unit_types": ["medivac"],
    },
    "zerg": {
        "unit_types": ["zergling", "baneling", "hydralisk"],
        "weights": [0.45, 0.1, 0.45],
        "exception_unit_types": ["baneling"],
    },
}
#: The StarCraft2Env settings of smacv2's SMACv2 configs that differ from StarCraft2Env's defaults (used for
#: ``<race>_<n>_vs_<m>`` scenarios; ``smacv2_kwargs`` override them).
SMACV2_ENV_DEFAULTS: dict[str, Any] = {
    "conic_fov": False,
    "obs_own_pos": True,
    "use_unit_ranges": True,
    "min_attack_range": 2,
}
#: The map file all SMACv2 scenarios play on (in ``$SC2PATH/Maps/SMAC_Maps``).
SMACV2_MAP_FILE = "32x32_flat"
#: StarCraft2Env arguments this env sets itself.
RESERVED_KWARGS = ("map_name", "seed", "continuing_episode")

_SCENARIO = re.compile(r"^(protoss|terran|zerg)_([1-9][0-9]*)_vs_([1-9][0-9]*)$")
_GEN_MAP = re.compile(r"^10gen_(protoss|terran|zerg)$")
_ACTION, _MASK, _OBS = ("agents", "action"), ("agents", "action_mask"), ("agents", "observation")

SC2_VERSION = "4.10"
SC2_URL = "https://blzdistsc2-a.akamaihd.net/Linux/SC2.4.10.zip"
MAPS_URL = "https://github.com/oxwhirl/smacv2/releases/tag/maps"


# ------------------------------------------------------------------ map names
def smacv2_capability_config(race: str, n_units: int, n_enemies: int) -> dict[str, Any]:
    """smacv2's capability config for the SMACv2 scenario ``<race>_<n_units>_vs_<n_enemies>``."""
    team = {"dist_type": "weighted_teams", **copy.deepcopy(SMACV2_RACES[race]), "observe": True}
    return {
        "n_units": n_units,
        "n_enemies": n_enemies,
        "team_gen": team,
        "start_positions": {"dist_type": "surrounded_and_reflect", "p": 0.5, "map_x": 32, "map_y": 32},
    }


def _valid_names_text() -> str:
    return (
        f"SMAC maps: {', '.join(SMAC_MAPS)}; SMACv2 scenarios: '<race>_<n_units>_vs_<n_enemies>' with race "
        f"{', '.join(SMACV2_RACES)} (e.g. 'protoss_5_vs_5', 'terran_10_vs_10', 'zerg_10_vs_11'); or "
        "'10gen_<race>' with a capability_config."
    )


def parse_map_name(map_name: str, capability_config: dict[str, Any] | None = None) -> tuple[str, dict | None]:
    """The smacv2 map and capability config that ``map_name`` stands for.

    ``"3s5z"`` gives ``("3s5z", capability_config)``, ``"protoss_5_vs_5"`` gives ``("10gen_protoss",
    <smacv2's protoss config with 5 units and 5 enemies>)``, ``"10gen_zerg"`` needs ``capability_config``.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones), a scenario given a
            ``capability_config`` as well, or a ``10gen_<race>`` map without one.
    """
    if not isinstance(map_name, str):
        raise ValueError(f"map_name must be a string, got {map_name!r}. Valid names: {_valid_names_text()}")
    if map_name in SMAC_MAPS:
        return map_name, capability_config
    match = _SCENARIO.match(map_name)
    if match:
        if capability_config is not None:
            raise ValueError(
                f"map_name {map_name!r} builds its own capability_config; to pass yours, use "
                f"map_name='10gen_{match.group(1)}'."
            )
        race, n_units, n_enemies = match.group(1), int(match.group(2)), int(match.group(3))
        return f"10gen_{race}", smacv2_capability_config(race, n_units, n_enemies)
    if _GEN_MAP.match(map_name):
        if not isinstance(capability_config, dict):
            raise ValueError(
                f"map_name {map_name!r} needs a capability_config (a dict as in smacv2's README), or use a "
                f"scenario name such as '{map_name[6:]}_5_vs_5'."
            )
        return map_name, capability_config
    raise ValueError(f"Unknown SMAC/SMACv2 map_name {map_name!r}. Valid names: {_valid_names_text()}")


# ------------------------------------------------------------------ requirements
def check_smacv2_installed() -> None:
    """Raise a ``ModuleNotFoundError`` saying how to install smacv2 if it (or PySC2) is not importable."""
    missing = [name for name in ("smacv2", "pysc2") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"SMACv2TaskEnv needs {' and '.join(missing)}, which is not installed; install it with "
            "`pip install 'fp3o-lightning[smacv2]'` (from a checkout: `pip install -e '.[smacv2]'`). "
            f"StarCraft II and the SMAC maps are installed separately: {_sc2_install_steps(sc2_path())}",
            name=missing[0],
        )


def sc2_path() -> Path:
    """Where PySC2 looks for StarCraft II: ``$SC2PATH``, else the platform's default (``~/StarCraftII``)."""
    env = os.environ.get("SC2PATH")
    if env:
        return Path(env).expanduser()
    system = platform.system()
    if system == "Darwin":
        return Path("/Applications/StarCraft II")
    if system == "Windows":
        return Path("C:/Program Files (x86)/StarCraft II")
    return Path("~/StarCraftII").expanduser()


def _sc2_install_steps(path: Path) -> str:
    return (
        f"(1) download StarCraft II {SC2_VERSION} for Linux from Blizzard's s2client-proto "
        f"(`wget {SC2_URL}`); (2) unzip it with the password 'iagreetotheeula' (which accepts the AI and "
        "Machine Learning License): `unzip -P iagreetotheeula SC2.4.10.zip -d ~` gives ~/StarCraftII, or "
        "unzip it elsewhere and set SC2PATH to the StarCraftII directory; (3) put the SMAC maps (SMACv2's "
        f"SMAC_Maps.zip from {MAPS_URL}, or the SMAC_Maps folder of the installed smacv2 package, "
        f"smacv2/env/starcraft2/maps/SMAC_Maps) in $SC2PATH/Maps/SMAC_Maps "
        f"(here: {path / 'Maps' / 'SMAC_Maps'})."
    )


def check_sc2_installed(map_file: str | None = None) -> Path:
    """Return the StarCraft II directory, or raise a ``RuntimeError`` with the install steps.

    Checks that :func:`sc2_path` holds an installation (its ``Versions`` directory) and, if ``map_file`` is
    given (a name without ``.SC2Map``), the map ``$SC2PATH/Maps/SMAC_Maps/<map_file>.SC2Map``.
    """
    path = sc2_path()
    where = f"SC2PATH={os.environ['SC2PATH']!r}" if os.environ.get("SC2PATH") else "SC2PATH is not set"
    if not (path / "Versions").is_dir():
        raise RuntimeError(
            f"StarCraft II was not found at {path} ({where}; PySC2 looks in $SC2PATH, else in "
            f"~/StarCraftII on Linux). To install it: {_sc2_install_steps(path)}"
        )
    if map_file is not None:
        map_path = path / "Maps" / "SMAC_Maps" / f"{map_file}.SC2Map"
        if not map_path.is_file():
            raise RuntimeError(
                f"StarCraft II is installed at {path}, but the map {map_path} is missing. "
                f"To install the maps: {_sc2_install_steps(path)}"
            )
    return path


def _check_smacv2_kwargs(smacv2_kwargs: dict[str, Any]) -> None:
    """Reject keyword arguments that smacv2's ``StarCraft2Env`` does not take or that this env sets."""
    from smacv2.env import StarCraft2Env

    valid = set(inspect.signature(StarCraft2Env.__init__).parameters) - {"self", *RESERVED_KWARGS}
    reserved = sorted(set(smacv2_kwargs) & set(RESERVED_KWARGS))
    if reserved:
        raise TypeError(f"SMACv2TaskEnv sets {', '.join(reserved)} itself; do not pass it.")
    unknown = sorted(set(smacv2_kwargs) - valid)
    if unknown:
        raise TypeError(
            f"SMACv2TaskEnv got unknown StarCraft2Env arguments {', '.join(unknown)}; valid ones: "
            f"{', '.join(sorted(valid))}."
        )


# ------------------------------------------------------------------ sub-envs
class _DeferredSMACv2Env(SMACv2Env):
    """TorchRL's ``SMACv2Env`` minus its constructor's reset: StarCraft II starts at the first reset."""

    def _init_env(self) -> None:
        return None


def _seed_scenario_generators(smac_env: Any, seed: int) -> int:
    """Seed the numpy generators of smacv2's scenario distributions in place; return how many were seeded.

    smacv2's ``StarCraftCapabilityEnvWrapper`` draws teams and start positions from distributions that each
    make an unseeded ``numpy.random.default_rng()`` (some nest others). Every ``Generator`` attribute
    reachable from ``smac_env.env_key_to_distribution_map`` through smacv2 objects is replaced by one
    seeded from ``seed``, in a deterministic order. A plain ``StarCraft2Env`` has none.
    """
    distributions = getattr(smac_env, "env_key_to_distribution_map", None)
    if not isinstance(distributions, dict):
        return 0
    sequence, count = np.random.SeedSequence(seed), 0
    stack, seen = list(reversed(list(distributions.values()))), set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen or not hasattr(obj, "__dict__"):
            continue
        seen.add(id(obj))
        children = []
        for name, value in vars(obj).items():
            if isinstance(value, np.random.Generator):
                setattr(obj, name, np.random.default_rng(sequence.spawn(1)[0]))
                count += 1
            elif type(value).__module__.startswith("smacv2."):
                children.append(value)
        stack.extend(reversed(children))
    return count


def _make_smacv2_env(
    map_name: str, capability_config: dict[str, Any] | None, smacv2_kwargs: dict[str, Any], seed: int | None
) -> EnvBase:
    """One TorchRL ``SMACv2Env`` (index actions), StarCraft II not started yet."""
    env = _DeferredSMACv2Env(
        map_name=map_name,
        # smacv2 writes into the config it is given: each sub-env gets its own copy
        capability_config=copy.deepcopy(capability_config),
        seed=seed,
        categorical_actions=True,
        continuing_episode=True,  # info["episode_limit"] tells a time limit from a battle's end
        **smacv2_kwargs,
    )
    if seed is not None and capability_config is not None:
        _seed_scenario_generators(env._env, seed)
    return env


class _Restarted(RuntimeError):
    """smacv2 restarted StarCraft II by itself (after a protocol error) during a step or reset."""


def _restarts(env: EnvBase) -> int:
    """smacv2's count of StarCraft II restarts it did by itself (0 where the env keeps none)."""
    try:
        return int(getattr(env, "force_restarts", 0))
    except Exception:
        return 0


# ------------------------------------------------------------------ the env
class SMACv2TaskEnv(EnvBase):
    """``num_envs`` SMAC / SMACv2 battles as one batched TorchRL environment.

    Args:
        map_name: a SMAC map (``"3s5z"``, ``"corridor"``, ...; :data:`SMAC_MAPS`), a SMACv2 scenario
            ``"<race>_<n_units>_vs_<n_enemies>"`` (``"protoss_5_vs_5"``, ...) or ``"10gen_<race>"`` with a
            ``capability_config`` in ``smacv2_kwargs`` (see the module docstring).
        num_envs: number of independent battles (the batch size), one StarCraft II process each.
        seed: if given, seeds the sub-envs (see the module docstring); :meth:`set_seed` too.
        device: device of the produced tensors (StarCraft II runs on the CPU).
        max_faults: how many times over the env's life a sub-env that raised during ``step``/``reset`` is
            rebuilt; one more fault raises a ``RuntimeError``. ``0`` re-raises the first fault's exception.
        parallel: step and reset the sub-envs concurrently in threads (``num_envs > 1``).
        env_factory: builds one sub-env from its seed, ``env_factory(seed) -> EnvBase``: an unbatched
            TorchRL env with the keys and specs of TorchRL's ``SMACv2Env`` (index actions) and the attribute
            ``episode_limit``. The default builds ``SMACv2Env`` from ``map_name`` and ``smacv2_kwargs``;
            only then are smacv2 and StarCraft II checked and ``smacv2_kwargs`` used.
        **smacv2_kwargs: further arguments of smacv2's ``StarCraft2Env`` (``difficulty``, ``reward_sparse``,
            ``obs_last_action``, ``capability_config``, ...).

    Attributes:
        map_name, num_envs, max_faults: the constructor arguments.
        smac_map: the smacv2 map played (``"10gen_protoss"`` for ``"protoss_5_vs_5"``).
        capability_config: smacv2's capability config (``None`` for SMAC maps).
        n_agents, n_actions, obs_size, state_size: sizes of the agents' team, of the action set, of an
            observation and of the state.
        max_episode_steps: the map's episode limit (steps after which an episode is truncated).
        faults: sub-env rebuilds so far (kept in the saved state).

    Raises:
        ValueError: for an invalid ``map_name`` (the message lists the valid ones) or argument.
        ModuleNotFoundError: if smacv2 is not installed (the message says how to install it).
        RuntimeError: if StarCraft II or the map is not installed (the message gives the steps).
        TypeError: for a keyword argument that smacv2's ``StarCraft2Env`` does not take.
    """

    #: the paper's code gives SMAC critics MAPPO's agent-specific global state (``critic_input="auto"``)
    agent_specific_state = True
    batch_locked = True

    def __init__(
        self,
        map_name: str,
        num_envs: int = 1,
        seed: int | None = None,
        device: torch.device | str = "cpu",
        max_faults: int = 10,
        *,
        parallel: bool = True,
        env_factory: Callable[[int | None], EnvBase] | None = None,
        **smacv2_kwargs: Any,
    ) -> None:
        if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}.")
        if not isinstance(max_faults, int) or isinstance(max_faults, bool) or max_faults < 0:
            raise ValueError(f"max_faults must be an integer >= 0, got {max_faults!r}.")
        _check_seed(seed)
        smacv2_kwargs = dict(smacv2_kwargs)
        smac_map, capability_config = parse_map_name(map_name, smacv2_kwargs.pop("capability_config", None))
        if env_factory is None:
            check_smacv2_installed()
            check_sc2_installed(SMACV2_MAP_FILE if smac_map.startswith("10gen_") else smac_map)
            if smac_map.startswith("10gen_"):
                smacv2_kwargs = {**SMACV2_ENV_DEFAULTS, **smacv2_kwargs}
            smacv2_kwargs.setdefault("obs_last_action", True)
            _check_smacv2_kwargs(smacv2_kwargs)

            def env_factory(sub_seed: int | None) -> EnvBase:
                return _make_smacv2_env(smac_map, capability_config, smacv2_kwargs, sub_seed)

        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        self.map_name = map_name
        self.smac_map = smac_map
        self.capability_config = copy.deepcopy(capability_config)
        self.num_envs = num_envs
        self.max_faults = max_faults
        self.parallel = bool(parallel)
        self._factory = env_factory
        self._faults = 0
        self._base_seed: int | None = None if seed is None else int(seed)
        self._pool: ThreadPoolExecutor | None = None

        self._envs: list[EnvBase | None] = [None] * num_envs
        for i in range(num_envs):
            self._envs[i] = self._build(self.sub_seed(i))
        self._read_sizes(self._envs[0])
        self._make_specs()

        n, a = num_envs, self.n_agents
        self._obs = torch.zeros(n, a, self.obs_size)
        self._mask = torch.zeros(n, a, self.n_actions, dtype=torch.bool)
        self._mask[..., 0] = True  # until the first reset: the no-op
        self._state = torch.zeros(n, self.state_size)
        self._reward = torch.zeros(n, 1)
        self._terminated = torch.zeros(n, 1, dtype=torch.bool)
        self._truncated = torch.zeros(n, 1, dtype=torch.bool)
        self._won = torch.zeros(n, 1, dtype=torch.bool)
        self._faulted = torch.zeros(n, 1, dtype=torch.bool)
        # started: StarCraft II was started (the sub-env was reset) since it was built.
        # live: its current episode may be stepped (False before the first reset and after loading a state).
        # fresh: a faulted step rebuilt and reset it; the auto-reset that follows keeps that reset.
        self._started = [False] * n
        self._live = [False] * n
        self._fresh = [False] * n
        self._agents_batch = torch.Size([n, a])

    # ------------------------------------------------------------------ setup
    def _build(self, seed: int | None) -> EnvBase:
        env = self._factory(seed)
        if tuple(env.batch_size):
            raise ValueError(
                f"env_factory must build unbatched envs, got batch_size {tuple(env.batch_size)}."
            )
        return env

    def _read_sizes(self, env: EnvBase) -> None:
        obs = env.observation_spec[_OBS]
        self.n_agents, self.obs_size = int(obs.shape[-2]), int(obs.shape[-1])
        self.n_actions = int(env.full_action_spec[_ACTION].space.n)
        self.state_size = int(env.observation_spec["state"].shape[-1])
        self.max_episode_steps = int(env.episode_limit)

    def _make_specs(self) -> None:
        n, a, k = self.num_envs, self.n_agents, self.n_actions
        action = Categorical(k, shape=(n, a), dtype=torch.int64, device=self.device)
        set_contract_specs(
            self,
            self.obs_size,
            self.state_size,
            action,
            n_actions=k,
            flags=("won", "faulted"),
            agent_flags=("alive",),
        )

    def sub_seed(self, index: int, fault: int = 0) -> int | None:
        """The seed sub-env ``index`` is built with: ``SeedSequence(seed, spawn_key=(index,))`` as a 32-bit
        integer, or ``spawn_key=(index, fault)`` for its rebuild after the env's ``fault``-th fault (from 1).
        ``None`` when the env is unseeded."""
        if self._base_seed is None:
            return None
        key = (index,) if fault == 0 else (index, fault)
        return int(np.random.SeedSequence(self._base_seed, spawn_key=key).generate_state(1)[0])

    # ------------------------------------------------------------------ running the sub-envs
    def _map(self, fn: Callable[[int], Any], indices: Sequence[int]) -> list[tuple[Any, Exception | None]]:
        """``fn(i)`` for each index, concurrently in threads when ``parallel``; results or exceptions."""

        def call(i: int) -> tuple[Any, Exception | None]:
            try:
                return fn(i), None
            except Exception as err:
                return None, err

        if not self.parallel or len(indices) < 2:
            return [call(i) for i in indices]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.num_envs, thread_name_prefix="smacv2")
        return list(self._pool.map(call, indices))

    def _inner_reset(self, index: int) -> TensorDictBase:
        env = self._envs[index]
        self._started[index] = True
        restarts = _restarts(env)
        out = env.reset()
        if _restarts(env) != restarts:
            raise _Restarted("smacv2 restarted StarCraft II during the reset (a protocol error)")
        return out

    def _inner_step(self, index: int, action: torch.Tensor) -> TensorDictBase:
        env = self._envs[index]
        restarts = _restarts(env)
        td = TensorDict({"agents": TensorDict({"action": action}, batch_size=[self.n_agents])}, batch_size=[])
        out = env.step(td).get("next")
        if _restarts(env) != restarts:
            raise _Restarted("smacv2 restarted StarCraft II during the step (a protocol error)")
        return out

    def _write(self, index: int, out: TensorDictBase) -> None:
        """Copy a sub-env's observation, action mask and state into the buffers."""
        self._obs[index] = out.get(_OBS)
        self._mask[index] = out.get(_MASK)
        self._state[index] = out.get("state")

    def _write_step(self, index: int, out: TensorDictBase) -> None:
        self._write(index, out)
        done = bool(out.get("done").any())
        won = bool(out.get(("info", "battle_won")).any())
        limit = bool(out.get(("info", "episode_limit")).any())
        truncated = done and limit and not won
        self._reward[index, 0] = out.get("reward").reshape(-1)[0]
        self._terminated[index, 0] = done and not truncated
        self._truncated[index, 0] = truncated
        self._won[index, 0] = done and won

    def _cut(self, index: int) -> None:
        """Report sub-env ``index``'s episode as cut short this step (its buffers hold a fresh reset)."""
        self._reward[index, 0] = 0.0
        self._terminated[index, 0] = False
        self._truncated[index, 0] = True
        self._won[index, 0] = False
        self._faulted[index, 0] = True
        self._fresh[index] = True
        self._live[index] = True

    def _output(self, reward: bool) -> TensorDictBase:
        mask = self._mask.clone()
        self.full_action_spec[_ACTION].update_mask(mask.to(self.device))
        terminated, truncated = self._terminated.clone(), self._truncated.clone()
        data = {
            "state": self._state.clone(),
            "done": terminated | truncated,
            "terminated": terminated,
            "truncated": truncated,
            "won": self._won.clone(),
            "faulted": self._faulted.clone(),
        }
        if reward:
            data["reward"] = self._reward.clone()
        only_no_op = mask[..., 0] & ~mask[..., 1:].any(-1)  # SMAC's dead agents may only take the no-op
        agents = {"observation": self._obs.clone(), "action_mask": mask, "alive": ~only_no_op}
        if self.device.type != "cpu":
            data = {key: value.to(self.device, non_blocking=True) for key, value in data.items()}
            agents = {key: value.to(self.device, non_blocking=True) for key, value in agents.items()}
        data["agents"] = TensorDict._new_unsafe(agents, batch_size=self._agents_batch, device=self.device)
        return TensorDict._new_unsafe(data, batch_size=self.batch_size, device=self.device)

    def _check_actions(self, action: torch.Tensor) -> None:
        """Raise a ``ValueError`` for an action out of range or not available (of a live sub-env)."""
        if action.shape != self._agents_batch:
            raise ValueError(
                f"('agents', 'action') must have shape {tuple(self._agents_batch)} (index actions), got "
                f"{tuple(action.shape)}."
            )
        if bool(((action < 0) | (action >= self.n_actions)).any()):
            raise ValueError(f"actions must lie in [0, {self.n_actions}), got {action.tolist()}.")
        available = self._mask.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        available[[i for i in range(self.num_envs) if not self._live[i]]] = True
        if not bool(available.all()):
            env, agent = (int(x) for x in torch.nonzero(~available)[0])
            raise ValueError(
                f"Agent {agent} of sub-env {env} cannot take action {int(action[env, agent])} (not in its "
                f"('agents', 'action_mask')); sample actions from the masked distribution."
            )

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get(_ACTION).detach().to("cpu", torch.int64)
        self._check_actions(action)
        self._faulted.zero_()
        self._fresh = [False] * self.num_envs
        live = list(self._live)

        def advance(i: int) -> TensorDictBase:
            return self._inner_step(i, action[i]) if live[i] else self._inner_reset(i)

        for i, (out, err) in enumerate(self._map(advance, range(self.num_envs))):
            if err is not None:
                self._recover(i, err, "step" if live[i] else "reset")
                self._cut(i)
            elif live[i]:
                self._write_step(i, out)
            else:  # not reset since it was built or a state was loaded: its episode restarts here
                self._write(i, out)
                self._cut(i)
        return self._output(reward=True)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        reset = None if tensordict is None else tensordict.get("_reset", None)
        if reset is None:
            indices: list[int] = list(range(self.num_envs))
        else:
            indices = torch.nonzero(reset.reshape(self.num_envs).cpu()).flatten().tolist()
        self._faulted.zero_()
        todo = [i for i in indices if not self._fresh[i]]
        for i, (out, err) in zip(todo, self._map(self._inner_reset, todo), strict=True):
            if err is not None:
                self._recover(i, err, "reset")
            else:
                self._write(i, out)
        for i in indices:
            self._fresh[i] = False
            self._live[i] = True
            self._terminated[i, 0] = self._truncated[i, 0] = self._won[i, 0] = False
        return self._output(reward=False)

    def _set_seed(self, seed: int | None) -> None:
        """Rebuild the sub-envs with the seeds of ``seed`` (``None``: keep them as they are).

        A sub-env not started yet is rebuilt for free; a started one restarts StarCraft II at its next reset.
        """
        if seed is None:
            return
        _check_seed(seed)
        self._base_seed = int(seed)
        for i in range(self.num_envs):
            self._replace(i, self._build(self.sub_seed(i)))
            self._live[i] = self._fresh[i] = False

    def _replace(self, index: int, env: EnvBase) -> None:
        old, self._envs[index] = self._envs[index], env
        started, self._started[index] = self._started[index], False
        if old is not None and started:
            with contextlib.suppress(Exception):  # a crashed StarCraft II may fail to close; dropped anyway
                old.close()

    # ------------------------------------------------------------------ faults
    @property
    def faults(self) -> int:
        """How many times a sub-env was rebuilt after a fault (over the env's life, saved states included)."""
        return self._faults

    def _recover(self, index: int, err: Exception, during: str) -> None:
        """Rebuild sub-env ``index`` after ``err`` (raised during ``during``) and reset it
        (:func:`~fp3o_lightning.envs.faults.rebuild_after_fault`, which raises past ``max_faults``).

        Writes the reset observation, mask and state into the buffers and sets ``faulted``; the caller sets
        the done flags and reward.
        """

        def rebuild(fault: int) -> None:
            self._replace(index, self._build(self.sub_seed(index, fault)))
            self._write(index, self._inner_reset(index))

        rebuild_after_fault(self, self.map_name, index, err, during, rebuild, cause="StarCraft II")
        self._faulted[index, 0] = True
        self._live[index] = True

    # ------------------------------------------------------------------ checkpointing
    _STATE_FORMAT = 1

    def get_extra_state(self) -> dict[str, Any]:
        """The fault count and seed, stored by :meth:`state_dict` (StarCraft II's game cannot be saved)."""
        return {
            "format": self._STATE_FORMAT,
            "config": {"map_name": self.map_name, "num_envs": self.num_envs},
            "faults": int(self._faults),
            "seed": self._base_seed,
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore :meth:`get_extra_state`'s fault count and seed; the next step restarts every episode.

        Raises:
            ValueError: if ``state`` is not such a state or comes from an env with another ``map_name`` or
                ``num_envs``.
        """
        name = type(self).__name__
        if not isinstance(state, dict) or state.get("format") != self._STATE_FORMAT:
            raise ValueError(
                f"Not a {name} state of format {self._STATE_FORMAT}; it must come from state_dict()."
            )
        ours, theirs = {"map_name": self.map_name, "num_envs": self.num_envs}, state.get("config", {})
        diffs = [f"{k}={theirs.get(k)!r} (this env: {v!r})" for k, v in ours.items() if theirs.get(k) != v]
        if diffs:
            raise ValueError(
                f"Cannot load the {name} state: it was saved from an env with {', '.join(diffs)}."
            )
        self._faults = int(state["faults"])
        self._base_seed = state["seed"]
        self._live = [False] * self.num_envs
        self._fresh = [False] * self.num_envs

    # ------------------------------------------------------------------ closing
    def close(self, *, raise_if_closed: bool = True) -> None:
        """Close every sub-env's StarCraft II and the worker threads."""
        for i, env in enumerate(self.__dict__.get("_envs", [])):
            if env is not None:
                with contextlib.suppress(Exception):
                    env.close()
                self._envs[i] = None
        pool = self.__dict__.get("_pool")
        if pool is not None:
            pool.shutdown(wait=True)
            self._pool = None
        super().close(raise_if_closed=raise_if_closed)


def _check_seed(seed: Any) -> None:
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}.")
