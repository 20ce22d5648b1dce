"""Tests for :class:`fp3o_lightning.envs.vmas.VMASEnv`: specs, exactness vs VmasEnv, seeds, resume."""

from __future__ import annotations

import io

import lightning as L
import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import MarlGroupMapType, check_env_specs

pytest.importorskip("vmas")

from torchrl.envs.libs.vmas import VmasEnv  # noqa: E402

from fp3o_lightning.envs import make_env  # noqa: E402
from fp3o_lightning.envs.vmas import VMASEnv, vmas_scenarios  # noqa: E402
from fp3o_lightning.module import FP3OModule  # noqa: E402

from .conftest import CUDA, NEEDS_CUDA, fit_quietly  # noqa: E402

DEVICES = ["cpu", CUDA]


def _random_actions(env: VMASEnv, steps: int, seed: int) -> torch.Tensor:
    """In-bound float32 actions ``[steps, num_envs, n_agents, max_action_dim]`` on the env's device.

    Drawn on the CPU (the same actions whatever the device), then moved.
    """
    gen = torch.Generator().manual_seed(seed)
    spec = env.full_action_spec["agents", "action"]
    low, high = spec.space.low, spec.space.high
    return low + (high - low) * torch.rand((steps, *spec.shape), generator=gen).to(spec.device)


def _rollout(
    env: VMASEnv, actions: torch.Tensor, td: TensorDict | None = None
) -> tuple[TensorDict, TensorDict]:
    """Step ``env`` with ``actions`` via ``step_and_maybe_reset``: ``[steps, num_envs]`` data, the carrier."""
    td = env.reset() if td is None else td
    out = []
    for action in actions:
        td.set(("agents", "action"), action)
        data, td = env.step_and_maybe_reset(td)
        out.append(data)
    return torch.stack(out), td


@pytest.mark.parametrize(
    ("scenario", "kwargs"),
    [
        ("balance", {"n_agents": 4}),
        ("simple_speaker_listener", {}),  # agents with different observation and action sizes
        ("diff_drive", {}),  # different action sizes
    ],
)
def test_check_env_specs(scenario: str, kwargs: dict) -> None:
    env = VMASEnv(scenario, num_envs=3, seed=0, **kwargs)
    check_env_specs(env)
    assert len(env.agent_names) == env.n_agents == len(env.observation_sizes) == len(env.action_sizes)
    assert env.state_size == sum(env.observation_sizes)
    assert env.observation_mask.sum(-1).tolist() == env.observation_sizes
    assert env.action_mask.sum(-1).tolist() == env.action_sizes


def test_keys_shapes_dtypes_and_attributes() -> None:
    env = VMASEnv("balance", num_envs=5, max_episode_steps=50, seed=0, n_agents=4)
    assert (env.scenario, env.num_envs, env.max_episode_steps, env.n_agents) == ("balance", 5, 50, 4)
    assert VMASEnv.simulates_on_device is True
    assert env.observation_sizes == [16] * 4 and env.action_sizes == [2] * 4 and env.state_size == 64
    spec = env.full_action_spec["agents", "action"]
    assert spec.shape == (5, 4, 2) and spec.dtype == torch.float32
    assert (spec.space.low == -1).all() and (spec.space.high == 1).all()  # balance's u_range
    td = env.rand_step(env.reset())
    for key, shape, dtype in [
        (("agents", "observation"), (5, 4, 16), torch.float32),
        ("state", (5, 64), torch.float32),
        (("next", "agents", "observation"), (5, 4, 16), torch.float32),
        (("next", "state"), (5, 64), torch.float32),
        (("next", "reward"), (5, 1), torch.float32),
        (("next", "done"), (5, 1), torch.bool),
        (("next", "terminated"), (5, 1), torch.bool),
        (("next", "truncated"), (5, 1), torch.bool),
    ]:
        assert td[key].shape == shape and td[key].dtype == dtype, key
    # The state is the concatenation of the agents' observations.
    assert torch.equal(td["next", "state"], td["next", "agents", "observation"].reshape(5, -1))


