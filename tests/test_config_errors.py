"""Configuration mistakes are caught where they are made: one-line errors, exit status 2, nothing started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fp3o_lightning.cli import check_fit_args, main
from fp3o_lightning.envs.options import MANAGED, comment_env_options, env_options, validate_env
from fp3o_lightning.errors import ConfigError
from fp3o_lightning.module import CHOICES, FP3OModule
from fp3o_lightning.nets import ACTOR_NETWORKS, SHARING
from fp3o_lightning.schemes import SCHEMES

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")

#: The issue's table: a mistake, and what the one-line error must say.
MISTAKES = {
    "model key typo": (["--model.actor_lrr", "0.1"], "unrecognized arguments: --model.actor_lrr"),
    "env key typo": (
        ["--model.env.agent_cnf", "2x3"],
        "model.env.agent_cnf is not an option of env 'mamujoco'; its options: backend, scenario, agent_conf,",
    ),
    "not a boolean": (["--model.env.clip_actions", "maybe"], "model.env.clip_actions='maybe' is not a bool"),
    "managed key": (
        ["--model.env.num_envs", "0"],
        "model.env.num_envs: the trainer sets it; set model.num_envs",
    ),
    "enumerated option": (
        ["--model.time_limit", "forever"],
        "--model.time_limit forever: not one of 'terminal', 'bootstrap'",
    ),
    "cross-field check": (
        ["--model.num_minibatches", "7"],
        "model.num_minibatches=7 does not divide the batch",
    ),
    "environment's own check": (
        ["--model.env.scenario", "Hoper"],
        "model.env: Unknown MaMuJoCo scenario 'Hoper'",
    ),
}


def mlflow_runs(directory: Path) -> int:
    """The MLflow runs in ``directory``'s store (0 when there is none)."""
    if not (directory / "mlflow.db").exists():
        return 0
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{directory / 'mlflow.db'}")
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_mistake_is_one_line_exit_2_and_nothing_starts(mistake, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    options, message = MISTAKES[mistake]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *options, "--trainer.enable_progress_bar=false"])
    assert exit_info.value.code == 2
    # MLflow logs its store's creation (the logger is built beside the module, whose environment's own
    # checks come last); nothing else is printed.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "INFO mlflow" not in line]
    assert len(err) == 1 and err[0].startswith("fp3o fit: error: "), err
    assert message in err[0]
    assert "Traceback" not in err[0] and "usage:" not in err[0]
    assert not (tmp_path / "checkpoints").exists()
    assert mlflow_runs(tmp_path) == 0


@pytest.mark.parametrize("command", ["validate", "test"])
def test_evaluation_commands_refuse_mistakes_the_same_way(command, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", QUICKSTART, "--model.env.agent_cnf", "2x3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"fp3o {command}: error: model.env.agent_cnf is not an option")


