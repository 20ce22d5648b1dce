"""Fault recovery in :class:`fp3o_lightning.envs.MaMuJoCoEnv`: a sub-env that raises is rebuilt, not fatal."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from tensordict import TensorDictBase
from torchrl.envs.utils import check_env_specs

from fp3o_lightning.envs import MaMuJoCoEnv
from fp3o_lightning.envs import mamujoco as mamujoco_module
from fp3o_lightning.envs.faults import EnvFaultWarning

KWARGS = {"scenario": "Hopper", "agent_conf": "3x1", "num_envs": 3, "max_episode_steps": 1000}
STEPS, FAULTY, CRASH_CALL = 12, 1, 5  # sub-env 1 raises on its 5th step call: output step index 4


#: Stands for the physics step in ``_crash``: ``mujoco.mj_step`` on that simulator's ``MjData``, which both of
#: MaMuJoCoEnv's step paths run, its vectorised one (Hopper's) and the one through Gymnasium's ``step`` (see
#: test_step_fault_on_the_gymnasium_step_path).
STEP = "mj_step"


class SimulatedCrash(RuntimeError):
    """Stands for a simulator crash."""


#: ``id(MjData)`` -> [the MjData (kept alive), crashing call or None for every call, calls so far, message].
_PHYSICS_CRASHES: dict[int, list[Any]] = {}


@pytest.fixture(autouse=True)
def _crashable_physics(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``mujoco.mj_step`` raises where ``_crash(sim, STEP, ...)`` asked it to; clean after each test."""
    import mujoco

    original = mujoco.mj_step

    def mj_step(model: Any, data: Any, *args: Any, **kwargs: Any) -> None:
        crash = _PHYSICS_CRASHES.get(id(data))
        if crash is not None:
            crash[2] += 1
            if crash[1] is None or crash[2] == crash[1]:
                raise SimulatedCrash(crash[3])
        original(model, data, *args, **kwargs)

    monkeypatch.setattr(mujoco, "mj_step", mj_step)
    yield
    _PHYSICS_CRASHES.clear()


def _crash(obj: Any, method: str, on_call: int | None, message: str = "simulated crash") -> None:
    """Make ``obj.method`` raise ``SimulatedCrash(message)`` on call ``on_call`` (on every call if None).

    ``method=STEP`` crashes the physics step of the simulator ``obj`` (its current ``MjData``; a rebuilt
    sub-env has a new one).
    """
    if method == STEP:
        _PHYSICS_CRASHES[id(obj.data)] = [obj.data, on_call, 0, message]
        return
    original = getattr(obj, method)
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if on_call is None or calls == on_call:
            raise SimulatedCrash(message)
        return original(*args, **kwargs)

    setattr(obj, method, wrapper)


