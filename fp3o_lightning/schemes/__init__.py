"""Update schemes: how one rollout batch updates the agents' policies (``--model.algorithm``)."""

from __future__ import annotations

from fp3o_lightning.schemes.base import UpdateScheme
from fp3o_lightning.schemes.fp3o import FP3O
from fp3o_lightning.schemes.happo import HAPPO
from fp3o_lightning.schemes.mappo import IPPO, MAPPO

SCHEMES: dict[str, type[UpdateScheme]] = {scheme.name: scheme for scheme in (FP3O, HAPPO, MAPPO, IPPO)}


def make_scheme(algorithm: str) -> UpdateScheme:
    """The update scheme called ``algorithm`` (see ``SCHEMES``)."""
    if algorithm not in SCHEMES:
        raise ValueError(f"algorithm={algorithm!r} is unknown; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[algorithm]()


__all__ = ["FP3O", "HAPPO", "IPPO", "MAPPO", "SCHEMES", "UpdateScheme", "make_scheme"]