def test_padding_of_unequal_observations_and_actions() -> None:
    env = VMASEnv("simple_speaker_listener", num_envs=2, seed=0)
    assert env.observation_sizes == [3, 11] and env.action_sizes == [5, 2]
    td = env.rand_step(env.reset())
    obs = td["next", "agents", "observation"]
    assert obs.shape == (2, 2, 11)
    assert (obs[:, 0, 3:] == 0).all()
    assert torch.equal(td["next", "state"], torch.cat([obs[:, 0, :3], obs[:, 1]], dim=-1))
    spec = env.full_action_spec["agents", "action"]
    # The speaker moves in [-1, 1] and speaks in [0, 1]; the listener's padding entries get [-1, 1].
    assert spec.space.low[0, 0].tolist() == [-1.0, -1.0, 0.0, 0.0, 0.0]
    assert spec.space.high[0, 0].tolist() == [1.0] * 5
    assert spec.space.low[0, 1].tolist() == [-1.0] * 5 and spec.space.high[0, 1].tolist() == [1.0] * 5


@pytest.mark.parametrize(("scenario", "kwargs"), [("balance", {"n_agents": 4}), ("transport", {})])
def test_matches_torchrl_vmas_env(scenario: str, kwargs: dict) -> None:
    """Same seed and actions: observations equal TorchRL's, the reward is the mean of its agents' rewards."""
    ref = VmasEnv(
        scenario,
        num_envs=4,
        seed=3,
        continuous_actions=True,
        group_map=MarlGroupMapType.ALL_IN_ONE_GROUP,
        **kwargs,
    )
    env = VMASEnv(scenario, num_envs=4, seed=3, max_episode_steps=1000, **kwargs)
    td_ref, td = ref.reset(), env.reset()
    assert torch.equal(td_ref["agents", "observation"], td["agents", "observation"])
    for action in _random_actions(env, 30, seed=1):
        td_ref.set(("agents", "action"), action)
        td.set(("agents", "action"), action)
        td_ref, td = ref.step(td_ref)["next"], env.step(td)["next"]
        assert torch.equal(td["reward"], td_ref["agents", "reward"].mean(-2))
        assert torch.equal(td["agents", "observation"], td_ref["agents", "observation"])
        assert torch.equal(td["terminated"], td_ref["terminated"])


def test_actions_are_clamped_into_bounds() -> None:
    env = VMASEnv("balance", num_envs=2, seed=0)
    other = VMASEnv("balance", num_envs=2, seed=0)
    td, td_other = env.reset(), other.reset()
    action = torch.full((2, env.n_agents, 2), 5.0)
    td.set(("agents", "action"), action)
    td_other.set(("agents", "action"), action.clamp(-1, 1))
    assert torch.equal(env.step(td)["next", "state"], other.step(td_other)["next", "state"])


def test_truncation_at_max_episode_steps() -> None:
    env = VMASEnv("balance", num_envs=3, max_episode_steps=5, seed=0)
    zeros = torch.zeros(12, 3, env.n_agents, 2)  # no force: the package stays on the line
    data, _ = _rollout(env, zeros)
    truncated = data["next", "truncated"].squeeze(-1)
    assert truncated[[4, 9]].all() and truncated.sum() == 6  # after 5 steps, then 5 more after the reset
    assert not data["next", "terminated"].any()
    assert torch.equal(data["next", "done"], data["next", "truncated"] | data["next", "terminated"])
    # The step after a truncation starts from a reset state.
    assert not torch.equal(data["agents", "observation"][5], data["next", "agents", "observation"][4])


