"""Every device combination trains, evaluates and resumes: the environment simulates where it simulates
(the CPU for MaMuJoCo and SMAX, the training device for VMAS); everything after the rollout runs on
the Trainer's device. The CUDA cases run where CUDA is, and are skipped elsewhere. Masked discrete
actions are covered without JAX by the test-only game of ``tests/masked_game.py`` (simulated on the CPU,
or on the training device), which raises on any unavailable action."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from fp3o_lightning.cli import main
from fp3o_lightning.envs import ENV_REGISTRY, env_class

from .conftest import CUDA, NEEDS_CUDA, fit_quietly, small_module

HOPPER = {"name": "mamujoco", "scenario": "Hopper", "agent_conf": "3x1", "max_episode_steps": 40}
SMAX = {"name": "smax", "map_name": "3m", "max_episode_steps": 40}
VMAS = {"name": "vmas", "scenario": "balance", "n_agents": 3, "max_episode_steps": 40}
MASKED = {"name": "masked_game", "max_episode_steps": 20}
MASKED_ON_DEVICE = {"name": "masked_game_on_device", "max_episode_steps": 20}
RNN = {"actor_network": "rnn", "data_chunk_length": 8}
PACKAGE_ENVS = frozenset(ENV_REGISTRY)  # before the fixtures add the test-only games

pytestmark = pytest.mark.usefixtures("masked_game")  # registers the MASKED envs


def _needs(module: str) -> pytest.MarkDecorator:
    missing = importlib.util.find_spec(module) is None
    return pytest.mark.skipif(missing, reason=f"{module} is not installed")


CASES = {
    "mamujoco-fups-mlp-fp3o": ({"env": HOPPER, "sharing": "fups"}, []),
    "mamujoco-paps-rnn-fp3o": (
        {"env": HOPPER, "sharing": "paps", "actor_network": "rnn", "data_chunk_length": 8},
        [],
    ),
    "mamujoco-nops-mlp-happo": ({"env": HOPPER, "sharing": "nops", "algorithm": "happo"}, []),
    "mamujoco-nops-mlp-ippo": ({"env": HOPPER, "sharing": "nops", "algorithm": "ippo"}, []),
    "smax-nops-rnn-fp3o": (
        {"env": SMAX, "sharing": "nops", "actor_network": "rnn", "data_chunk_length": 8},
        [_needs("jaxmarl")],
    ),
    "vmas-fups-mlp-mappo": ({"env": VMAS, "sharing": "fups", "algorithm": "mappo"}, [_needs("vmas")]),
    "masked-fups-mlp-fp3o": ({"env": MASKED, "sharing": "fups"}, []),
    "masked-paps-rnn-happo": ({"env": MASKED, "sharing": "paps", "algorithm": "happo", **RNN}, []),
    "masked-nops-mlp-ippo": ({"env": MASKED, "sharing": "nops", "algorithm": "ippo"}, []),
    "masked_on_device-nops-rnn-fp3o": ({"env": MASKED_ON_DEVICE, "sharing": "nops", **RNN}, []),
}
#: The cases that run on the CPU by default: the first, and the masked game's (a few seconds each).
CPU_BY_DEFAULT = {"mamujoco-fups-mlp-fp3o"} | {name for name in CASES if name.startswith("masked")}


def _params():
    """The whole matrix on CUDA; on the CPU ``CPU_BY_DEFAULT`` (the CPU paths have tests of their own),
    the others marked slow."""
    for name, (options, marks) in CASES.items():
        cpu_marks = marks if name in CPU_BY_DEFAULT else [*marks, pytest.mark.slow]
        yield pytest.param(options, "cpu", marks=cpu_marks, id=f"{name}-cpu")
        yield pytest.param(options, "cuda", marks=[*marks, NEEDS_CUDA], id=f"{name}-cuda")


class DeviceProbe(L.Callback):
    """Records, after every training iteration, where the parameters, the rollout policy and the
    environment are, and whether the rollout policy's weights equal the module's."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        rollout_policy = module._collector.policy
        rollout_state = rollout_policy.state_dict()
        synced = all(
            torch.equal(value.cpu(), rollout_state[f"policy.{name}"].cpu())
            for name, value in module.policy.state_dict().items()
        )
        self.seen.append(
            {
                "parameters": {p.device.type for p in module.parameters()},
                "rollout_policy": {p.device.type for p in rollout_policy.parameters()},
                "env": module.base_env.device.type,
                "synced": synced,
            }
        )


@pytest.mark.parametrize(("options", "accelerator"), list(_params()))
def test_fits_validates_and_tests_on_the_device(options: dict, accelerator: str) -> None:
    module = small_module(
        **options, rollout_length=32, num_minibatches=2, total_frames=128, eval_interval=1, eval_episodes=2
    )
    probe = DeviceProbe()
    trainer = fit_quietly(module, accelerator=accelerator, limit_val_batches=1.0, callbacks=[probe])
    simulated_on_device = getattr(env_class(options["env"]["name"]), "simulates_on_device", False)
    env_device = accelerator if simulated_on_device else "cpu"
    assert (
        probe.seen
        == [{"parameters": {accelerator}, "rollout_policy": {env_device}, "env": env_device, "synced": True}]
        * 2
    )
    assert module.iteration == 2
    for metrics in (trainer.validate(module, verbose=False), trainer.test(module, verbose=False)):
        (values,) = metrics
        assert all(torch.isfinite(torch.tensor(v)) for v in values.values())
    assert all(torch.isfinite(p).all() for p in module.parameters())


