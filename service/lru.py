"""`LRU`: the one bounded mapping of the service, an OrderedDict that keeps its newest keys.

The cache and the manager's bookkeeping (versions known, versions gone, ids seen) use it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

__all__ = ["LRU"]

K = TypeVar("K")
V = TypeVar("V")


class LRU(OrderedDict[K, V]):
    """At most `maxsize` keys; beyond, the oldest go first, each told to `on_evict`.

    `put` makes a key the newest. Plain assignment keeps an existing key where it stands (a
    correction is not a use) and adds a new one as the newest. Reads never reorder: a caller
    that counts a read as a use says so with `move_to_end` (a subclass, so that `get` and
    `move_to_end` on the cache's hot path stay the C methods of OrderedDict).
    """

    def __init__(self, maxsize: int, *, on_evict: Callable[[K, V], None] | None = None) -> None:
        super().__init__()
        self.maxsize = maxsize
        self.on_evict = on_evict

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        if len(self) > self.maxsize:
            self._trim()

    def put(self, key: K, value: V) -> None:
        """Set `key` to `value` as the newest key, dropping the oldest beyond `maxsize`."""
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.maxsize:
            self._trim()

    def _trim(self) -> None:
        while len(self) > self.maxsize:
            key, value = self.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(key, value)