def test_termination_is_vmas_done() -> None:
    """Lifting one end of the line drops balance's package on the floor: VMAS's done, as terminated."""
    env = VMASEnv("balance", num_envs=2, max_episode_steps=1000, seed=0)
    tilt = torch.zeros(150, 2, env.n_agents, 2)
    tilt[:, :, 0, 1] = 1.0  # the leftmost agent pushes up
    data, _ = _rollout(env, tilt)
    terminated = data["next", "terminated"].squeeze(-1)
    assert terminated.any() and not data["next", "truncated"].any()


@pytest.mark.parametrize("device", DEVICES)
def test_partial_reset(device: str) -> None:
    env = VMASEnv("balance", num_envs=3, max_episode_steps=6, seed=0, device=device)
    td = env.reset()
    data, td = _rollout(env, _random_actions(env, 3, seed=0), td)
    before = td.clone()
    td["_reset"] = torch.tensor([[False], [True], [False]], device=device)
    after = env.reset(td)
    obs_before, obs_after = before["agents", "observation"], after["agents", "observation"]
    assert torch.equal(obs_after[[0, 2]], obs_before[[0, 2]])
    assert not torch.equal(obs_after[1], obs_before[1])
    # The reset environment's episode restarts: the others truncate 3 steps later, it 6 steps later.
    data, _ = _rollout(env, _random_actions(env, 6, seed=1), after)
    truncated = data["next", "truncated"].squeeze(-1)
    assert truncated[:, 0].nonzero().flatten().tolist() == [2]
    assert truncated[:, 2].nonzero().flatten().tolist() == [2]
    assert truncated[:, 1].nonzero().flatten().tolist() == [5]


def _loaded(env: VMASEnv, state: dict, actions: torch.Tensor) -> VMASEnv:
    """``env`` stepped once (so that every attribute of the scenario exists), then loaded with ``state``."""
    _rollout(env, actions[:1])
    env.set_extra_state(state)
    return env


def _stepped(env: VMASEnv, actions: torch.Tensor) -> TensorDict:
    """Observations, rewards, terminations ``[steps, num_envs]`` of ``env.step`` from its state (no reset)."""
    td = TensorDict({}, batch_size=env.batch_size, device=env.device)
    out = []
    for action in actions:
        td = env.step(td.set(("agents", "action"), action))["next"]
        out.append(td.select(("agents", "observation"), "reward", "terminated"))
    return torch.stack(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("scenario", "as_full_reset"),
    [("balance", True), ("transport", True), ("simple_push", False)],  # simple_push: a goal shared by all
)
def test_partial_reset_is_a_full_reset_of_the_selected_envs_only(
    scenario: str, as_full_reset: bool, device: str
) -> None:
    """The reset envs start (and go on) as after VMAS's full reset from the same streams; the others go on as
    if there had been no reset, shared state included. Per-index ``reset_at`` calls fail the first (other
    random draws); so does a merge that misses a per-environment tensor (e.g. balance's reward shaping)."""
    kwargs = {"num_envs": 6, "max_episode_steps": 1000, "device": device}
    env = VMASEnv(scenario, seed=5, **kwargs)  # simple_push: its full reset picks the other goal
    actions = _random_actions(env, 12, seed=0)
    _, td = _rollout(env, actions[:4])
    before, previous = env.get_extra_state(), td["agents", "observation"].clone()
    mask = torch.tensor([True, False, False, True, False, True], device=device)
    td["_reset"] = mask.unsqueeze(-1)
    reset = env.reset(td)["agents", "observation"]
    after = env.get_extra_state()
    full = _loaded(VMASEnv(scenario, seed=2, **kwargs), before, actions)
    full_reset = full.reset()["agents", "observation"]
    untouched = _loaded(VMASEnv(scenario, seed=3, **kwargs), {**before, "rng": after["rng"]}, actions)

    assert torch.equal(reset[~mask], previous[~mask])
    assert not torch.equal(reset[mask], previous[mask])
    assert torch.equal(after["elapsed"], torch.where(mask.cpu(), 0, before["elapsed"]))
    assert (after["numbers"], after["references"]) == (before["numbers"], before["references"])
    got, expected_reset, expected_untouched = (_stepped(e, actions[4:]) for e in (env, full, untouched))
    assert (got[:, ~mask] == expected_untouched[:, ~mask]).all()
    if as_full_reset:
        assert torch.equal(reset[mask], full_reset[mask])
        assert (got[:, mask] == expected_reset[:, mask]).all()


