"""Each environment's options (``model.env``), typed and documented: checked where they are given.

An environment declares what it takes by its constructor: every parameter with a type hint and a default
(or none: required) is an option, documented in the class docstring's ``Args:``. The options the trainer
sets itself (:data:`MANAGED`) are not; keyword arguments a constructor passes on (``**kwargs``, e.g. a VMAS
scenario's own options) are accepted as given. :func:`validate_env` checks a ``model.env`` mapping
against this, with one-line errors that name the fix, and returns it complete (every option with its
value or default), which is what checkpoints, run parameters and ``--print_config`` show.

The checking itself is jsonargparse's (the type hints' own validation and conversion, as for every other
option); what is ours is choosing the environment by its ``name`` first, because jsonargparse's unions
pick the first class that accepts the keys, which can silently switch environments.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from fp3o_lightning.errors import ConfigError

#: Constructor parameters the trainer sets, and where the user sets them instead.
MANAGED: dict[str, str] = {
    "num_envs": "model.num_envs (training) and model.eval_num_envs (evaluation)",
    "seed": "model.seed (evaluation environments are seeded apart from it)",
    "device": "the Trainer (--trainer.accelerator) and model.rollout_device",
    "render_mode": "fp3o render",
    "width": "fp3o render --width",
    "height": "fp3o render --height",
    "camera_name": "fp3o render",
    "env_factory": "Python (it builds sub-environments; it is not a config value)",
}


@dataclasses.dataclass(frozen=True)
class EnvOption:
    """One option of an environment: its type hint, default (``required`` when it has none) and doc."""

    name: str
    hint: Any
    default: Any
    required: bool
    doc: str

    @property
    def type_text(self) -> str:
        """The type for people: ``bool``, ``int``, ``str or null``, ``one of 'a', 'b'``."""
        return _type_text(self.hint)

    def convert(self, value: Any) -> Any:
        """``value`` checked against the type hint (and converted, as jsonargparse converts options)."""
        try:
            return _checker(self.hint).parse_object({"value": value}).value
        except Exception:  # jsonargparse's ArgumentError; its text is several lines of parser detail
            summary = self.doc.split("; ")[0].split(". ")[0].rstrip(".")
            raise ConfigError(
                f"model.env.{self.name}={value!r} is not {_article(self.type_text)}{self.type_text}"
                + (f" ({summary})" if summary else "")
            ) from None


def _type_text(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(hint))
    arguments = get_args(hint)
    if arguments and type(None) in arguments:
        rest = [a for a in arguments if a is not type(None)]
        return " or ".join([*(_type_text(a) for a in rest), "null"])
    if hint is bool:
        return "bool (true or false)"
    return getattr(hint, "__name__", str(hint))


def _article(text: str) -> str:
    return "" if text.startswith("one of") else ("an " if text[0] in "aeiou" else "a ")


@functools.cache
def _checker(hint: Any) -> Any:
    """A one-option jsonargparse parser for ``hint`` (cached: building one costs milliseconds)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=hint)
    return parser


def _docs(cls: type) -> dict[str, str]:
    """The ``Args:`` of ``cls``'s docstring, one line each, without reST's double backquotes and roles."""
    from docstring_parser import parse

    params = [p for p in parse(cls.__doc__ or "").params if p.args[0] == "param"]
    plain = {
        p.arg_name: re.sub(r":\w+:`~?([^`]+)`", r"\1", (p.description or "").replace("``", ""))
        for p in params
    }
    return {name: " ".join(text.split()) for name, text in plain.items()}


@functools.cache
def env_options(name: str, backend: str | None = None) -> tuple[dict[str, EnvOption], bool]:
    """The options of the environment registered as ``name`` (on ``backend``) and whether it takes further
    keyword arguments (passed on as given). An environment with several backends has the option
    ``backend`` too."""
    from fp3o_lightning.envs import env_class, env_entry

    try:
        cls = env_class(name, check_requirements=False, backend=backend)
    except ModuleNotFoundError:  # its module needs what is missing: the error that names the extra
        cls = env_class(name, backend=backend)
    backends = env_entry(name).backends
    options: dict[str, EnvOption] = {}
    if backends:
        choices = Literal[("cpu", *backends)]  # type: ignore[valid-type]
        doc = f"the simulator: cpu (default) or {', '.join(backends)} (see the README's Devices section)"
        options["backend"] = EnvOption("backend", choices, "cpu", False, doc)
    hints = inspect.get_annotations(cls.__init__, eval_str=True)
    docs = _docs(cls)
    passes_kwargs = False
    for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            passes_kwargs = True
        elif parameter.name not in MANAGED:
            required = parameter.default is inspect.Parameter.empty
            default = None if required else parameter.default
            hint = hints.get(parameter.name, Any)
            options[parameter.name] = EnvOption(
                parameter.name, hint, default, required, docs.get(parameter.name, "")
            )
    if backend is not None:  # the options a backend shares with the entry's own class: their docs
        shared = env_options(name)[0]
        for key, option in options.items():
            if not option.doc and key in shared:
                options[key] = dataclasses.replace(option, doc=shared[key].doc)
    return options, passes_kwargs