@pytest.mark.parametrize(
    ("grid", "message", "bad", "planned"),
    [
        ("model.env.agent_cnf=2x3", "model.env.agent_cnf is not an option of env 'mamujoco'", 2, 2),
        ("model.actor_lrr=0.1,0.2", "unrecognized arguments: --model.actor_lrr=", 4, 4),
        ("model.sharing=fups,all", "--model.sharing all: not one of 'fups', 'paps', 'nops'", 2, 4),
    ],
)
def test_sweep_checks_every_planned_run_before_launching(
    grid, message, bad, planned, tmp_path, monkeypatch, capsys
) -> None:
    from fp3o_lightning import sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: pytest.fail("a run was started"))
    code = sweep.main(
        ["--config", QUICKSTART, "--seeds", "0", "1", "--grid", grid, "--logs", str(tmp_path / "l")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad} of the {planned} planned runs are misconfigured; nothing was started" in err
    assert err.count(message) == bad  # every bad run listed, each once
    assert not (tmp_path / "l").exists() and mlflow_runs(tmp_path) == 0


def test_help_lists_every_environments_options_and_the_choices(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    printed = capsys.readouterr().out
    assert "--model.time_limit {terminal,bootstrap}" in printed
    assert "--model.value_norm_update {auto,value_loss,minibatch,iteration}" in printed
    section = printed[printed.index("Environment options") :]
    for name in ("mamujoco", "vmas", "smax", "smacv2"):
        assert f"name: {name}" in section
    for option in env_options("mamujoco")[0]:
        assert f"    {option} (" in section
    words = " ".join(section.split())
    assert "observation_layout (one of 'gymnasium', 'official'; default: 'gymnasium')" in words


def test_print_config_shows_the_environments_every_option_with_its_doc(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "mamujoco/hopper_3x1.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    env = yaml.safe_load(printed)["model"]["env"]
    for name, option in env_options("mamujoco")[0].items():  # each option's type, default and doc
        line = next(line for line in printed.splitlines() if line.startswith(f"    {name}: "))
        assert line.endswith(f"  # {option.type_text}; default: {option.default!r}: {option.doc}") or (
            option.required and "; required: " in line
        )
    assert env == validate_env(
        {"name": "mamujoco", "scenario": "Hopper", "agent_conf": "3x1", "agent_obsk": 5}
    )
    assert set(env) == {"name", *env_options("mamujoco")[0]}
    assert env["clip_actions"] is False and env["observation_layout"] == "gymnasium"


def test_every_config_parses_and_checks() -> None:
    configs = sorted(CONFIGS.rglob("*.yaml"))
    tasks = [c for c in configs if c.parent.name not in ("algorithms", "sharing")]
    assert len(tasks) > 20
    for config in tasks:
        check_fit_args(["--config", str(config)])
    for part in (CONFIGS / "algorithms").glob("*.yaml"):
        check_fit_args(["--config", QUICKSTART, "--config", str(part)])
    for part in (CONFIGS / "sharing").glob("*.yaml"):
        check_fit_args(["--config", QUICKSTART, "--config", str(part)])


@pytest.mark.parametrize(
    "config", ["quickstart.yaml", *sorted(p.name for p in (CONFIGS / "mamujoco").glob("*"))]
)
def test_mamujoco_configs_build(config: str) -> None:
    path = CONFIGS / config if config == "quickstart.yaml" else CONFIGS / "mamujoco" / config
    model = yaml.safe_load(path.read_text())["model"]
    module = FP3OModule(**model)
    assert module.hparams.env == validate_env(model["env"])


def test_check_fit_args_raises_one_line_config_errors() -> None:
    with pytest.raises(ConfigError, match="^unrecognized arguments: --model.nope=1$"):
        check_fit_args(["--config", QUICKSTART, "--model.nope=1"])
    with pytest.raises(ConfigError, match=r"model.env ?\(mamujoco\) needs model.env.agent_conf"):
        check_fit_args([f"--model.env={json.dumps({'name': 'mamujoco', 'scenario': 'Hopper'})}"])


def test_environment_options_are_checked_in_python_too() -> None:
    """The module checks ``env`` however it is built (a notebook, a script): the same errors."""
    with pytest.raises(ConfigError, match="model.env.num_envs: the trainer sets it"):
        FP3OModule(env={"name": "mamujoco", "scenario": "Hopper", "agent_conf": "3x1", "num_envs": 2})
    with pytest.raises(ConfigError, match="model.env has no 'name'"):
        validate_env({"scenario": "Hopper"})
    with pytest.raises(ConfigError, match="model.env.name: Unknown env name 'nope'; valid names"):
        validate_env({"name": "nope"})
    assert validate_env({"name": "vmas", "n_agents": 4})["n_agents"] == 4  # a scenario's own option
    assert set(MANAGED).isdisjoint(env_options("mamujoco")[0])


def test_enumerated_options_match_what_the_code_accepts() -> None:
    assert CHOICES["algorithm"] == tuple(SCHEMES)
    assert CHOICES["sharing"] == SHARING
    assert CHOICES["actor_network"] == ACTOR_NETWORKS


def test_every_environment_option_is_documented() -> None:
    """``--help`` shows each option's doc: every environment (and backend) documents every option it takes."""
    from fp3o_lightning.envs import ENV_REGISTRY

    for name, entry in ENV_REGISTRY.items():
        for backend in (None, *entry.backends):
            options, _ = env_options(name, backend)
            assert all(option.doc for option in options.values()), (name, backend, options)


def test_env_comments_never_change_what_the_config_reads_as() -> None:
    """A value YAML folds over several lines cannot take a comment: that config is written uncommented."""
    env = validate_env({"name": "mamujoco", "scenario": "Hopper", "agent_conf": "3x1"})
    folded = yaml.safe_dump({"model": {"env": {**env, "scenario": "Hopper " * 30}}}, width=60)
    assert "\n      Hopper" in folded and comment_env_options(folded, env) == folded
    plain = yaml.safe_dump({"model": {"env": env}, "trainer": {"env": 1}})
    commented = comment_env_options(plain, env)
    assert commented.count("  # ") == len(env) - 1 and yaml.safe_load(commented) == yaml.safe_load(plain)