def test_partial_reset_of_no_env_changes_nothing() -> None:
    actions = _random_actions(VMASEnv("balance", num_envs=3, seed=0), 8, seed=5)
    env, other = (VMASEnv("balance", num_envs=3, seed=4) for _ in range(2))
    _, td = _rollout(env, actions[:4])
    _rollout(other, actions[:4])
    previous = td["agents", "observation"].clone()
    td["_reset"] = torch.zeros(3, 1, dtype=torch.bool)
    assert torch.equal(env.reset(td)["agents", "observation"], previous)
    assert (_stepped(env, actions[4:]) == _stepped(other, actions[4:])).all()


def test_same_seed_same_rollout_and_set_seed() -> None:
    actions = _random_actions(VMASEnv("balance", num_envs=4, seed=0), 40, seed=2)
    first, _ = _rollout(VMASEnv("balance", num_envs=4, max_episode_steps=15, seed=7), actions)
    second, _ = _rollout(VMASEnv("balance", num_envs=4, max_episode_steps=15, seed=7), actions)
    assert (first == second).all()
    other, _ = _rollout(VMASEnv("balance", num_envs=4, max_episode_steps=15, seed=8), actions)
    assert not torch.equal(first["agents", "observation"], other["agents", "observation"])

    env = VMASEnv("balance", num_envs=4, max_episode_steps=15, seed=0)
    env.set_seed(7)
    a, _ = _rollout(env, actions)
    env.set_seed(7)
    b, _ = _rollout(env, actions)
    assert (a == b).all()


def test_random_streams_are_per_env() -> None:
    """Another VMAS env stepped (and seeded) in between changes nothing, nor do the global generators."""
    actions = _random_actions(VMASEnv("balance", num_envs=2, seed=0), 30, seed=3)
    alone, _ = _rollout(VMASEnv("balance", num_envs=2, max_episode_steps=10, seed=5), actions)

    env = VMASEnv("balance", num_envs=2, max_episode_steps=10, seed=5)
    other = VMASEnv("balance", num_envs=2, max_episode_steps=3, seed=1)
    td, td_other = env.reset(), other.reset()
    out = []
    for action in actions:
        td.set(("agents", "action"), action)
        data, td = env.step_and_maybe_reset(td)
        out.append(data)
        other.set_seed(11)
        _, td_other = other.rand_step(td_other), other.reset()
        torch.manual_seed(123)
    assert (torch.stack(out) == alone).all()

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    env = VMASEnv("balance", num_envs=2, seed=4)
    env.rollout(5, policy=lambda td: td.set(("agents", "action"), torch.zeros(2, env.n_agents, 2)))
    assert torch.equal(torch.rand(3), expected)


def test_unseeded_env_draws_its_seed_from_torch() -> None:
    torch.manual_seed(1)
    a = VMASEnv("balance", num_envs=2).reset()
    torch.manual_seed(1)
    b = VMASEnv("balance", num_envs=2).reset()
    assert torch.equal(a["agents", "observation"], b["agents", "observation"])


