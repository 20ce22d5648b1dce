"""Everyday use of ``fp3o``: extend a resumed run, stop at ``total_frames``, discoverable commands, the end
of a run says where everything is, the MLflow page opens on the learning curve, ``compile_update`` checks
for a compiler."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch
import torch._inductor.config

from fp3o_lightning.cli import main

from .conftest import fit_quietly, small_module
from .test_resume import ARGS as RESUME_ARGS

ARGS = [arg for arg in RESUME_ARGS if "enable_progress_bar" not in arg]  # 100 frames per iteration
QUIET = "--trainer.enable_progress_bar=false"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, str]:
    """A 2-iteration ``fp3o fit`` with its progress bar, evaluated at iteration 2, and what it printed."""
    directory = tmp_path_factory.mktemp("finished")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.chdir(directory)
        patch.setenv("COLUMNS", "200")  # the progress bar's width
        main([*ARGS, "--model.total_frames=200"])
    return directory, printed.getvalue()


@pytest.fixture
def resumable(finished_run, tmp_path, monkeypatch) -> mlflow.MlflowClient:
    """A copy of the finished run's directory as the working directory; its MLflow client."""
    shutil.copytree(finished_run[0], tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def only_run(client: mlflow.MlflowClient) -> mlflow.entities.Run:
    (run,) = client.search_runs([client.get_experiment_by_name("fp3o").experiment_id])
    return run


def steps(client: mlflow.MlflowClient, name: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(only_run(client).info.run_id, name))


# ---- 1. extend a resumed run


def test_a_resumed_run_extends_to_the_new_total_frames(resumable):
    main([*ARGS, QUIET, "--model.total_frames=400", "--model.eval_interval=1", "--ckpt_path=last"])
    assert steps(resumable, "train/iteration") == [100, 200, 300, 400]
    assert steps(resumable, "eval/return_mean") == [200, 300, 400]  # the new eval_interval, from 300 on
    run = only_run(resumable)
    assert run.data.params["total_frames"] == "200" and run.data.tags["resumed.total_frames"] == "400"
    (checkpoint,) = Path("checkpoints").glob("*/last.ckpt")
    assert torch.load(checkpoint, weights_only=False)["hyper_parameters"]["total_frames"] == 400
    # Nothing given: the checkpoint's options (not the defaults, 10M frames on HalfCheetah); nothing to train.
    main(["fit", QUIET, "--ckpt_path=last"])
    assert steps(resumable, "train/iteration") == [100, 200, 300, 400]


def test_resuming_with_another_learning_problem_stops_naming_the_options(resumable):
    changed = ["--model.actor_lr=0.1", "--model.env.scenario=Walker2d", "--model.total_frames=400"]
    with pytest.raises(ValueError, match="cannot change on resume") as error:
        main([*ARGS, QUIET, *changed, "--ckpt_path=last"])
    assert "model.actor_lr=0.1" in str(error.value) and "model.env=" in str(error.value)
    assert "model.total_frames=" not in str(error.value)  # total_frames may change
    assert steps(resumable, "train/iteration") == [100, 200]  # nothing ran


def test_resuming_with_the_run_s_own_nested_env_option_from_the_command_line_continues(
    tmp_path, monkeypatch, capsys
):
    """A nested option on the command line arrives as text (``'0.005'``); the checkpoint holds it typed."""
    monkeypatch.chdir(tmp_path)
    noise = "--model.env.gym_kwargs.reset_noise_scale=0.005"
    main([*ARGS, QUIET, noise, "--model.total_frames=100"])
    with pytest.raises(ValueError, match="cannot change on resume") as error:
        main([*ARGS, QUIET, "--model.env.gym_kwargs.reset_noise_scale=0.01", "--ckpt_path=last"])
    assert "'reset_noise_scale': 0.01" in str(error.value)
    with pytest.raises(SystemExit) as exit_info:  # a value not of the option's type: its error, no traceback
        main([*ARGS, QUIET, "--model.env.max_episode_steps=abc", "--ckpt_path=last"])
    assert exit_info.value.code == 2
    assert "model.env.max_episode_steps='abc' is not an int" in capsys.readouterr().err
    main([*ARGS, QUIET, noise, "--model.total_frames=200", "--ckpt_path=last"])
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert steps(client, "train/iteration") == [100, 200]


# ---- 2. total_frames ends the run


class NoSecondEpoch(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            raise RuntimeError(f"still training in epoch {trainer.current_epoch} after total_frames")


def test_max_epochs_minus_one_stops_at_total_frames():
    module = small_module(total_frames=2 * 128)
    fit_quietly(module, max_epochs=-1, callbacks=[NoSecondEpoch()])
    assert module.iteration == module.num_iterations == 2


# ---- 3. discoverable commands


def test_help_lists_every_command_with_a_description(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for command in ("fit", "validate", "test", "sweep", "report", "render"):
        assert re.search(rf"^ +{command} +\w", printed, re.MULTILINE), f"{command} not listed:\n{printed}"
    assert "predict" not in printed


def test_predict_is_refused_naming_what_to_use(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict"])
    assert exit_info.value.code == 2
    printed = capsys.readouterr().err
    assert "fp3o validate --ckpt_path" in printed and "fp3o render --ckpt_path" in printed


# ---- 4. the end of a run says where everything is


def test_fit_ends_with_a_summary_of_where_everything_is(finished_run):
    directory, printed = finished_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{directory / 'mlflow.db'}")
    run = only_run(client)
    (checkpoints,) = (directory / "checkpoints").iterdir()
    summary = printed[printed.index("fp3o fit finished") :]
    assert run.info.run_name in summary and run.info.run_id in summary
    assert re.fullmatch(r"fp3o-nops-Hopper3x1-s0-\d{4}-\d{6}", run.info.run_name)  # what and when
    assert f"mlflow ui --backend-store-uri sqlite:///{directory / 'mlflow.db'}" in summary
    assert f"checkpoints/{checkpoints.name}/" in summary
    assert "200 frames" in summary
    train, evaluation = run.data.metrics["train/episode_return"], run.data.metrics["eval/return_mean"]
    assert f"train {train:.4g}" in summary and f"eval {evaluation:.4g}" in summary
    assert f"--ckpt_path checkpoints/{checkpoints.name}/last.ckpt --model.total_frames 400" in summary


def test_progress_bar_counts_iterations_and_frames(finished_run):
    printed = " ".join(finished_run[1].split())
    assert "Epoch" not in printed
    assert re.search(r"Iteration .*2/2", printed) and "frames: 200/200" in printed


# ---- 5. the MLflow page opens on the learning curve


def mlflow_page_order(names: list[str]) -> list[str]:
    """The order of the charts on an MLflow 3 run page: a section per name up to its last ``/``, sections
    sorted by name (names without a section last), charts sorted by name within their section."""
    return sorted(names, key=lambda name: (name.rpartition("/")[0] == "", name.rpartition("/")[0], name))


def test_mlflow_page_shows_the_learning_curves_first(finished_run):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{finished_run[0] / 'mlflow.db'}")
    order = mlflow_page_order(list(only_run(client).data.metrics))
    sections = list(dict.fromkeys(name.rpartition("/")[0] for name in order))
    assert sections[:2] == ["eval", "train"], sections
    assert order.index("eval/return_mean") < 3  # the first row of three charts
    assert order[order.index("train/episode_return") - 1].startswith("eval/")  # the first chart of train/
    per_agent = [i for i, name in enumerate(order) if re.search(r"agent_\d+/", name)]
    assert per_agent and min(per_agent) > max(i for i, name in enumerate(order) if name.startswith("train/"))


# ---- 6. compile_update and compile_actor check for a compiler


UPDATE, ACTOR = "--model.compile_update=true", "--model.compile_actor=true"


@pytest.mark.parametrize(
    ("subcommand", "options", "named"),
    [
        ("fit", [UPDATE], r"model\.compile_update needs.*--model\.compile_update false$"),
        ("fit", [UPDATE, ACTOR], r"--model\.compile_update false --model\.compile_actor false$"),
        ("validate", [ACTOR], r"model\.compile_actor needs.*--model\.compile_actor false$"),
    ],
    ids=["fit-update", "fit-both", "validate-actor"],
)
def test_compiling_without_a_compiler_stops_first(tmp_path, monkeypatch, subcommand, options, named):
    monkeypatch.chdir(tmp_path)
    # inductor's own patch: monkeypatch would leave its config module without the option afterwards
    with (
        torch._inductor.config.patch({"cpp.cxx": (None, "no-such-c++")}),
        pytest.raises(RuntimeError, match=r"C\+\+ compiler") as raised,
    ):
        main([subcommand, *ARGS[1:], QUIET, *options, "--trainer.logger=false"])
    assert re.search(named, str(raised.value))
    assert not Path("checkpoints").exists()  # stopped before the first iteration
