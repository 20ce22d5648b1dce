"""MaMuJoCo on MuJoCo Warp (``backend: warp``), run on the CPU: the same task as the CPU backend, exactly
where the physics is deterministic and in its statistics under contacts; resets, seeding, flags, states."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchrl.envs.utils import check_env_specs

from fp3o_lightning.envs import MaMuJoCoEnv, make_env
from fp3o_lightning.errors import ConfigError
from fp3o_lightning.module import FP3OModule

from .conftest import CUDA, NEEDS_CUDA, fit_quietly

pytest.importorskip("mujoco_warp", reason="MuJoCo Warp: pip install -e '.[warp]'")
from fp3o_lightning.envs.mamujoco_task import ResetNoise  # noqa: E402
from fp3o_lightning.envs.mamujoco_warp import _STATE_FIELDS  # noqa: E402

PAPER_TASKS = [
    ("HalfCheetah", "6x1"),
    ("Hopper", "3x1"),
    ("Walker2d", "2x3"),
    ("Ant", "2x4"),
    ("Reacher", "2x1"),
    ("ManySegmentSwimmer", "8x2"),
]


def warp_env(scenario: str, agent_conf: str, num_envs: int = 4, **options):
    return make_env(
        "mamujoco", backend="warp", scenario=scenario, agent_conf=agent_conf, num_envs=num_envs, **options
    )


def copy_state(cpu: MaMuJoCoEnv, warp) -> None:
    """Every world of ``warp`` in the state (and derived arrays) of the CPU backend's sub-env of its index."""
    for name in _STATE_FIELDS:
        shape = warp._views[name][0].shape
        values = np.stack([np.asarray(getattr(sim.data, name)).reshape(shape) for sim in cpu._sims])
        warp._views[name].copy_(torch.from_numpy(values).to(warp.device))
    warp._elapsed.copy_(torch.from_numpy(cpu._elapsed).to(warp.device))


def advanced_cpu_env(scenario: str, agent_conf: str, num_envs: int, steps: int, **options) -> tuple:
    """A CPU backend env after ``steps`` random steps (resets included), and its last output."""
    cpu = MaMuJoCoEnv(scenario, agent_conf, num_envs=num_envs, seed=0, **options)
    tensordict = cpu.reset()
    for _ in range(steps):
        tensordict = cpu.step(cpu.rand_action(tensordict))["next"]
        if tensordict["done"].any():
            tensordict = cpu.reset()
    return cpu, tensordict


@pytest.mark.parametrize(("scenario", "agent_conf"), PAPER_TASKS)
def test_one_step_from_the_same_state_equals_the_cpu_backend(scenario: str, agent_conf: str) -> None:
    """Observations, state, reward and termination of one step from the same state (float32 against C
    MuJoCo's float64), on every paper task, the official observation layout where it differs. Ant is taken
    in the air, a metre above its start: MuJoCo Warp's capsule-plane contact frames differ from C MuJoCo's
    (the statistics test compares it under contacts)."""
    import mujoco

    layout = "official" if scenario in ("Hopper", "Walker2d", "Ant") else "gymnasium"
    steps = 0 if scenario == "Ant" else 30
    cpu, tensordict = advanced_cpu_env(
        scenario, agent_conf, 5, steps, agent_obsk=5, observation_layout=layout
    )
    if scenario == "Ant":  # no contact during the step
        for sim in cpu._sims:
            sim.data.qpos[2] += 1.0
            mujoco.mj_forward(sim.model, sim.data)
    warp = warp_env(scenario, agent_conf, 5, agent_obsk=5, observation_layout=layout)
    assert (warp.observation_sizes, warp.state_size) == (cpu.observation_sizes, cpu.state_size)
    copy_state(cpu, warp)
    action = cpu.rand_action(tensordict)
    expected, got = cpu.step(action.clone())["next"], warp.step(action.clone())["next"]
    for key in (("agents", "observation"), "state"):
        torch.testing.assert_close(got[key], expected[key], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got["reward"], expected["reward"], rtol=1e-4, atol=1e-3)
    assert torch.equal(got["terminated"], expected["terminated"])
    assert torch.equal(got["truncated"], expected["truncated"])


