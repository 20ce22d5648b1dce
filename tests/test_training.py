"""End-to-end: the CLI writes an MLflow run, configs parse, bad input is rejected, DDP stays in sync."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch
import yaml

from fp3o_lightning.cli import main
from fp3o_lightning.loggers import MetricsRecorder
from fp3o_lightning.module import FP3OModule

from .conftest import SMALL, fit_quietly, small_module

ROOT = Path(__file__).resolve().parents[1]
TASK_CONFIGS = [ROOT / "configs" / "quickstart.yaml"] + sorted(
    path for env in ("mamujoco", "smax", "smacv2", "vmas") for path in (ROOT / "configs" / env).glob("*.yaml")
)
PART_CONFIGS = sorted((ROOT / "configs" / "algorithms").glob("*.yaml")) + sorted(
    (ROOT / "configs" / "sharing").glob("*.yaml")
)


def test_fit_writes_an_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"name": "mamujoco", "scenario": "Hopper", "agent_conf": "3x1", "max_episode_steps": 40}
    main(
        [
            "fit",
            f"--model.env={json.dumps(env)}",
            "--model.num_envs=2",
            "--model.rollout_length=64",
            "--model.total_frames=256",
            "--model.num_minibatches=4",
            "--model.ppo_epochs=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fp3o")
    (run,) = client.search_runs([experiment.experiment_id])
    metrics = set(run.data.metrics)
    expected = {
        "train/frames",
        "train/fps",
        "train/episode_return",
        "update/value_loss_independence",
        "update/value_loss_dependence",
        "update/explained_variance",
        "update/entropy_independence",
        "update/gate",
        "update/clip_fraction_independence",
        "update/clip_fraction_dependence",
    }
    for agent in range(3):
        expected |= {f"update/agent_{agent}/kl_old_middle", f"update/agent_{agent}/kl_old_new"}
    assert expected <= metrics, expected - metrics
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/fps")]
    assert steps == [128, 256]  # the step is the environment frame count
    assert run.data.params["actor_lr"] == "1e-05" and run.data.params["algorithm"] == "fp3o"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert "total_frames: 256" in Path(config).read_text()
    assert (tmp_path / "mlartifacts").is_dir()


def print_config(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("config", TASK_CONFIGS, ids=lambda p: p.stem)
def test_task_configs_parse(config, capsys):
    printed = print_config(capsys, "--config", str(config))
    assert "clip_epsilon" in printed and ("scenario: " in printed or f"map_name: {config.stem}" in printed)


def test_smax_config_builds_the_paper_setup():
    pytest.importorskip("jaxmarl")
    model = yaml.safe_load((ROOT / "configs" / "smax" / "3s5z.yaml").read_text())["model"]
    module = FP3OModule(**model)
    assert module.n_agents == 8 and module.policy.discrete and module.policy.recurrent
    assert module.frames_per_batch == 3200 and module.chunk_length == 10


@pytest.mark.parametrize("part", PART_CONFIGS, ids=lambda p: p.stem)
def test_algorithm_and_sharing_configs_compose_with_a_task(part, capsys):
    task = ROOT / "configs" / "mamujoco" / "walker_2x3.yaml"
    printed = print_config(capsys, "--config", str(task), "--config", str(part))
    key = "algorithm" if part.parent.name == "algorithms" else "sharing"
    assert f"  {key}: {part.stem}\n" in printed
    assert "scenario: Walker2d" in printed and "clip_epsilon: 0.05" in printed  # the task's values stay


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sharing": "full"}, "model.sharing='full'"),
        ({"algorithm": "ppo2"}, "model.algorithm='ppo2'"),
        ({"num_minibatches": 5}, "model.num_minibatches=5 does not divide"),
        ({"actor_lr": 0.0}, "model.actor_lr=0.0 must be > 0"),
        ({"clip_epsilon": -0.1}, "model.clip_epsilon=-0.1 must be > 0"),
        ({"gamma": 1.5}, "model.gamma=1.5 must lie in"),
    ],
)
def test_invalid_hyperparameters_are_named(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        FP3OModule(**{**SMALL, **overrides})


def test_same_seed_same_parameters_after_training():
    first, second = small_module(seed=3), small_module(seed=3)
    for module in (first, second):
        fit_quietly(module)
    for a, b in zip(first.policy.parameters(), second.policy.parameters(), strict=True):
        assert torch.equal(a, b)


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, lightning as L
    sys.path.insert(0, {root!r})
    from tests.conftest import small_module

    class CheckSync(L.Callback):
        def on_train_end(self, trainer, module):
            state = [*module.parameters(), *module.buffers()]  # buffers: the value normaliser's statistics
            flat = torch.cat([t.detach().double().flatten() for t in state])
            gathered = trainer.strategy.all_gather(flat)
            if trainer.is_global_zero:
                spread = (gathered - gathered[0]).abs().max().item()
                open({out!r}, "w").write(f"{{spread}} {{module.frames}} {{module.iteration}}")

    module = small_module(total_frames=512, compile_update={compile_update}, **{options!r})
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[CheckSync()])
    trainer.fit(module)
    """
)