def _resumes():
    """MaMuJoCo, and the masked game simulated on the training device with a GRU actor (its state,
    masks and hidden states cross devices); a CPU-to-CPU control of the latter runs everywhere."""
    masked = (MASKED_ON_DEVICE, {"sharing": "paps", **RNN})
    for name, (env, options) in {"mamujoco": (HOPPER, {}), "masked_on_device-paps-rnn": masked}.items():
        for first, second in (("cuda", "cpu"), ("cpu", "cuda")):
            yield pytest.param(env, options, first, second, marks=NEEDS_CUDA, id=f"{name}-{first}-{second}")
    yield pytest.param(*masked, "cpu", "cpu", id="masked_on_device-paps-rnn-cpu-cpu")


@pytest.mark.parametrize(("env", "options", "first", "second"), list(_resumes()))
def test_a_checkpoint_resumes_on_the_other_device(
    tmp_path, monkeypatch, env: dict, options: dict, first: str, second: str
) -> None:
    """A run checkpointed on one device continues on the other (GPU to a CPU-only machine, and back)."""
    monkeypatch.chdir(tmp_path)
    args = [
        f"--model.env={json.dumps(env)}",
        *(f"--model.{key}={value}" for key, value in options.items()),
        "--model.num_envs=2",
        "--model.rollout_length=40",
        "--model.total_frames=160",
        "--model.num_minibatches=2",
        "--model.ppo_epochs=1",
        "--model.eval_interval=0",
        "--model.checkpoint_interval=1",
        "--trainer.enable_progress_bar=false",
    ]
    main(["fit", *args, f"--trainer.accelerator={first}", "--trainer.max_steps=1"])
    resume = ["fit", *args, f"--trainer.accelerator={second}", "--ckpt_path=last"]
    if second == "cpu" and first == "cuda" and env["name"] in PACKAGE_ENVS:
        # A CPU-only machine for real: a process that sees no GPU (test-only envs are not registered there).
        hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        subprocess.run([sys.executable, "-m", "fp3o_lightning.cli", *resume], env=hidden, check=True)
    else:
        main(resume)
    (last,) = tmp_path.glob("checkpoints/*/last.ckpt")
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["fp3o"]["iteration"] == 2
    assert checkpoint["fp3o"]["frames"] == 160


@NEEDS_CUDA
@_needs("OpenGL")  # MuJoCo's EGL backend
def test_render_from_a_cuda_module(tmp_path) -> None:
    from fp3o_lightning.render import render_episode

    module = small_module(env=HOPPER).cuda()
    path = render_episode(module, tmp_path / "episode.gif", steps=5, width=64, height=64)
    assert path.stat().st_size > 0


@NEEDS_CUDA
def test_rollout_policy_on_the_trainer_device_option() -> None:
    module = small_module(env=HOPPER, rollout_device="trainer", total_frames=64, rollout_length=32)
    probe = DeviceProbe()
    fit_quietly(module, accelerator="cuda", callbacks=[probe])
    assert probe.seen[0]["rollout_policy"] == {"cuda"} and probe.seen[0]["env"] == "cpu"


@NEEDS_CUDA
def test_evaluation_follows_the_module_onto_cuda() -> None:
    """An environment that simulates on the module's device is rebuilt there for evaluation."""
    module = small_module(env=MASKED_ON_DEVICE, eval_episodes=2, eval_num_envs=2)
    first = module.evaluate()["returns"]
    assert module._runtime["eval_env"].device == torch.device("cpu")
    module.cuda()
    second = module.evaluate()["returns"]
    assert module._runtime["eval_env"].device.type == "cuda" and torch.isfinite(second).all()
    assert first.shape == second.shape


class MatmulPrecisionProbe(L.Callback):
    def on_train_batch_end(self, trainer, module, *args) -> None:
        module._runtime["seen_precision"] = torch.get_float32_matmul_precision()


@pytest.mark.parametrize("accelerator", ["cpu", CUDA])
def test_matmul_precision_holds_while_the_run_trains(accelerator: str) -> None:
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        module = small_module(env=HOPPER, matmul_precision="high", total_frames=64, rollout_length=32)
        fit_quietly(module, accelerator=accelerator, callbacks=[MatmulPrecisionProbe()])
        assert module._runtime["seen_precision"] == "high"
        # given back when the run ends: a notebook's later work is not changed behind its back
        assert torch.get_float32_matmul_precision() == "highest"
        assert all(torch.isfinite(p).all() for p in module.parameters())
    finally:
        torch.set_float32_matmul_precision(before)
