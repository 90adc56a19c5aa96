"""Environments by name: ``get_env("room_selection", catalog="path.json")``.

Environments are imported only when asked for, so ``import rltrain.envs`` stays cheap and an environment's
dependencies are needed only by the runs that use it. Register your own with :func:`register_env`, or name it
in a recipe as ``module:attribute`` (``env.name: my_package.envs:MyEnv``), which the command line, a separate
process, can resolve without any registration code.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from rltrain.envs.base import Environment

EnvFactory = Callable[..., Environment]

_REGISTRY: dict[str, str | EnvFactory] = {
    "room_selection": "rltrain.envs.room_selection:RoomSelectionEnv",
}


class UnknownEnvironmentError(KeyError):
    """An environment name nobody registered."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class EnvironmentOptionsError(TypeError, ValueError):
    """Options that the named environment does not accept: an unknown name (a ``TypeError`` from its signature) or
    a value it refuses (the ``ValueError`` its constructor raised), reported by the CLI as one line."""


def register_env(name: str, factory: EnvFactory) -> None:
    """Make ``get_env(name, **options)`` return ``factory(**options)``."""
    _REGISTRY[name] = factory


def known_envs() -> list[str]:
    return sorted(_REGISTRY)


def _factory(name: str) -> EnvFactory:
    entry = _REGISTRY.get(name, name if ":" in name else None)
    if entry is None:
        raise UnknownEnvironmentError(
            f"unknown environment {name!r}; known environments: {known_envs()} (or name one as module:attribute)"
        )
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as exc:
            raise UnknownEnvironmentError(f"environment {name!r}: cannot import {entry!r}: {exc}") from None
    return entry


def get_env(name: str, **options: Any) -> Environment:
    """The environment registered as ``name``, built with ``options`` (checked against its signature; a value its
    constructor refuses with a ``ValueError`` becomes an :class:`EnvironmentOptionsError` naming ``env.options``)."""
    factory = _factory(name)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise EnvironmentOptionsError(
            f"environment {name!r} does not accept options {sorted(options)}: {exc}; "
            f"its signature is {name}{inspect.signature(factory)}"
        ) from None
    try:
        return factory(**options)
    except ValueError as exc:
        raise EnvironmentOptionsError(f"env.options: {exc}") from exc


__all__ = [
    "Environment",
    "EnvironmentOptionsError",
    "UnknownEnvironmentError",
    "get_env",
    "known_envs",
    "register_env",
]