def _random_actions(env: MaMuJoCoEnv, steps: int, seed: int) -> torch.Tensor:
    """In-bound float32 actions ``[steps, num_envs, n_agents, max_action_dim]``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (steps, env.num_envs, env.n_agents, env.max_action_dim)
    spec = env.full_action_spec[("agents", "action")]
    return spec.space.low + (spec.space.high - spec.space.low) * torch.rand(shape, generator=gen)


def _run(
    env: MaMuJoCoEnv, actions: torch.Tensor, after_step: Callable[[int], None] | None = None
) -> tuple[TensorDictBase, TensorDictBase]:
    """``step_and_maybe_reset`` over ``actions``; the stacked steps ``[num_envs, steps]`` and the root TDs."""
    td = env.reset()
    out, roots = [], []
    for t, action in enumerate(actions):
        td.set(("agents", "action"), action)
        data, td = env.step_and_maybe_reset(td)
        out.append(data)
        roots.append(td.clone())
        if after_step is not None:
            after_step(t)
    return torch.stack(out, dim=1), torch.stack(roots, dim=1)


def _reference_reset(seed: int) -> Any:
    from gymnasium_robotics import mamujoco_v1

    ref = mamujoco_v1.parallel_env("Hopper", "3x1", agent_obsk=1)
    obs, _ = ref.reset(seed=seed)
    return ref, obs


def _assert_is_reset_of(env: MaMuJoCoEnv, td: TensorDictBase, i: int, seed: int) -> None:
    """``td`` (batch ``[num_envs]``) holds, for sub-env ``i``, a fresh Hopper reset with ``seed``."""
    ref, obs = _reference_reset(seed)
    np.testing.assert_array_equal(td["state"][i].numpy(), ref.state().astype(np.float32))
    for a, name in enumerate(ref.possible_agents):
        d = env.observation_sizes[a]
        np.testing.assert_array_equal(
            td["agents", "observation"][i, a, :d].numpy(), obs[name].astype(np.float32)
        )


def _assert_others_equal(data: TensorDictBase, clean: TensorDictBase, skip: int) -> None:
    others = [i for i in range(data.shape[0]) if i != skip]
    assert set(data.keys(True, True)) == set(clean.keys(True, True))
    for key in data.keys(True, True):
        assert torch.equal(data[key][others], clean[key][others]), key


def test_step_fault_rebuilds_only_that_sub_env() -> None:
    clean = MaMuJoCoEnv(**KWARGS, seed=7)
    env = MaMuJoCoEnv(**KWARGS, seed=7)
    actions = _random_actions(env, STEPS, seed=0)
    crashed_sim, crashed_penv = env._sims[FAULTY], env._penvs[FAULTY]
    _crash(crashed_sim, STEP, on_call=CRASH_CALL)
    t_fault = CRASH_CALL - 1
    elapsed: list[list[int]] = []

    with pytest.warns(EnvFaultWarning) as record:
        data, roots = _run(env, actions, after_step=lambda t: elapsed.append(env._elapsed.tolist()))
    messages = [str(w.message) for w in record if issubclass(w.category, EnvFaultWarning)]
    assert len(messages) == 1
    for part in ("Hopper 3x1", "sub-env 1", "during step", "SimulatedCrash: simulated crash", "1/10"):
        assert part in messages[0], (part, messages[0])
    assert env.faults == 1

    # Exactly that sub-env, at that step, is marked and cut short with reward 0.
    expected = torch.zeros(3, STEPS, 1, dtype=torch.bool)
    expected[FAULTY, t_fault] = True
    assert torch.equal(data["next", "faulted"], expected)
    assert not data["faulted"].any() and not roots["faulted"].any()  # no reset faulted
    step = data[FAULTY, t_fault]["next"]
    assert step["truncated"].item() and step["done"].item() and not step["terminated"].item()
    assert step["reward"].item() == 0.0

    # It was rebuilt (new objects) and reset with the seed derived from the env's seed, k = 1.
    assert env._sims[FAULTY] is not crashed_sim and env._penvs[FAULTY] is not crashed_penv
    seed = env.fault_seed(FAULTY, 1)
    assert seed is not None and seed == MaMuJoCoEnv(**KWARGS, seed=7).fault_seed(FAULTY, 1)
    assert seed != env.fault_seed(FAULTY, 2) and seed != env.fault_seed(0, 1)
    _assert_is_reset_of(env, data["next"][:, t_fault], FAULTY, seed)
    # ... and its new episode starts from that reset (the auto-reset keeps it), step counter restarted.
    _assert_is_reset_of(env, roots[:, t_fault], FAULTY, seed)
    assert elapsed[t_fault][FAULTY] == 0 and elapsed[t_fault + 1][FAULTY] == 1
    ref, _ = _reference_reset(seed)
    for t in range(t_fault + 1, t_fault + 4):  # it continues exactly like a fresh Hopper
        step = data[FAULTY, t]["next"]
        ref_obs, rew, term, _, _ = ref.step(
            {name: actions[t, FAULTY, a, :1].numpy() for a, name in enumerate(ref.possible_agents)}
        )
        assert step["reward"].item() == np.float32(rew["agent_0"]) and not step["faulted"].item()
        np.testing.assert_array_equal(step["state"].numpy(), ref.state().astype(np.float32))
        assert not term["agent_0"]

    # The other sub-envs are bit-identical to a run without the fault.
    clean_data, clean_roots = _run(clean, actions)
    _assert_others_equal(data, clean_data, skip=FAULTY)
    _assert_others_equal(roots, clean_roots, skip=FAULTY)
    assert not clean_data["next", "faulted"].any() and clean.faults == 0

    # A second faulty env with the same seed recovers identically.
    twin = MaMuJoCoEnv(**KWARGS, seed=7)
    _crash(twin._sims[FAULTY], STEP, on_call=CRASH_CALL)
    with pytest.warns(EnvFaultWarning):
        twin_data, _ = _run(twin, actions)
    assert (twin_data == data).all()


@pytest.mark.parametrize("method", ["step", STEP])
def test_step_fault_on_the_gymnasium_step_path(method: str) -> None:
    """Reacher has no vectorised dynamics: it steps through Gymnasium's ``step``, and recovers too."""
    kwargs = {"scenario": "Reacher", "agent_conf": "2x1", "num_envs": 2}
    clean, env = MaMuJoCoEnv(**kwargs, seed=4), MaMuJoCoEnv(**kwargs, seed=4)
    assert env._dynamics is None
    actions = _random_actions(env, 6, seed=1)
    _crash(env._sims[1], method, on_call=3)
    with pytest.warns(EnvFaultWarning, match="sub-env 1 raised during step"):
        data, _ = _run(env, actions)
    clean_data, _ = _run(clean, actions)
    expected = [[False] * 6, [False, False, True, False, False, False]]
    assert data["next", "faulted"].squeeze(-1).tolist() == expected
    assert data["next", "truncated"][1, 2].item() and data["next", "reward"][1, 2].item() == 0.0
    _assert_others_equal(data, clean_data, skip=1)


