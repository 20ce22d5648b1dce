"""An in-memory Lightning logger: the metric history of a run, for notebooks, tests and benchmarks."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import Logger


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