@pytest.mark.parametrize(("scenario", "agent_conf"), [("Reacher", "2x1"), ("ManySegmentSwimmer", "8x2")])
def test_contact_free_tasks_stay_close_over_many_steps(scenario: str, agent_conf: str) -> None:
    cpu, tensordict = advanced_cpu_env(scenario, agent_conf, 3, 5)
    warp = warp_env(scenario, agent_conf, 3)
    copy_state(cpu, warp)
    for _ in range(40):
        action = cpu.rand_action(tensordict)
        tensordict, got = cpu.step(action.clone())["next"], warp.step(action.clone())["next"]
        torch.testing.assert_close(got["state"], tensordict["state"], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got["reward"], tensordict["reward"], rtol=2e-2, atol=2e-2)


def random_policy_statistics(env, steps: int) -> dict[str, np.ndarray]:
    """Per-step rewards, terminations and finished episodes' lengths under uniform random actions."""
    tensordict = env.reset()
    rewards, terminated, lengths, length = [], [], [], np.zeros(env.num_envs)
    for _ in range(steps):
        tensordict, following = env.step_and_maybe_reset(env.rand_action(tensordict))
        out = tensordict["next"]
        rewards.append(out["reward"].view(-1).numpy().copy())
        terminated.append(out["terminated"].view(-1).numpy().copy())
        length += 1
        done = out["done"].view(-1).numpy()
        lengths += length[done].tolist()
        length[done] = 0
        tensordict = following
    return {
        "reward": np.concatenate(rewards),
        "terminated": np.concatenate(terminated),
        "length": np.array(lengths),
    }


def assert_same_mean(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """Means within 4 standard errors (independent samples; per-step values are correlated within an
    episode, which the 4 allows for)."""
    error = np.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) < 4 * error + 1e-6, (what, a.mean(), b.mean(), error)


@pytest.mark.parametrize(
    ("scenario", "agent_conf"),
    [("Hopper", "3x1"), pytest.param("Ant", "2x4", marks=pytest.mark.slow)],
)
def test_statistics_under_contacts_agree_with_the_cpu_backend(scenario: str, agent_conf: str) -> None:
    """Contact frames differ from C MuJoCo's, so trajectories diverge; under a random policy over many
    worlds the mean reward (forward velocity, healthy reward, control and contact costs), the termination
    rate and the episode length agree within their confidence intervals."""
    steps = 300
    cpu = random_policy_statistics(MaMuJoCoEnv(scenario, agent_conf, num_envs=32, seed=1), steps)
    warp = random_policy_statistics(warp_env(scenario, agent_conf, 32, seed=2), steps)
    assert_same_mean(warp["reward"], cpu["reward"], "reward")
    assert_same_mean(warp["terminated"].astype(float), cpu["terminated"].astype(float), "termination rate")
    assert len(cpu["length"]) > 50 and len(warp["length"]) > 50
    assert_same_mean(warp["length"], cpu["length"], "episode length")