def test_rollout_continues_after_a_fault() -> None:
    clean = MaMuJoCoEnv(**KWARGS, seed=3)
    env = MaMuJoCoEnv(**KWARGS, seed=3)
    _crash(env._sims[FAULTY], STEP, on_call=CRASH_CALL)
    torch.manual_seed(0)
    with pytest.warns(EnvFaultWarning, match=r"sub-env 1 .*simulated crash.*fault 1/10"):
        rollout = env.rollout(20, break_when_any_done=False)
    torch.manual_seed(0)
    clean_rollout = clean.rollout(20, break_when_any_done=False)
    assert rollout.batch_size == (3, 20)
    faulted = rollout["next", "faulted"].squeeze(-1)
    assert faulted.sum() == 1 and faulted[FAULTY, CRASH_CALL - 1]
    assert rollout["next", "truncated"][FAULTY, CRASH_CALL - 1].item()
    assert rollout["next", "reward"][FAULTY, CRASH_CALL - 1].item() == 0.0
    _assert_others_equal(rollout, clean_rollout, skip=FAULTY)


def test_reset_fault_is_recovered() -> None:
    env = MaMuJoCoEnv(**KWARGS, seed=5)
    crashed = env._sims[2]
    _crash(crashed, "reset", on_call=1)
    with pytest.warns(EnvFaultWarning, match=r"sub-env 2 raised during reset .*fault 1/10"):
        td = env.reset()
    assert td["faulted"].squeeze(-1).tolist() == [False, False, True]
    assert env.faults == 1 and env._sims[2] is not crashed
    _assert_is_reset_of(env, td, 2, env.fault_seed(2, 1))
    _assert_is_reset_of(env, td, 0, 5)  # the others got their own seeds
    data = env.rand_step(td)
    assert not data["next", "faulted"].any() and not data["next", "done"].any()


def test_auto_reset_fault_loses_no_episode() -> None:
    env = MaMuJoCoEnv(**{**KWARGS, "max_episode_steps": 4}, seed=1)
    actions = _random_actions(env, 6, seed=2)
    _crash(env._sims[0], "reset", on_call=2)  # the first reset works, the one after truncation raises
    with pytest.warns(EnvFaultWarning, match="during reset"):
        data, roots = _run(env, actions)
    assert env.faults == 1
    assert not data["next", "faulted"].any()  # the finished episode is complete
    assert roots["faulted"].squeeze(-1)[:, 3].tolist() == [True, False, False]  # the next one starts rebuilt
    assert int(roots["faulted"].sum()) == 1
    _assert_is_reset_of(env, roots[:, 3], 0, env.fault_seed(0, 1))


def test_fault_limit_raises_with_a_helpful_message() -> None:
    env = MaMuJoCoEnv(**KWARGS, seed=0, max_faults=2)
    td = env.reset()
    with pytest.warns(EnvFaultWarning) as record:
        for _ in range(2):
            _crash(env._sims[FAULTY], STEP, on_call=None)
            td = env.rand_step(td)
            assert td["next", "faulted"].squeeze(-1).tolist() == [False, True, False]
            td = env.reset(td.get("next").clone())
    assert [str(w.message).endswith(f"(fault {k}/2).") for k, w in enumerate(record, 1)] == [True, True]
    _crash(env._sims[FAULTY], STEP, on_call=None, message="third crash")
    with pytest.raises(RuntimeError, match=r"max_faults=2") as err:
        env.rand_step(td)
    message = str(err.value)
    assert "sub-env 1" in message and "third crash" in message and "max_faults=<n>" in message
    assert isinstance(err.value.__cause__, SimulatedCrash)
    assert env.faults == 2


def test_a_rebuild_that_fails_again_counts_as_another_fault(monkeypatch) -> None:
    env = MaMuJoCoEnv(**KWARGS, seed=0, max_faults=3)
    td = env.reset()
    make = mamujoco_module._make_parallel_envs

    def broken_make(*args: Any, **kwargs: Any) -> list[Any]:
        penvs = make(*args, **kwargs)
        for penv in penvs:
            _crash(penv.single_agent_env.unwrapped, "reset", on_call=None, message="still broken")
        return penvs

    monkeypatch.setattr(mamujoco_module, "_make_parallel_envs", broken_make)
    _crash(env._sims[0], STEP, on_call=1)
    with pytest.warns(EnvFaultWarning) as record, pytest.raises(RuntimeError, match="still broken"):
        env.rand_step(td)
    assert env.faults == 3 and len(record) == 3
    assert "during its rebuild after a fault" in str(record[1].message)


