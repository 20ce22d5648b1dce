"""The ``fp3o`` console script: LightningCLI over ``FP3OModule`` with MLflow logging by default.

``fp3o fit --config configs/mamujoco/halfcheetah_6x1.yaml`` trains; ``--print_config`` shows every
option with its value; ``fp3o --help`` lists the commands and ``fp3o fit --help`` documents the options.
Runs go to an embedded MLflow store (``sqlite:///mlflow.db`` in the working directory, artifacts under
``./mlartifacts``) unless ``--trainer.logger`` says otherwise; checkpoints go to ``checkpoints/<run id>/``.
A fit ends by printing where everything is (``run_summary``).

- ``fp3o fit … --ckpt_path last`` resumes the newest ``checkpoints/*/last.ckpt`` (or a given path)
  and continues its MLflow run; with a larger ``--model.total_frames`` it extends the run. The model's
  options come from the checkpoint, except those in ``RESUMABLE``, which the command line may change.
- ``fp3o validate --ckpt_path PATH`` and ``fp3o test --ckpt_path PATH`` evaluate a saved policy
  (``eval_episodes`` deterministic episodes).
- ``fp3o report …`` prints the paper's tables from MLflow runs (``fp3o_lightning.report``);
  ``fp3o sweep …`` runs a grid of fits over seeds (``fp3o_lightning.sweep``);
  ``fp3o render --ckpt_path PATH`` writes an evaluation episode to mp4/gif (``fp3o_lightning.render``).
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import inspect
import logging
import os
import re
import shlex
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from typing import Any, NoReturn

import torch
from jsonargparse import ArgumentParser, DefaultHelpFormatter, Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient

from fp3o_lightning.callbacks import IterationCheckpoint, IterationProgressBar
from fp3o_lightning.callbacks.checkpoints import CHECKPOINT_ROOT
from fp3o_lightning.envs import task_name
from fp3o_lightning.envs.options import comment_env_options, describe_env_options, validate_env
from fp3o_lightning.errors import ConfigError
from fp3o_lightning.module import DEFAULT_ENV, FP3OModule, check_hparams, legacy_hparams

#: Every ``fp3o`` command, as ``fp3o --help`` lists it.
COMMANDS = {
    "fit": "Train a policy; with --ckpt_path, resume a run or extend it (a larger --model.total_frames).",
    "validate": "Evaluate a checkpoint's policy: eval_episodes deterministic episodes, logged as eval/.",
    "test": "The same evaluation, logged as test/.",
    "sweep": "Run a grid of fits over seeds; run it again to resume the unfinished ones.",
    "report": "Print the paper's result tables and learning curves from MLflow runs.",
    "render": "Record a checkpoint's policy playing an episode, to mp4 or gif.",
}
#: The commands run by modules of their own rather than by LightningCLI.
COMMAND_MODULES = {
    "report": "fp3o_lightning.report",
    "sweep": "fp3o_lightning.sweep",
    "render": "fp3o_lightning.render",
}
#: Lightning's ``predict`` has nothing to predict here: what to use instead.
NO_PREDICT = (
    "fp3o predict: there is nothing to predict; evaluate a policy with `fp3o validate --ckpt_path PATH` "
    "or record an episode of it with `fp3o render --ckpt_path PATH`"
)
#: The model options that a resumed run (``--ckpt_path``) takes from the command line: how long it
#: trains, how it is evaluated, checkpointed and diagnosed, and how it computes. Every other option
#: defines the learning problem and keeps the checkpoint's value (new options too); giving it a
#: different value stops the command. The Trainer's and the logger's options may always change.
RESUMABLE = frozenset(
    {
        "total_frames",
        "eval_interval",
        "eval_episodes",
        "eval_num_envs",
        "checkpoint_interval",
        "diagnostics_interval",
        "num_threads",
        "matmul_precision",
        "compile_update",
        "compile_actor",
        "nonfinite",
    }
)


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
    """One epoch of ``num_iterations`` steps, logged to a local MLflow store."""
    return {
        "max_epochs": 1,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "logger": {
            "class_path": "fp3o_lightning.loggers.ResumableMLFlowLogger",
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


def _run_exists(tracking_uri: str, run_id: str) -> bool:
    try:
        MlflowClient(tracking_uri).get_run(run_id)
    except Exception:
        return False
    return True


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


def complete_env(env: Any) -> dict[str, Any]:
    """``model.env`` as parsed (``None``: the default environment), checked and with every option."""
    if isinstance(env, Namespace):
        env = env.as_dict()
    return validate_env(DEFAULT_ENV if env is None else env)


class LineHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, which keeps the lines of descriptions (each wrapped on its own,
    indented as it is), so that the environments' options read as a list."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            extra = " " * (len(line) - len(line.lstrip()))
            lines.append(
                textwrap.fill(
                    line.strip(),
                    width,
                    initial_indent=indent + extra,
                    subsequent_indent=indent + extra + "    ",
                )
            )
        return "\n".join(lines)


class FP3OArgumentParser(LightningArgumentParser):
    """Lightning's parser, which writes ``model.env`` complete (every option of the environment with its
    value, and in YAML its type, default and doc as a comment) wherever it writes a config
    (``--print_config``, the run's ``config.yaml``), and
    whose errors are the message alone, on one line, rather than the usage of every option first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", LineHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        command = self.prog.replace(" [options]", "")
        print(
            f"{command}: error: {one_line(message)} (`{command} --help` lists the options)",
            file=sys.stderr,
        )
        sys.exit(2)

    def dump(self, cfg: Namespace, *args: Any, **kwargs: Any) -> str:
        if isinstance(cfg, Namespace) and "model" in cfg and isinstance(cfg.get("model"), Namespace):
            try:
                env = complete_env(cfg.model.get("env"))
            except ConfigError as error:
                self.error(str(error))
            cfg = cfg.clone()
            cfg.model.env = env
            text = super().dump(cfg, *args, **kwargs)
            return comment_env_options(text, env) if self._dumps_yaml(*args, **kwargs) else text
        return super().dump(cfg, *args, **kwargs)

    def _dumps_yaml(self, format: str = "parser_mode", *args: Any, **kwargs: Any) -> bool:
        return (self.parser_mode if format == "parser_mode" else format) == "yaml"


class FP3OCLI(LightningCLI):
    """LightningCLI with ``fp3o``'s commands, resumable and extensible fits into their MLflow run, the
    iteration progress bar and a summary at the end of a fit."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's, without ``predict``."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in COMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``fp3o fit --help`` lists every environment's options (``model.env``)."""
        title = "Environment options (--model.env.<option>, or model.env: {name: ..., <option>: ...})"
        parser.add_argument_group(title, describe_env_options())

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's subcommands, described for ``fp3o``, and the commands ``main`` runs itself."""
        super()._add_subcommands(parser, **kwargs)
        subcommands = parser._subcommands_action
        for choice in subcommands._choices_actions:
            choice.help = COMMANDS[choice.dest]
        for name in filter(COMMAND_MODULES.__contains__, COMMANDS):
            description = f"{COMMANDS[name]} See `fp3o {name} --help`."
            subcommands.add_subcommand(name, ArgumentParser(description=description), help=COMMANDS[name])

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str] | None) -> None:
        """Lightning's; also keeps the command line and the options it gives (there or in config files)."""
        super().parse_arguments(parser, args)
        self.argv = sys.argv[1:] if args is None else list(args)
        self.given = parser.parse_args(self.argv, defaults=False)

    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path`` (``last``: the newest ``checkpoints/*/last.ckpt``), the model's options are
        the checkpoint's (Lightning's own), except the ``RESUMABLE`` ones given, which take the command
        line's value; any other option given a value other than the checkpoint's stops the command."""
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        if config.get("ckpt_path") == "last":
            config.ckpt_path = find_last_checkpoint()
        if not config.get("ckpt_path"):
            return
        given = self.given[self.config.subcommand].get("model")
        given = given.as_dict() if given is not None else {}
        try:
            check_unchanged(config.ckpt_path, given, self.model_class)
        except ConfigError as error:  # a given model.env option that is not of its type
            self.exit_with(error)
        super()._parse_ckpt_path()  # a new self.config
        model = self.config[self.config.subcommand].model
        saved = load_checkpoint(config.ckpt_path).get("hyper_parameters", {})
        for name, value in legacy_hparams(saved).items():  # what an older checkpoint was trained with
            model[name] = value
        for name in RESUMABLE.intersection(given):
            model[name] = given[name]

    def before_instantiate_classes(self) -> None:
        """Check the model's options (and complete ``model.env``), then the MLflow store; name a new MLflow
        run after what it trains; a fit from a checkpoint continues its MLflow run."""
        config = self.config[self.subcommand]
        try:
            config.model.env = complete_env(config.model.get("env"))
            check_hparams(config.model)
        except ConfigError as error:
            self.exit_with(error)
        logger = config.trainer.get("logger")
        check_mlflow_store(logger)
        mlflow_logger = isinstance(logger, Namespace) and logger.class_path.endswith("MLFlowLogger")
        if mlflow_logger and not logger.init_args.get("run_name"):
            logger.init_args.run_name = default_run_name(config.model)
        if self.subcommand != "fit" or config.get("ckpt_path") is None:
            return
        run = load_checkpoint(config.ckpt_path).get("fp3o", {}).get("mlflow")
        if run and mlflow_logger:
            if _run_exists(logger.init_args.tracking_uri, run["run_id"]):
                logger.init_args.run_id = run["run_id"]  # continue the same MLflow run
            else:  # e.g. the checkpoint moved to another machine without its MLflow store
                warnings.warn(
                    f"--ckpt_path {config.ckpt_path}: its MLflow run {run['run_id']} is not in "
                    f"{logger.init_args.tracking_uri}; training continues in a new run (point "
                    "--trainer.logger.init_args.tracking_uri at the original store to continue that one)",
                    stacklevel=2,
                )

    def instantiate_classes(self) -> None:
        """Lightning's; a configuration error found while building (an environment's own checks) ends the
        command like a parser error."""
        try:
            super().instantiate_classes()
        except ConfigError as error:
            self.exit_with(error)

    def exit_with(self, error: ConfigError) -> None:
        """Print a configuration error alone (no traceback) and exit with status 2, as the parser does."""
        print(f"fp3o {self.config.subcommand}: error: {error}", file=sys.stderr)  # set before self.subcommand
        sys.exit(2)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's Trainer, whose default progress bar is the ``IterationProgressBar``."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(callback, ProgressBar) for callback in callbacks
        ):
            kwargs["callbacks"] = [*callbacks, IterationProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        self.check_compiler(update=True)

    def before_validate(self) -> None:
        self.check_compiler(update=False)

    def before_test(self) -> None:
        self.check_compiler(update=False)

    def check_compiler(self, update: bool) -> None:
        """Stop now, naming the fix, where a compiling option needs a C++ compiler and there is none:
        ``compile_actor`` (the actor runs on the CPU for environments that simulate there, whatever the
        Trainer's device) and, when the command trains (``update``), ``compile_update`` on the CPU."""
        hp = self.model.hparams
        on_cpu = self.trainer.strategy.root_device.type == "cpu"
        options = ["compile_update"] * bool(update and on_cpu and hp.compile_update)
        options += ["compile_actor"] * bool(hp.compile_actor)
        if options:
            check_cpp_compiler(options)

    def after_fit(self) -> None:
        """Mark an interrupted fit's MLflow run KILLED; print where everything is."""
        if self.model.interrupted:
            for logger in self.trainer.loggers:
                if isinstance(logger, MLFlowLogger):
                    logger.experiment.set_terminated(logger.run_id, "KILLED")
        if self.trainer.is_global_zero:
            print(run_summary(self.trainer, self.model, self.argv))


def default_run_name(model: Namespace) -> str:
    """``fp3o-nops-HalfCheetah6x1-s0-1127-090724``: what the run trains and when it started. MLflow's own
    random names would repeat, as every fit seeds Python's generator before the run is created."""
    task = task_name(dict(model.env or DEFAULT_ENV)).replace(" ", "")
    return f"{model.algorithm}-{model.sharing}-{task}-s{model.seed}-{time.strftime('%m%d-%H%M%S')}"


def check_unchanged(path: str, given: dict[str, Any], model_class: type) -> None:
    """Raise, naming them, where model options given, other than ``RESUMABLE`` ones, differ from the
    checkpoint's (from their default, for options newer than the checkpoint)."""
    saved = load_checkpoint(path).get("hyper_parameters", {})
    saved = {**saved, **legacy_hparams(saved)}
    parameters = inspect.signature(model_class).parameters
    differ = []
    for name, value in given.items():
        before = saved.get(name, parameters[name].default)
        if name == "env" and isinstance(value, dict) and isinstance(before, dict):
            value = _typed_env_options(value, before)
        if name not in RESUMABLE and not _agrees(value, before):
            differ.append(f"model.{name}={value!r} (the checkpoint's: {before!r})")
    if differ:
        raise ValueError(
            f"--ckpt_path {path}: {', '.join(differ)}. Options that define the learning problem cannot "
            "change on resume. Fix: drop them (the run keeps its own), or start a new run without "
            f"--ckpt_path. On resume, model.{', model.'.join(sorted(RESUMABLE))} and the Trainer's and "
            "logger's options may change."
        )


def _typed_env_options(given: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """The ``model.env`` options given, typed as a run's are (``--model.env.<option> 5`` parses as the
    text ``'5'``; the checkpoint holds the converted ``5``)."""
    complete = validate_env({**saved, **given})
    return {key: complete[key] for key in given}


def _agrees(given: Any, saved: Any) -> bool:
    """Whether a value given for an option agrees with the checkpoint's (for a dict: the keys given)."""
    if isinstance(given, dict) and isinstance(saved, dict):
        return all(key in saved and _agrees(value, saved[key]) for key, value in given.items())
    return given == saved


def check_cpp_compiler(options: list[str]) -> None:
    """Raise, naming the fix, where ``torch.compile``'s CPU backend (inductor) finds no C++ compiler for
    the model ``options`` that compile."""
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as error:
        names = " and ".join(f"model.{name}" for name in options)
        fix = " ".join(f"--model.{name} false" for name in options)
        raise RuntimeError(
            f"{names} needs a C++ compiler for torch.compile on the CPU and found none "
            f"({error}). Fix: install one (e.g. `apt-get install g++`, or point the CXX environment "
            f"variable at one), or run without compiling: {fix}"
        ) from error


def run_summary(trainer: Trainer, module: FP3OModule, argv: list[str]) -> str:
    """What a fit leaves and where: frames trained, the last returns, the MLflow run and how to open it,
    the checkpoints and how to resume (an interrupted fit) or extend (a finished one) the run."""
    total = module.hparams.total_frames
    state = f"interrupted ({module.interrupted})" if module.interrupted else "finished"
    lines = [f"fp3o fit {state}: {module.frames:,} frames in {module.iteration} iterations"]
    lines[0] += f" (total_frames {total:,})"
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            lines += mlflow_summary(logger)
            break
    checkpoints = next((c for c in trainer.checkpoint_callbacks if isinstance(c, IterationCheckpoint)), None)
    if checkpoints is None:
        return "\n".join(lines)
    command = ["fp3o", *without_options(argv, "--ckpt_path", "--model.total_frames")]
    command += ["--ckpt_path", os.path.join(checkpoints.dirpath, "last.ckpt")]
    lines.append(f"  checkpoints   {checkpoints.dirpath}/")
    if module.interrupted:
        lines.append(f"  resume        {shlex.join([*command, '--model.total_frames', str(total)])}")
    else:
        lines.append(f"  extend        {shlex.join([*command, '--model.total_frames', str(2 * total)])}")
    return "\n".join(lines)


def mlflow_summary(logger: MLFlowLogger) -> list[str]:
    """The run's last training and evaluation returns, its name and id, and how to open it in MLflow."""
    client, run_id = logger.experiment, logger.run_id
    run = client.get_run(run_id)
    metrics, uri = run.data.metrics, client.tracking_uri
    returns = []
    if "train/episode_return" in metrics:
        returns.append(f"train {metrics['train/episode_return']:.4g} (last iteration)")
    if "eval/return_mean" in metrics:
        returns.append(
            f"eval {metrics['eval/return_mean']:.4g} ± {metrics['eval/return_std']:.3g} "
            f"({metrics['eval/episodes']:.0f} deterministic episodes)"
        )
    page = f"#/experiments/{run.info.experiment_id}/runs/{run_id}/model-metrics"
    if uri.startswith(("http://", "https://")):
        open_it = f"{uri.rstrip('/')}/{page}"
    else:
        open_it = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1, then http://127.0.0.1:5000/{page}"
    lines = [f"  returns       {', '.join(returns)}"] if returns else []
    return lines + [
        f"  MLflow run    {run.info.run_name} (id {run_id})",
        f"  tracking URI  {uri}",
        f"  open it       {open_it}",
    ]


def without_options(argv: list[str], *names: str) -> list[str]:
    """The command line without the given options (as ``--name value`` or ``--name=value``)."""
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg in names:
            skip_value = True
        elif arg.split("=", 1)[0] not in names:
            kept.append(arg)
    return kept


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


def cli_options(parser_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``FP3OCLI``'s arguments besides the model class and the command line."""
    return {
        "parser_kwargs": parser_kwargs,
        "parser_class": FP3OArgumentParser,
        "save_config_callback": LogConfigToMLflow,
        "save_config_kwargs": {"save_to_log_dir": False},
        "trainer_defaults": trainer_defaults(),
        "seed_everything_default": False,
        "auto_configure_optimizers": False,
    }


class _Checked(Exception):
    """``CheckingCLI`` parsed and checked the configuration."""


class CheckingCLI(FP3OCLI):
    """``FP3OCLI`` that stops once the configuration is parsed and checked: nothing is built or started."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        config.model.env = complete_env(config.model.get("env"))
        check_hparams(config.model)
        raise _Checked


def check_fit_args(args: list[str]) -> None:
    """Parse and check ``fp3o fit ARGS`` without building environments or starting anything (``fp3o sweep``
    checks every planned run with it).

    Raises:
        ConfigError: the parser's or the options' error, on one line.
    """
    from jsonargparse import ArgumentError

    try:
        with warnings.catch_warnings():  # Lightning's note that a process's own argv is not parsed here
            warnings.filterwarnings(
                "ignore", message=".*args parameter is intended to run from within Python"
            )
            CheckingCLI(FP3OModule, args=["fit", *args], **cli_options({"exit_on_error": False}))
    except _Checked:
        return
    except ArgumentError as error:
        raise ConfigError(one_line(str(error))) from None


def one_line(message: str) -> str:
    """jsonargparse's error ``message`` on one line; a value outside an option's choices said plainly."""
    message = " ".join(message.split())
    choice = re.fullmatch(
        r'Parser key "([\w.]+)": Expected a typing\.Literal\[(.*)\]\. Got value: (.*)', message
    )
    return f"--{choice[1]} {choice[3]}: not one of {choice[2]}" if choice else message


def main(args: list[str] | None = None) -> None:
    quiet_lightning()
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["predict"]:
        print(NO_PREDICT, file=sys.stderr)
        sys.exit(2)
    if argv[:1] and argv[0] in COMMAND_MODULES:  # commands of our own beside Lightning's fit/validate/test
        sys.exit(importlib.import_module(COMMAND_MODULES[argv[0]]).main(argv[1:]))
    parser_kwargs = {
        "prog": "fp3o",  # also under `python -m fp3o_lightning.cli`, and in errors
        "description": "FP3O, HAPPO, MAPPO and IPPO for cooperative multi-agent RL.",
        **{name: {"description": COMMANDS[name]} for name in FP3OCLI.subcommands()},
    }
    FP3OCLI(FP3OModule, args=args, **cli_options(parser_kwargs))


if __name__ == "__main__":
    main()
