"""Checks shared by the environments' saved states (``get_extra_state``/``set_extra_state``)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def check_saved_state(
    name: str, state: Any, formats: Collection[Any], config: dict[str, Any], hint: str
) -> None:
    """Raise a ``ValueError`` unless ``state`` is a saved state of env class ``name`` in one of
    ``formats`` whose ``"config"`` equals ``config`` (this env's); ``hint`` says how to build a
    matching env."""
    if not isinstance(state, dict) or state.get("format") not in formats:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"Not a {name} state of format {' or '.join(map(str, formats))} (got {found!r}); "
            f"it must come from {name}.state_dict()."
        )
    theirs = state["config"]
    diffs = [f"{k}={theirs.get(k)!r} (this env: {v!r})" for k, v in config.items() if theirs.get(k) != v]
    if diffs:
        raise ValueError(
            f"Cannot load the {name} state: it was saved from an env with {', '.join(diffs)}. {hint}"
        )
