"""Where rollouts, attempts, spans and resources live: the :class:`Store` protocol and its two stores.

Ownership rule, for both stores (it is what lets them skip copies on their hot paths):

* A rollout or span passed to ``enqueue_rollouts`` / ``add_spans`` belongs to the store from then on; the
  caller must not change it afterwards. ``add_spans`` fills in ``sequence`` on the very span objects it was
  given (and returns them).
* Records the store returns may be shared with it (the memory store's records, the SQLite store's cached
  spans) and must be treated as read-only; derive a changed one with ``model_copy``.
* Resources are the exception: the store keeps a copy with the api key masked, never the object given.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from rltrain.store.base import Store, StoreError, UnknownRolloutError
from rltrain.store.memory import MemoryStore
from rltrain.store.sqlite import SqliteStore

__all__ = ["MemoryStore", "SqliteStore", "Store", "StoreError", "UnknownRolloutError", "open_store"]

logger = logging.getLogger(__name__)

StoreKind = Literal["sqlite", "memory"]


def open_store(kind: StoreKind, path: Path | None = None) -> Store:
    """The store a recipe names: ``"sqlite"`` on the file ``path`` (durable, the default of a run directory),
    or ``"memory"`` (``path`` is not used: nothing is written)."""
    if kind == "sqlite":
        if path is None:
            raise StoreError(
                "store kind 'sqlite' needs a path to its file (e.g. runs/<name>/store.sqlite), got None"
            )
        return SqliteStore(path)
    if kind == "memory":
        if path is not None:
            logger.debug("memory store: path %s is not used; nothing will be written there", path)
        return MemoryStore()
    raise StoreError(f"store kind {kind!r} is unknown; expected 'sqlite' or 'memory'")
