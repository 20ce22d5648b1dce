"""Checkpoints by iteration, and a run that crashes and resumes gives the same metrics as one that didn't."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch

from fp3o_lightning.cli import main

from .conftest import small_module

ENV = {"name": "mamujoco", "scenario": "Hopper", "agent_conf": "3x1", "max_episode_steps": 50}
ARGS = [
    "fit",
    f"--model.env={json.dumps(ENV)}",
    "--model.num_envs=2",
    "--model.rollout_length=50",
    "--model.total_frames=500",
    "--model.num_minibatches=2",
    "--model.ppo_epochs=2",
    "--model.eval_interval=2",
    "--model.eval_episodes=2",
    "--model.checkpoint_interval=1",
    "--trainer.enable_progress_bar=false",
]
METRICS = (
    "train/episode_return",
    "update/value_loss_independence",
    "update/agent_1/kl_old_new",
    "eval/return_mean",
)


class CrashAt(L.Callback):
    """Stops a run with an error at the end of a given iteration, before its checkpoint is written."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.iteration == self.iteration:
            raise RuntimeError("simulated crash")


def run_metrics(directory: Path) -> tuple[int, dict[str, dict[int, float]]]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{directory / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fp3o").experiment_id])
    histories = {
        name: {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, name)}
        for name in METRICS
    }
    return len(runs), histories


def crash_and_resume(
    tmp_path: Path, monkeypatch, args: list[str], after_crash: Callable[[Path], None] = lambda _: None
) -> tuple[Path, Path]:
    """``fp3o ARGS`` run through (in ``reference/``), and crashed at the end of iteration 3 then resumed from
    its last checkpoint (in ``crashed/``; ``after_crash(crashed)`` runs between the two)."""
    (reference := tmp_path / "reference").mkdir()
    (crashed := tmp_path / "crashed").mkdir()
    monkeypatch.chdir(reference)
    main(args)
    monkeypatch.chdir(crashed)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([*args, "--trainer.callbacks+=tests.test_resume.CrashAt", "--trainer.callbacks.iteration=3"])
    after_crash(crashed)
    main([*args, "--ckpt_path=last"])
    return reference, crashed


@pytest.mark.parametrize(
    "options",
    [[], ["--model.actor_network=rnn", "--model.data_chunk_length=10", "--model.hidden_size=16"]],
    ids=["mlp", "rnn"],  # rnn: the actor's and the critic's hidden states are carried over
)
def test_crash_and_resume_gives_the_same_metrics(tmp_path, monkeypatch, options):
    def checkpoints_before_the_crash(crashed: Path) -> None:
        (run_dir,) = (crashed / "checkpoints").iterdir()
        assert sorted(p.name for p in run_dir.iterdir()) == [
            "best-iteration=2.ckpt",
            "iteration=1.ckpt",
            "iteration=2.ckpt",
            "last.ckpt",
        ]

    reference, crashed = crash_and_resume(
        tmp_path, monkeypatch, [*ARGS, *options], checkpoints_before_the_crash
    )
    runs, resumed = run_metrics(crashed)
    assert runs == 1  # the resumed fit continued the same MLflow run
    _, expected = run_metrics(reference)
    assert sorted(resumed["train/episode_return"]) == [100, 200, 300, 400, 500]
    assert resumed == expected


def eval_metric(directory: Path, name: str) -> list[float]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{directory / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fp3o").experiment_id], order_by=["start_time"])
    return [
        client.get_metric_history(run.info.run_id, name)[-1].value for run in runs if name in run.data.metrics
    ]


def test_validate_and_test_evaluate_a_checkpoint_deterministically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([*ARGS, "--model.total_frames=200", "--model.eval_interval=0", "--model.eval_episodes=3"])
    (checkpoint,) = Path("checkpoints").glob("*/last.ckpt")
    # no --config: the model (Hopper 3x1, 2 envs, ...) comes from the checkpoint's hyperparameters
    for _ in range(2):
        main(["validate", f"--ckpt_path={checkpoint}"])
    main(["test", f"--ckpt_path={checkpoint}"])
    first, second = eval_metric(tmp_path, "eval/return_mean")
    (tested,) = eval_metric(tmp_path, "test/return_mean")
    assert first == second == tested
    assert eval_metric(tmp_path, "eval/episodes") == [3.0, 3.0]


def test_a_checkpoint_without_its_mlflow_store_resumes_into_a_new_run(tmp_path, monkeypatch):
    """A checkpoint taken to another machine (its MLflow store left behind) still resumes, logging to a
    new run of the configured store, with a warning that says how to continue the original one."""
    monkeypatch.chdir(tmp_path)
    main([*ARGS, "--model.total_frames=100", "--model.eval_interval=0"])
    (other := tmp_path / "other").mkdir()  # the store on the new machine, without the run
    store = f"--trainer.logger.init_args.tracking_uri=sqlite:///{other / 'mlflow.db'}"
    with pytest.warns(UserWarning, match="is not in .*training continues in a new run"):
        main([*ARGS, "--model.total_frames=200", "--model.eval_interval=0", "--ckpt_path=last", store])
    runs, metrics = run_metrics(other)
    assert runs == 1 and sorted(metrics["train/episode_return"]) == [200]


@pytest.mark.parametrize("sharing", ["nops", "paps"])
def test_separate_actor_and_critic_adams_of_older_checkpoints_continue_in_the_one_adam(sharing):
    """Checkpoints written before the two Adams became one hold two optimiser states; merged, the one
    Adam steps every parameter exactly as the two would have."""
    module = small_module(sharing=sharing)
    *actor_groups, critic_group = module.configure_optimizers().param_groups
    old = [
        torch.optim.Adam(
            [{"params": g["params"], "lr": g["lr"]} for g in actor_groups], eps=1e-5, fused=True
        ),
        torch.optim.Adam(critic_group["params"], lr=critic_group["lr"], eps=1e-5, fused=True),
    ]
    parameters = list(module.policy.parameters()) + list(module.critic.parameters())
    critic = set(module.critic.parameters())
    generator = torch.Generator().manual_seed(0)

    def step(optimizers, gradients):
        for p, gradient in zip(parameters, gradients, strict=True):
            p.grad = gradient.clone() if gradient is not None else None
        for optimizer in optimizers:
            optimizer.step()

    def gradients(critic_too=True):
        return [
            None if p in critic and not critic_too else torch.randn(p.shape, generator=generator)
            for p in parameters
        ]

    step(old, gradients())
    step(old, gradients(critic_too=False))  # the critic's step count now lags the actor's
    checkpoint = {"optimizer_states": [o.state_dict() for o in old]}
    module.on_load_checkpoint(checkpoint)
    (merged,) = checkpoint["optimizer_states"]
    new = module.configure_optimizers()
    new.load_state_dict(copy.deepcopy(merged))

    last = gradients()
    saved = [p.detach().clone() for p in parameters]
    step(old, last)
    expected = [p.detach().clone() for p in parameters]
    with torch.no_grad():
        for p, value in zip(parameters, saved, strict=True):
            p.copy_(value)
    step([new], last)
    assert all(torch.equal(p, e) for p, e in zip(parameters, expected, strict=True))
    assert not all(torch.equal(p, s) for p, s in zip(parameters, saved, strict=True))
