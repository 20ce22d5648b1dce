"""The ``fp3o`` console script: LightningCLI over ``FP3OModule`` with MLflow logging by default.

``fp3o fit --config configs/mamujoco/halfcheetah_6x1.yaml`` trains; ``--print_config`` shows every
option with its value; ``--help`` documents them. Runs go to an embedded MLflow store
(``sqlite:///mlflow.db`` in the working directory, artifacts under ``./mlartifacts``) unless
``--trainer.logger`` says otherwise.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

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
    """One short progress-barred epoch of ``num_iterations`` steps, logged to a local MLflow store."""
    return {
        "max_epochs": 1,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "logger": {
            "class_path": "lightning.pytorch.loggers.MLFlowLogger",
            "init_args": {
                "experiment_name": "fp3o",
                "tracking_uri": "sqlite:///mlflow.db",
                "artifact_location": os.path.abspath("mlartifacts"),
            },
        },
    }


def main(args: list[str] | None = None) -> None:
    LightningCLI(
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
