"""Decoded spans of recently used rollouts, kept by the SQLite store so that reading them back costs no JSON.

Reading a rollout's spans right after they were written (the adapter turning a finished rollout into a
training row) is the store's hottest read, and decoding JSON dominates it. Spans are append-only: the store
never changes or deletes a stored span. So a cached list is still exact whenever the file holds as many
spans for that rollout as the list does; the store checks that count (one cheap indexed ``COUNT``) before
every use, which keeps the cache correct when other processes write to the same file. Only spans whose
transaction has committed ever enter the cache, so it can never hold a span the file lacks.

The cache is bounded by the JSON size of what it holds and forgets the least recently used rollouts first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from rltrain.store.rules import insert_span, span_order
from rltrain.types import Span

DEFAULT_MAX_BYTES = 32 * 2**20


@dataclass
class _Entry:
    spans: list[Span] = field(default_factory=list)  # ordered by span_order
    size: int = 0  # bytes of JSON the spans were stored as


class SpanCache:
    """Per rollout, every stored span in order, for as many rollouts as fit in ``max_bytes`` of JSON.

    Not thread-safe on its own: the store calls it under its lock.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._size = 0

    def get(self, rollout_id: str, stored: int) -> list[Span] | None:
        """The cached spans when the file holds exactly ``stored`` spans of the rollout, else ``None``."""
        entry = self._entries.get(rollout_id)
        if entry is None:
            return None
        if len(entry.spans) != stored:  # another process added spans: reload rather than patch
            self._drop(rollout_id)
            return None
        self._entries.move_to_end(rollout_id)
        return entry.spans

    def put(self, rollout_id: str, spans: list[Span], size: int) -> None:
        """Cache the complete, ordered list of a rollout's stored spans."""
        self._drop(rollout_id)
        self._entries[rollout_id] = _Entry(spans, size)
        self._size += size
        self._evict()

    def added(self, rollout_id: str, stored_before: int, spans: list[Span], size: int) -> None:
        """``spans`` were committed to a rollout that held ``stored_before`` spans just before. The entry is
        extended when it held exactly those; a rollout's first spans start a new entry."""
        entry = self._entries.get(rollout_id)
        if entry is None and stored_before == 0:
            self.put(rollout_id, sorted(spans, key=span_order), size)
            return
        if entry is None or len(entry.spans) != stored_before:
            self._drop(rollout_id)
            return
        for span in spans:
            insert_span(entry.spans, span)
        entry.size += size
        self._size += size
        self._entries.move_to_end(rollout_id)
        self._evict()

    def _drop(self, rollout_id: str) -> None:
        entry = self._entries.pop(rollout_id, None)
        if entry is not None:
            self._size -= entry.size

    def _evict(self) -> None:
        while self._size > self.max_bytes and self._entries:
            _, entry = self._entries.popitem(last=False)
            self._size -= entry.size