@pytest.mark.parametrize(
    ("compile_update", "options"),
    [
        (False, {"algorithm": "fp3o", "sharing": "nops"}),
        # HAPPO's actor-only and critic-only phases leave parameters without gradients.
        (False, {"algorithm": "happo", "sharing": "paps"}),
        (False, {"algorithm": "fp3o", "sharing": "fups", "actor_network": "rnn", "data_chunk_length": 8}),
        pytest.param(False, {"algorithm": "happo", "sharing": "nops"}, marks=pytest.mark.slow),
        pytest.param(False, {"algorithm": "mappo", "sharing": "fups"}, marks=pytest.mark.slow),
        pytest.param(False, {"algorithm": "ippo", "sharing": "nops"}, marks=pytest.mark.slow),
        pytest.param(True, {"algorithm": "fp3o", "sharing": "nops"}, marks=pytest.mark.slow),
    ],
    ids=["fp3o-nops", "happo-paps", "fp3o-fups-rnn", "happo-nops", "mappo-fups", "ippo-nops", "compiled"],
)
def test_ddp_two_cpu_processes_keep_parameters_identical(tmp_path, compile_update, options):
    out = tmp_path / "ddp.txt"
    script = tmp_path / "ddp_fit.py"
    script.write_text(
        DDP_SCRIPT.format(root=str(ROOT), out=str(out), compile_update=compile_update, options=options)
    )
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    spread, frames, iterations = out.read_text().split()
    assert float(spread) == 0.0
    # 512 frames over 2 processes of 128 frames per iteration: 2 iterations, 512 frames counted
    assert (int(frames), int(iterations)) == (512, 2)


@pytest.mark.parametrize(
    "uri", ["sqlite:///{tmp}/a-file/mlflow.db", "http://127.0.0.1:9"], ids=["unwritable", "unreachable"]
)
def test_unavailable_mlflow_store_fails_fast_naming_the_fix(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("a file where the store's directory should be")
    uri = uri.format(tmp=tmp_path)
    env = {"name": "mamujoco", "scenario": "Hopper", "agent_conf": "3x1"}
    args = ["fit", f"--model.env={json.dumps(env)}", "--model.num_envs=1", "--model.rollout_length=32"]
    args += ["--model.num_minibatches=1", "--model.total_frames=32", "--model.eval_interval=0"]
    args += [f"--trainer.logger.init_args.tracking_uri={uri}"]
    with pytest.raises(RuntimeError, match=r"unavailable or read-only .*--trainer.logger false") as error:
        main(args)
    assert uri in str(error.value)
    assert not list(tmp_path.glob("checkpoints/*"))  # nothing trained


def test_missing_optional_dependency_names_the_extra(monkeypatch) -> None:
    from fp3o_lightning.envs import ENV_REGISTRY, EnvEntry, make_env

    entry = EnvEntry("fp3o_lightning.envs.nowhere:Env", ("a_module_that_is_not_installed",), extra="smax")
    monkeypatch.setitem(ENV_REGISTRY, "needs_extra", entry)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'fp3o-lightning\[smax\]'"):
        make_env("needs_extra")
    with pytest.raises(ModuleNotFoundError, match="a_module_that_is_not_installed"):
        FP3OModule(env={"name": "needs_extra"})


def test_a_run_stopped_early_is_evaluated_once_at_its_last_iteration():
    """Lightning validates when a callback (or a time limit) stops the run; no second final evaluation."""

    class StopAfterTwo(L.Callback):
        def on_train_batch_end(self, trainer, module, *args) -> None:
            trainer.should_stop = module.iteration == 2

    recorder = MetricsRecorder()
    module = small_module(total_frames=10 * 128, eval_interval=5, eval_episodes=2, eval_num_envs=2)
    fit_quietly(module, logger=recorder, limit_val_batches=None, callbacks=[StopAfterTwo()])
    assert module.iteration == 2
    assert recorder.steps("eval/return_mean") == [module.frames]