def env_names() -> list[str]:
    from fp3o_lightning.envs import ENV_REGISTRY

    return sorted(ENV_REGISTRY)


def validate_env(env: Mapping[str, Any]) -> dict[str, Any]:
    """``model.env`` checked and complete: ``{"name": ..., every option: its value or default, further
    keyword arguments as given}``.

    Raises:
        ConfigError: naming the key, what is wrong and the fix (an unknown environment or option, a value
            of the wrong type, a missing required option, an option the trainer sets).
    """
    if not isinstance(env, Mapping):
        raise ConfigError(
            f"model.env must be a mapping with a 'name' key, e.g. {{name: mamujoco, ...}}; got {env!r}"
        )
    name = env.get("name")
    if name is None:
        raise ConfigError(f"model.env has no 'name': give the environment, one of {', '.join(env_names())}")
    backend = env.get("backend")
    try:
        options, passes_kwargs = env_options(name, None if backend == "cpu" else backend)
    except ValueError as error:  # an unregistered name or backend
        raise ConfigError(f"model.env.{'name' if name not in env_names() else 'backend'}: {error}") from None
    complete: dict[str, Any] = {"name": name}
    for key, value in env.items():
        if key == "name":
            continue
        if key in MANAGED:
            raise ConfigError(f"model.env.{key}: the trainer sets it; set {MANAGED[key]} instead")
        if key in options:
            complete[key] = options[key].convert(value)
        elif passes_kwargs:
            complete[key] = value
        else:
            raise ConfigError(
                f"model.env.{key} is not an option of env {name!r}; its options: {', '.join(options)} "
                f"(see `fp3o fit --help`)"
            )
    missing = [option for option in options.values() if option.required and option.name not in complete]
    if missing:
        raise ConfigError(
            f"model.env ({name}) needs {', '.join(f'model.env.{o.name}' for o in missing)}: "
            + "; ".join(f"{o.name}: {o.doc}" for o in missing)
        )
    for option in options.values():
        complete.setdefault(option.name, option.default)
    return complete


def comment_env_options(text: str, env: Mapping[str, Any]) -> str:
    """The YAML config ``text`` with each option of its complete ``model.env`` (``env``) commented with its
    type, default and doc, as ``--help`` describes it; ``text`` unchanged where a comment would change what
    it reads as (e.g. a value folded over several lines)."""
    import yaml

    backend = env.get("backend")
    options, _ = env_options(env["name"], None if backend in (None, "cpu") else backend)
    lines = text.split("\n")
    section = None
    for index, line in enumerate(lines):
        if line and not line.startswith(" "):
            section = line
        elif section == "model:" and line.startswith("  ") and not line.startswith("   "):
            section = "model:" if line != "  env:" else "env"
        elif section == "env" and (match := re.match(r"^    (\w+):", line)) and match[1] in options:
            option = options[match[1]]
            lines[index] = f"{line}  # {_summary(option)}" + (f": {option.doc}" if option.doc else "")
    commented = "\n".join(lines)
    return commented if yaml.safe_load(commented) == yaml.safe_load(text) else text


def _summary(option: EnvOption) -> str:
    """``type; default: value`` (or ``type; required``)."""
    return f"{option.type_text}; " + ("required" if option.required else f"default: {option.default!r}")


def describe_env_options() -> str:
    """Every environment's options for ``fp3o fit --help``: name, type, default and doc (environments
    whose optional dependencies are missing say how to install them)."""
    from fp3o_lightning.envs import env_entry

    lines = []
    for name in env_names():
        shown: dict[str, EnvOption] = {}
        for backend in (None, *env_entry(name).backends):
            heading = f"name: {name}" + (f", backend: {backend} (its other options)" if backend else "")
            try:
                options, passes_kwargs = env_options(name, backend)
            except ModuleNotFoundError as error:
                lines.append(f"{heading}  ({error})")
                continue
            lines.append(heading)
            for option in options.values():
                if option.name not in shown:
                    lines.append(f"  {option.name} ({_summary(option)}): {option.doc}")
            shown |= options
            if passes_kwargs:
                lines.append("  any further key: passed to the environment as given (see its docs)")
    return "\n".join(lines)
