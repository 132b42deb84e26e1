"""Process memory: keep what glibc malloc and Arrow's allocator hold on to after big work small.

A large upload or an index build frees hundreds of MB that the allocators keep for reuse; measured on
a 100k x 384 Lance ingest, RSS stayed 150 MB higher until both were asked to give it back.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.abc
import importlib.machinery
import os
import sys
import threading
import time
from collections.abc import Sequence


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


#: How often freed memory is handed back to the system while serving.
RELEASE_SECONDS = 5.0


def limit_malloc_arenas(arenas: int = 1) -> None:
    """Cap glibc's malloc arenas (no-op off glibc, or when ``MALLOC_ARENA_MAX`` is set).

    Call it before anything starts a thread (importing pyarrow does): glibc counts the arenas those
    first threads make, and a cap set after them left three arenas that every thread spread over. Each
    arena keeps its own freed memory; with several, the same server measured anywhere from 411 to 436 MB
    after the same restart (100k x 384 served), with one, 411-412 MB every time. A burst of ingests on
    different threads had also pushed peak RSS from ~450 MB to 600-850 MB with one arena per thread.

    The mmap threshold stays glibc's dynamic one: fixed at 128 KiB it kept an ingesting server 30 MB
    smaller but made a 5M-row DoGet scan 10 % slower (every large buffer mapped and unmapped)."""
    libc = _libc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return
    libc.mallopt(-8, arenas)  # M_ARENA_MAX


def release_memory_periodically(seconds: float = RELEASE_SECONDS) -> None:
    """Call :func:`release_unused_memory` every ``seconds`` on a daemon thread.

    Between builds, searches leave freed memory in malloc's lists: a 100k x 384 table's server grew
    from 442 to 462 MB over 10-client searches and DoExchange batches, and went back once trimmed.
    """

    def release() -> None:
        while True:
            time.sleep(seconds)
            release_unused_memory()

    threading.Thread(target=release, name="memory-release", daemon=True).start()


def release_unused_memory() -> None:
    """Give memory freed by a finished upload or build back to the system (glibc and Arrow's pool)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class _RefusePandas(importlib.abc.MetaPathFinder):
    """Makes ``import pandas`` fail as if pandas were not installed."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "pandas" or fullname.startswith("pandas."):
            raise ModuleNotFoundError("pandas is not loaded in the server", name=fullname)
        return None


def keep_pandas_out() -> None:
    """Keep pandas out of the server process (call before the server's imports).

    The server never uses pandas, but ``pyarrow.dataset`` imports it whenever it is installed (for its
    pandas interop): 49 MB of RSS. pyarrow, DuckDB, Lance, lancedb and pyiceberg all treat a failing
    ``import pandas`` as "not installed". Clients in other processes are not affected.
    """
    if "pandas" not in sys.modules and not any(isinstance(f, _RefusePandas) for f in sys.meta_path):
        sys.meta_path.insert(0, _RefusePandas())
