"""The ``fp3o`` console script: LightningCLI over ``FP3OModule`` with MLflow logging by default.

``fp3o fit --config configs/mamujoco/halfcheetah_6x1.yaml`` trains; ``--print_config`` shows every
option with its value; ``--help`` documents them. Runs go to an embedded MLflow store
(``sqlite:///mlflow.db`` in the working directory, artifacts under ``./mlartifacts``) unless
``--trainer.logger`` says otherwise; checkpoints go to ``checkpoints/<run id>/``.

- ``fp3o fit … --ckpt_path last`` resumes the newest ``checkpoints/*/last.ckpt`` (or a given path)
  and continues its MLflow run.
- ``fp3o validate --ckpt_path PATH`` and ``fp3o test --ckpt_path PATH`` evaluate a saved policy
  (``eval_episodes`` deterministic episodes); with a checkpoint, the model's options come from it.
- ``fp3o report …`` prints the paper's tables from MLflow runs (``fp3o_lightning.report``);
  ``fp3o sweep …`` runs a grid of fits over seeds (``fp3o_lightning.sweep``);
  ``fp3o render --ckpt_path PATH`` writes an evaluation episode to mp4/gif (``fp3o_lightning.render``).
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient

from fp3o_lightning.callbacks.checkpoints import CHECKPOINT_ROOT
from fp3o_lightning.module import FP3OModule


class LogConfigToMLflow(SaveConfigCallback):
    """Logs the full resolved config as ``config.yaml`` to the MLflow run.

    Lightning's default writes the file to ``trainer.log_dir``, which an MLflow logger with a
    sqlite tracking URI does not have.
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_text(logger.run_id, text, "config.yaml")


def trainer_defaults() -> dict[str, Any]:
    """One progress-barred epoch of ``num_iterations`` steps, logged to a local MLflow store."""
    return {
        "max_epochs": 1,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "logger": {
            "class_path": "lightning.pytorch.loggers.MLFlowLogger",
            "init_args": {
                "experiment_name": "fp3o",
                # absolute: MLflow caches stores by URI, so a relative one would outlive a chdir
                "tracking_uri": f"sqlite:///{os.path.abspath('mlflow.db')}",
                "artifact_location": os.path.abspath("mlartifacts"),
            },
        },
    }


def find_last_checkpoint(root: str = CHECKPOINT_ROOT) -> str:
    """The most recently written ``<root>/*/last.ckpt``."""
    candidates = glob.glob(os.path.join(root, "*", "last.ckpt"))
    if not candidates:
        raise FileNotFoundError(
            f"--ckpt_path last: no {root}/*/last.ckpt in {os.getcwd()}; pass --ckpt_path PATH to a checkpoint"
        )
    return max(candidates, key=os.path.getmtime)


def load_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ckpt_path {path}: no such checkpoint file")
    return torch.load(path, map_location="cpu", weights_only=False)


def check_mlflow_store(logger: Any) -> None:
    """Fail fast, before anything is built, when the configured MLflow store can't be reached or written.

    Finds or creates the experiment (a write) with MLflow's HTTP retries off, so an unreachable
    server fails in seconds rather than after minutes of back-off. A store that fails later, mid-run,
    stops the run; it resumes from its last checkpoint with ``--ckpt_path last``.
    """
    if not (isinstance(logger, Namespace) and logger.class_path.endswith("MLFlowLogger")):
        return
    args = logger.init_args
    with _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="15"):
        try:
            client = MlflowClient(args.tracking_uri)
            if client.get_experiment_by_name(args.experiment_name) is None:
                client.create_experiment(
                    args.experiment_name, artifact_location=args.get("artifact_location")
                )
        except Exception as error:
            reason = str(error).strip().splitlines()[0][:300]
            raise RuntimeError(
                f"The MLflow store {args.tracking_uri} is unavailable or read-only ({type(error).__name__}: "
                f"{reason}). Fix: start the tracking server or make the store writable, point "
                "--trainer.logger.init_args.tracking_uri at a writable store (e.g. sqlite:///mlflow.db), "
                "or train without MLflow with --trainer.logger false."
            ) from error


@contextlib.contextmanager
def _environment(**variables: str) -> Iterator[None]:
    """Set environment variables for the duration of a block (unless the user set them)."""
    added = {k: v for k, v in variables.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class FP3OCLI(LightningCLI):
    """LightningCLI that resolves ``--ckpt_path last`` and resumes fits into their MLflow run.

    With a checkpoint, Lightning's CLI rebuilds the model from the checkpoint's hyperparameters.
    """

    def before_instantiate_classes(self) -> None:
        if self.config[self.subcommand].get("ckpt_path") == "last":
            self.config[self.subcommand].ckpt_path = find_last_checkpoint()
            self._parse_ckpt_path()  # Lightning's own: the model's options from the checkpoint
        config = self.config[self.subcommand]
        check_mlflow_store(config.trainer.get("logger"))
        if self.subcommand != "fit" or config.get("ckpt_path") is None:
            return
        run = load_checkpoint(config.ckpt_path).get("fp3o", {}).get("mlflow")
        logger = config.trainer.get("logger")
        if run and isinstance(logger, Namespace) and logger.class_path.endswith("MLFlowLogger"):
            logger.init_args.run_id = run["run_id"]  # continue the same MLflow run

    def after_fit(self) -> None:
        """An interrupted fit: mark its MLflow run KILLED and say how to resume."""
        module = self.model
        if not module.interrupted:
            return
        for logger in self.trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.set_terminated(logger.run_id, "KILLED")
        print(
            f"Interrupted ({module.interrupted}) after iteration {module.iteration} "
            f"({module.frames} frames); resume with the same command and --ckpt_path last"
        )


COMMANDS = {
    "report": "fp3o_lightning.report",
    "sweep": "fp3o_lightning.sweep",
    "render": "fp3o_lightning.render",
}


#: Lightning messages that say nothing about an ``fp3o`` run: an advertisement, the notice that the
#: module's checkpoint callbacks replace the default one (by design), a deprecation inside Lightning
#: under recent torch, the logging interval (the module logs every iteration itself), and, when a run
#: resumes, its own non-empty checkpoint directory and a "dataloader is not resumable" warning (the
#: training iterable restarts at the checkpoint's iteration by itself).
QUIET_MESSAGES = (
    "💡 Tip",
    "will override existing callbacks",
    "`isinstance(treespec, LeafSpec)` is deprecated",
    "smaller than the logging interval",
    "exists and is not empty",
    "your dataloader is not resumable",
)


class _QuietLightning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(message in record.getMessage() for message in QUIET_MESSAGES)


def quiet_lightning() -> None:
    """Keep Lightning's log to what matters for a run (see ``QUIET_MESSAGES``)."""
    for name in ("lightning.pytorch", "lightning.fabric"):  # their child loggers use these handlers
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_QuietLightning())
    for message in QUIET_MESSAGES:
        warnings.filterwarnings("ignore", message=f".*{re.escape(message)}")


def main(args: list[str] | None = None) -> None:
    quiet_lightning()
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] and argv[0] in COMMANDS:  # commands of our own beside Lightning's fit/validate/test
        sys.exit(importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]))
    FP3OCLI(
        FP3OModule,
        save_config_callback=LogConfigToMLflow,
        save_config_kwargs={"save_to_log_dir": False},
        trainer_defaults=trainer_defaults(),
        seed_everything_default=False,
        auto_configure_optimizers=False,
        args=args,
    )


if __name__ == "__main__":
    main()