@pytest.mark.parametrize(
    ("scenario", "agent_conf"), [("HalfCheetah", "6x1"), ("Hopper", "3x1"), ("Reacher", "2x1")]
)
def test_reset_noise_follows_gymnasiums_reset_model(scenario: str, agent_conf: str) -> None:
    """The starts' distributions: Gymnasium's ``reset_model`` (uniform or normal noise around the initial
    state; Reacher's goal uniform in the disc of radius 0.2, at rest), compared with Gymnasium's own draws."""
    sim = MaMuJoCoEnv(scenario, agent_conf)._sims[0]
    noise = ResetNoise.of(sim)
    qpos, qvel = noise.sample(20_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    gym_qpos, gym_qvel = [], []
    for seed in range(3000):
        sim.reset(seed=seed)
        gym_qpos.append(sim.data.qpos.copy())
        gym_qvel.append(sim.data.qvel.copy())
    for ours, theirs in ((qpos.numpy(), np.array(gym_qpos)), (qvel.numpy(), np.array(gym_qvel))):
        np.testing.assert_allclose(
            ours.mean(0), theirs.mean(0), atol=4 * theirs.std(0).max() / np.sqrt(3000) + 1e-9
        )
        np.testing.assert_allclose(ours.std(0), theirs.std(0), rtol=0.08, atol=1e-9)
    uniform = qpos[:, :-2] if scenario == "Reacher" else qpos  # qpos noise: uniform in [-scale, scale]
    assert ((uniform - torch.from_numpy(noise.init_qpos[: uniform.shape[1]])).abs() <= noise.scale).all()
    if scenario == "Reacher":
        assert (qpos[:, -2:].norm(dim=1) < 0.2).all() and (qvel[:, -2:] == 0).all()


def test_masked_resets_restart_only_the_masked_worlds() -> None:
    env = warp_env("Hopper", "3x1", 4, seed=0)
    tensordict = env.reset()
    for _ in range(10):
        tensordict = env.step(env.rand_action(tensordict))["next"]
    before = env._views["qpos"].clone()
    mask = torch.tensor([True, False, True, False])
    reset = env.reset(tensordict.set("_reset", mask.unsqueeze(-1)))
    after = env._views["qpos"]
    assert torch.equal(after[~mask], before[~mask]) and env._elapsed.tolist() == [0, 10, 0, 10]
    init = torch.from_numpy(env._noise.init_qpos).float()
    assert ((after[mask] - init).abs() <= env._noise.scale + 1e-6).all()
    torch.testing.assert_close(
        reset["state"][mask], torch.cat([after[mask, 1:], env._views["qvel"][mask]], 1)
    )


def test_same_seed_same_rollout_and_other_seeds_differ() -> None:
    rollouts = [
        warp_env("Hopper", "3x1", 3, seed=seed).rollout(20, break_when_any_done=False) for seed in (5, 5, 6)
    ]
    assert torch.equal(rollouts[0]["next", "state"], rollouts[1]["next", "state"])
    assert not torch.equal(rollouts[0]["next", "state"], rollouts[2]["next", "state"])


def test_time_limit_truncates() -> None:
    rollout = warp_env("HalfCheetah", "6x1", 2, seed=0, max_episode_steps=5).rollout(
        12, break_when_any_done=False
    )
    truncated = rollout["next", "truncated"].squeeze(-1)
    assert truncated.nonzero()[:, 1].unique().tolist() == [4, 9]
    assert (
        torch.equal(rollout["next", "done"], rollout["next", "truncated"])
        and not rollout["next", "terminated"].any()
    )


def test_non_finite_worlds_are_reset_and_counted() -> None:
    env = warp_env("HalfCheetah", "6x1", 3, seed=0)
    tensordict = env.reset()
    env._views["qvel"][1, 0] = float("nan")
    out = env.step(env.rand_action(tensordict))["next"]
    assert out["faulted"].view(-1).tolist() == [False, True, False]
    assert out["reward"][1].item() == 0 and out["truncated"][1].item() and not out["terminated"][1].item()
    assert torch.isfinite(env._views["qvel"]).all() and env.nonfinite_resets == 1
    assert torch.isfinite(out["agents", "observation"]).all() and env._elapsed.tolist() == [1, 0, 1]


def test_spec_contract_and_contact_buffers() -> None:
    env = warp_env("Ant", "2x4", 2, seed=0)
    check_env_specs(env)
    assert env.nconmax >= 16 and env.njmax >= 16
    tight = warp_env("Ant", "2x4", 2, seed=0, nconmax=1, njmax=8)
    with pytest.raises(RuntimeError, match=r"ran out of contact buffers .* Raise model.env.nconmax \(now 1"):
        tight.rollout(100)


def test_what_warp_cannot_run_says_so_and_names_the_cpu_backend() -> None:
    with pytest.raises(ValueError, match="does not support the PGS constraint solver.*use backend 'cpu'"):
        warp_env("Humanoid", "9|8", 1)
    with pytest.raises(ValueError, match="knows the rewards of the v5 locomotion tasks and Reacher only"):
        warp_env("Pusher", "3p", 1)
    with pytest.raises(
        ConfigError,
        match="model.env.backend: env 'mamujoco' has no backend 'gpu'; its backends: 'cpu', 'warp'",
    ):
        FP3OModule(env={"name": "mamujoco", "scenario": "Hopper", "agent_conf": "3x1", "backend": "gpu"})


def test_saved_state_continues_exactly() -> None:
    first = warp_env("Hopper", "3x1", 3, seed=0)
    tensordict = first.reset()
    for _ in range(5):
        tensordict = first.step(first.rand_action(tensordict))["next"]
    second = warp_env("Hopper", "3x1", 3, seed=9)
    second.load_state_dict(first.state_dict())
    action = first.rand_action(tensordict)
    assert torch.equal(action["agents", "action"], second.rand_action(tensordict)["agents", "action"])
    assert torch.equal(
        first.step(action.clone())["next"]["state"], second.step(action.clone())["next"]["state"]
    )


WARP_HOPPER = {
    "name": "mamujoco",
    "scenario": "Hopper",
    "agent_conf": "3x1",
    "backend": "warp",
    "max_episode_steps": 50,
}


@pytest.mark.parametrize(("algorithm", "sharing"), [("fp3o", "nops"), ("mappo", "fups")])
def test_training_on_the_warp_backend(algorithm: str, sharing: str) -> None:
    module = FP3OModule(
        env=WARP_HOPPER,
        algorithm=algorithm,
        sharing=sharing,
        num_envs=8,
        rollout_length=25,
        total_frames=400,
        num_minibatches=2,
        ppo_epochs=2,
        eval_episodes=4,
        eval_num_envs=4,
    )
    assert module.env_device == module.device  # simulated where the module is
    fit_quietly(module)
    assert module.frames == 400
    assert torch.isfinite(module.evaluate()["returns"]).all()


def test_a_crashed_warp_run_resumes_exactly(tmp_path, monkeypatch) -> None:

    from .test_resume import crash_and_resume, run_metrics

    args = [
        "fit",
        f"--model.env={json.dumps(WARP_HOPPER)}",
        "--model.num_envs=4",
        "--model.rollout_length=25",
    ]
    args += ["--model.total_frames=500", "--model.num_minibatches=2", "--model.ppo_epochs=2"]
    args += ["--model.eval_interval=2", "--model.eval_episodes=2", "--model.checkpoint_interval=1"]
    args += ["--trainer.enable_progress_bar=false"]
    reference, crashed = crash_and_resume(tmp_path, monkeypatch, args)
    assert run_metrics(crashed) == run_metrics(reference)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_the_frame_skip_loop_captured_as_a_cuda_graph_steps_like_the_loop(device: str) -> None:
    """With ``graph`` (CUDA: captured at the second step, replayed after) the worlds follow the same
    trajectory as without, to float rounding; on the CPU ``graph`` changes nothing."""
    rollouts = []
    for graph in (True, False):
        env = warp_env("Hopper", "3x1", 16, seed=0, device=device, graph=graph)
        torch.manual_seed(0)
        rollouts.append(env.rollout(10, break_when_any_done=False)["next", "state"].cpu())
        assert (env._graph is not None) == (graph and device == "cuda")
    torch.testing.assert_close(rollouts[0], rollouts[1], rtol=1e-5, atol=1e-5)


@NEEDS_CUDA
@pytest.mark.parametrize(("scenario", "agent_conf"), [("HalfCheetah", "6x1"), ("Hopper", "3x1")])
def test_one_step_on_cuda_equals_the_cpu_backend(scenario: str, agent_conf: str) -> None:
    cpu, tensordict = advanced_cpu_env(scenario, agent_conf, 4, 20)
    warp = warp_env(scenario, agent_conf, 4, device="cuda")
    copy_state(cpu, warp)
    action = cpu.rand_action(tensordict)
    expected, got = cpu.step(action.clone())["next"], warp.step(action.to("cuda"))["next"].cpu()
    torch.testing.assert_close(got["state"], expected["state"], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got["reward"], expected["reward"], rtol=1e-4, atol=1e-3)


def test_the_warp_worlds_simulate_the_model_given() -> None:
    """``xml_file`` reaches the Warp model: gym v2's Walker2d, right foot friction 0.9 (v5: 1.9)."""
    import mujoco

    for xml_file, right in ((None, 1.9), ("walker2d.xml", 0.9)):
        env = warp_env("Walker2d", "2x3", 2, xml_file=xml_file)
        foot = mujoco.mj_name2id(env._task._sims[0].model, mujoco.mjtObj.mjOBJ_GEOM, "foot_geom")
        friction = env._model.geom_friction.numpy().reshape(-1, env._task._sims[0].model.ngeom, 3)
        assert friction[0, foot, 0] == pytest.approx(right) and env.xml_file == xml_file


def test_the_warp_worlds_step_the_timestep_given() -> None:
    """``timestep`` reaches the Warp model and the reward's ``dt``: the paper code's Manyagent Swimmer."""
    env = warp_env("ManySegmentSwimmer", "8x2", 2, timestep=0.005)
    assert float(env._model.opt.timestep.numpy().ravel()[0]) == pytest.approx(0.005)
    assert env._dynamics.dt == pytest.approx(0.02) and env.timestep == 0.005


def test_the_warp_rewards_take_the_gym_kwargs() -> None:
    """``gym_kwargs`` reach the Warp backend's reward terms: Ant without contact cost."""
    env = warp_env("Ant", "2x4", 2, gym_kwargs={"contact_cost_weight": 0})
    assert env.gym_kwargs == {"contact_cost_weight": 0} and env._dynamics.contact_cost_weight == 0
    assert warp_env("Ant", "2x4", 2)._dynamics.contact_cost_weight == pytest.approx(5e-4)
