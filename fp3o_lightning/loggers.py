"""Lightning loggers: MLflow's, able to continue a run with changed options; an in-memory metric history
for notebooks, tests and benchmarks."""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only


class ResumableMLFlowLogger(MLFlowLogger):
    """Lightning's ``MLFlowLogger``, which can also continue a run whose options changed on resume.

    MLflow never changes a run's params, so a run resumed with, e.g., a larger ``total_frames`` keeps the
    value it started with as the param and records the new one as the tag ``resumed.total_frames``.
    """

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        # the values as MLFlowLogger logs them: flat, as strings of at most 250 characters
        values = {k: str(v)[:250] for k, v in _flatten_dict(_convert_params(params)).items()}
        logged = self.experiment.get_run(self.run_id).data.params
        changed = {k: v for k, v in values.items() if logged.get(k, v) != v}
        for key, value in changed.items():
            self.experiment.set_tag(self.run_id, f"resumed.{key}", value)
        super().log_hyperparams({k: v for k, v in values.items() if k not in changed})


class MetricsRecorder(Logger):
    """Keeps every logged metric in memory, e.g. ``Trainer(logger=[MLFlowLogger(...), recorder])``.

    ``recorder.series("train/episode_return")`` is that metric's values in logging order and
    ``recorder.steps("eval/return_mean")`` the steps (environment frames) they were logged at.
    """

    name, version = "memory", "0"

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int | None, dict[str, float]]] = []
        self.hyperparameters: dict[str, Any] = {}

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hyperparameters.update(vars(params) if not isinstance(params, dict) else params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.history.append((step, dict(metrics)))

    def series(self, name: str) -> list[float]:
        return [metrics[name] for _, metrics in self.history if name in metrics]

    def steps(self, name: str) -> list[int | None]:
        return [step for step, metrics in self.history if name in metrics]