@pytest.mark.parametrize(
    ("scenario", "kwargs"),
    [
        ("balance", {"n_agents": 4}),
        ("simple_push", {}),  # picks an agent's goal landmark at random: a reference in the state
        ("football", {}),  # heuristic opponents keep tensors in dicts keyed by agents
    ],
)
def test_state_dict_resumes_exactly(scenario: str, kwargs: dict) -> None:
    actions = _random_actions(VMASEnv(scenario, num_envs=3, seed=0, **kwargs), 24, seed=4)
    env = VMASEnv(scenario, num_envs=3, max_episode_steps=7, seed=1, **kwargs)
    _, td = _rollout(env, actions[:10])
    buffer = io.BytesIO()
    torch.save(env.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = VMASEnv(scenario, num_envs=3, max_episode_steps=7, seed=99, **kwargs)
    _rollout(resumed, actions[:3])  # a different state and random streams, all overwritten
    resumed.load_state_dict(state)
    expected, _ = _rollout(env, actions[10:], td.clone())  # crosses truncations: resets draw from the streams
    got, _ = _rollout(resumed, actions[10:], td.clone())
    assert (expected == got).all()


def test_state_dict_of_other_config_is_refused() -> None:
    state = VMASEnv("balance", num_envs=2, seed=0).state_dict()
    with pytest.raises(ValueError, match="num_envs=2"):
        VMASEnv("balance", num_envs=3, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="agent_names"):
        VMASEnv("balance", num_envs=2, seed=0, n_agents=4).load_state_dict(state)
    with pytest.raises(ValueError, match="Not a VMASEnv state"):
        VMASEnv("balance", num_envs=2, seed=0).load_state_dict({"_extra_state": {"format": 99}})


def test_unknown_scenario_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Unknown VMAS scenario 'no_such'.*balance.*transport"):
        VMASEnv("no_such")
    assert "balance" in vmas_scenarios()
    with pytest.raises(ValueError, match="num_envs"):
        VMASEnv("balance", num_envs=0)
    with pytest.raises(ValueError, match="max_episode_steps"):
        VMASEnv("balance", max_episode_steps=0)
    with pytest.raises(ValueError, match="max_steps"):
        VMASEnv("balance", max_steps=10)
    env = VMASEnv("balance", seed=0)
    assert env.to("cpu") is env
    with pytest.raises(ValueError, match="build it with device"):
        env.to("meta")


@pytest.mark.parametrize("device", DEVICES)
def test_simulates_on_its_device_and_reseeds(device: str) -> None:
    env = VMASEnv("balance", num_envs=4, seed=0, device=device)
    check_env_specs(env)  # draws from the env's streams: the rollouts below reseed first
    actions = _random_actions(env, 20, seed=0)
    assert actions.device.type == device
    env.set_seed(0)
    first, _ = _rollout(env, actions)
    assert first["next", "reward"].device.type == device
    env.set_seed(0)
    again, _ = _rollout(env, actions)
    assert (first == again).all()


class _DeviceProbe(L.Callback):
    """Records where the collector's environment and the rollout data live during training."""

    def on_train_batch_end(self, trainer: L.Trainer, module, *args) -> None:
        self.env_device = module._collector.env.device
        self.module_device = module.device


@pytest.mark.parametrize("algorithm", ["mappo", "fp3o"])
@pytest.mark.parametrize(
    "accelerator",
    ["cpu", pytest.param("gpu", marks=NEEDS_CUDA)],
)
def test_training_runs_the_whole_loop_on_the_training_device(algorithm: str, accelerator: str) -> None:
    """Through the registry: the environment is simulated where the module trains (CUDA when used)."""
    env = make_env("vmas", scenario="balance", num_envs=2, n_agents=3)
    assert isinstance(env, VMASEnv) and env.n_agents == 3
    module = FP3OModule(
        env={"name": "vmas", "scenario": "balance", "max_episode_steps": 20},
        num_envs=2,
        rollout_length=32,
        total_frames=128,
        algorithm=algorithm,
        sharing="fups",
        num_minibatches=2,
        ppo_epochs=1,
        eval_interval=0,
        diagnostics_interval=0,
        checkpoint_interval=0,
    )
    probe = _DeviceProbe()
    fit_quietly(module, accelerator=accelerator, callbacks=[probe])
    assert module.frames == 128 and module.iteration == 2
    assert probe.env_device == probe.module_device and probe.module_device.type == accelerator.replace(
        "gpu", "cuda"
    )
