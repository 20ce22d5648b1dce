"""Update schemes: how one rollout batch updates the agents' policies."""

from __future__ import annotations

from fp3o_lightning.schemes.base import UpdateScheme
from fp3o_lightning.schemes.fp3o import FP3O

SCHEMES: dict[str, type[UpdateScheme]] = {"fp3o": FP3O}


def make_scheme(algorithm: str) -> UpdateScheme:
    """The update scheme called ``algorithm`` (see ``SCHEMES``)."""
    if algorithm not in SCHEMES:
        raise ValueError(f"algorithm={algorithm!r} is unknown; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[algorithm]()


__all__ = ["FP3O", "SCHEMES", "UpdateScheme", "make_scheme"]