@pytest.mark.parametrize("method", ["step", "reset"])
def test_max_faults_zero_reraises_the_original_error(method: str) -> None:
    env = MaMuJoCoEnv(**KWARGS, seed=0, max_faults=0)
    td = env.reset()
    _crash(env._sims[FAULTY], STEP if method == "step" else method, on_call=1, message="original")
    with warnings.catch_warnings():
        warnings.simplefilter("error", EnvFaultWarning)
        with pytest.raises(SimulatedCrash, match="^original$") as err:
            env.rand_step(td) if method == "step" else env.reset()
    assert err.value.__cause__ is None and env.faults == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_max_faults_is_validated(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_faults"):
        MaMuJoCoEnv("Hopper", "3x1", max_faults=bad)


def test_check_env_specs_with_the_faulted_key() -> None:
    env = MaMuJoCoEnv(**KWARGS, seed=0)
    assert env.observation_spec["faulted"].shape == (3, 1)
    assert env.observation_spec["faulted"].dtype == torch.bool
    check_env_specs(env)
    _crash(env._sims[FAULTY], STEP, on_call=2)
    with pytest.warns(EnvFaultWarning):
        check_env_specs(env)  # a faulting env's outputs still match the specs
    assert env.faults == 1
    td = env.reset()
    assert not td["faulted"].any()


def test_collector_keeps_collecting() -> None:
    from torchrl.collectors import Collector

    env = MaMuJoCoEnv(**{**KWARGS, "max_episode_steps": 30}, seed=0)
    _crash(env._sims[FAULTY], STEP, on_call=CRASH_CALL)
    collector = Collector(env, policy=None, frames_per_batch=60, total_frames=120)
    with pytest.warns(EnvFaultWarning):
        batches = list(collector)
    collector.shutdown()
    assert len(batches) == 2 and batches[0].batch_size == (3, 20)
    faulted = torch.cat([b["next", "faulted"] for b in batches], dim=1).squeeze(-1)
    assert faulted.sum() == 1 and faulted[FAULTY, CRASH_CALL - 1]
    assert env.faults == 1


def _round_trip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _next(td: TensorDictBase) -> TensorDictBase:
    """The root TensorDict of the next step (``step_mdp``, without the auto-reset)."""
    from torchrl.envs.utils import step_mdp

    return step_mdp(td)


def test_fault_count_and_recovery_survive_state_dict() -> None:
    env = MaMuJoCoEnv(**KWARGS, seed=9)
    actions = _random_actions(env, 8, seed=4)
    _crash(env._sims[FAULTY], STEP, on_call=2)
    td = env.reset()
    td.set(("agents", "action"), actions[0])
    td = _next(env.step(td))
    td.set(("agents", "action"), actions[1])
    with pytest.warns(EnvFaultWarning):
        td = env.step(td)
    assert td["next", "faulted"][FAULTY].item()
    # Saved right after the faulted step, before the auto-reset.
    state = _round_trip(env.state_dict())
    assert state["_extra_state"]["faults"] == 1 and state["_extra_state"]["seed"] == 9

    other = MaMuJoCoEnv(**KWARGS, seed=123, max_faults=5)
    other.load_state_dict(state)
    assert other.faults == 1 and other.fault_seed(0, 2) == env.fault_seed(0, 2)
    outputs = []
    for e in (env, other):
        root = e.maybe_reset(_next(td).clone())
        _assert_is_reset_of(e, root, FAULTY, env.fault_seed(FAULTY, 1))  # the rebuilt reset is kept
        steps = []
        for t in range(2, 8):
            root.set(("agents", "action"), actions[t])
            data, root = e.step_and_maybe_reset(root)
            steps.append(data)
        outputs.append(torch.stack(steps))
    assert (outputs[0] == outputs[1]).all()

    # A resumed run keeps counting: its next fault is fault 2, seeded with k = 2.
    _crash(other._sims[0], STEP, on_call=1)
    with pytest.warns(EnvFaultWarning, match=r"fault 2/5"):
        out = other.rand_step(root)
    assert other.faults == 2
    _assert_is_reset_of(other, out["next"], 0, env.fault_seed(0, 2))


def test_format_1_states_still_load() -> None:
    env = MaMuJoCoEnv(**KWARGS, seed=2)
    env.reset()
    state = env.state_dict()
    extra = dict(state["_extra_state"])
    assert extra["format"] == 2
    extra["format"] = 1
    for key in ("faults", "seed", "fresh"):
        del extra[key]
    other = MaMuJoCoEnv(**KWARGS, seed=4)
    other._faults = 3
    other.load_state_dict({"_extra_state": extra})
    assert other.faults == 0 and other.fault_seed(1, 1) == MaMuJoCoEnv(**KWARGS, seed=4).fault_seed(1, 1)
