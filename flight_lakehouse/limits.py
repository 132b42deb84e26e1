"""Limits on concurrent work: a call over the limit is refused at once (UNAVAILABLE, with a hint to retry),
never queued, so that a burst of clients cannot pile up memory and threads behind the running ones."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager

from flight_lakehouse.errors import Unavailable


class Slots:
    """At most ``limit`` holders at once; ``what`` names them in the refusal."""

    def __init__(self, limit: int, what: str, setting: str) -> None:
        self.limit = limit
        self.used = 0
        self._what = what
        self._setting = setting
        self._guard = threading.Lock()

    def take(self) -> None:
        """Take a slot, or UNAVAILABLE when all are taken."""
        with self._guard:
            if self.used >= self.limit:
                raise Unavailable(
                    f"the server is busy: {self.limit} {self._what} are running ({self._setting}); "
                    "retry in a few seconds"
                )
            self.used += 1

    def give_back(self) -> None:
        """Free a slot taken by :meth:`take`."""
        with self._guard:
            self.used -= 1

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold a slot for the block."""
        self.take()
        try:
            yield
        finally:
            self.give_back()


class OnePerKey:
    """At most one holder per key at once; the others wait (then find what the first one made, e.g. a
    cached value, instead of making it again: a new snapshot read by 40 queries at once was planned 40
    times over, each reading every manifest)."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()

    @contextmanager
    def held(self, key: Hashable) -> Iterator[None]:
        """Hold ``key`` for the block."""
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        try:
            with lock:
                yield
        finally:
            with self._guard:
                if self._locks.get(key) is lock and not lock.locked():
                    del self._locks[key]
