"""Process tuning of the server, in one place: allocators, environment, threads, imports, error detail.

Two phases, both run by the CLI: :func:`before_pyarrow` while ``flight_lakehouse.cli`` is imported (Arrow
picks its allocator, and glibc counts its malloc arenas, when pyarrow loads: later is too late), and
:func:`tune_process` once by ``serve``, before the server's heavy imports. Feature code does not tune the
process; it says when large work (an upload, an index or graph build, a compaction) has finished with
:func:`large_work_finished`. This module imports nothing heavy at module level (pyarrow least of all).

Each setting carries its reason and the effect measured when it was chosen.
"""

from __future__ import annotations

import ctypes
import faulthandler
import functools
import importlib.abc
import importlib.machinery
import os
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

#: How often freed memory is handed back to the system while serving.
RELEASE_SECONDS = 5.0


def before_pyarrow() -> None:
    """What must be set before pyarrow is imported (it is read when pyarrow loads and starts threads)."""
    # Arrow's allocator: the system one (glibc unmaps a large block when it is freed), not mimalloc, whose
    # per-thread heaps kept an upload's buffers while the gRPC threads that allocated them sat idle
    # (100k x 384 Lance upload: 429 vs 307 MB RSS after the DoPut).
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    limit_malloc_arenas()


def tune_process(log_level: str) -> None:
    """Tune the serving process; ``serve`` calls it once, before importing the server."""
    # pyarrow.dataset would import pandas: 49 MB of RSS the server never uses.
    keep_pandas_out()
    # OpenMP (faiss) threads sleep between parallel regions instead of spinning: on a small machine
    # spinning threads take the cores the gRPC threads need (10-client searches: ~760 -> ~920 q/s).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # A crash in native code (DuckDB, Arrow, gRPC) leaves its stacks in the log.
    faulthandler.enable()
    # lancedb's Rust logger (read at import): warnings only from DEBUG down, errors otherwise.
    os.environ.setdefault("LANCEDB_LOG", "warn" if log_level == "DEBUG" else "error")
    # describe_dataset reads index statistics: without this, Lance adds every IVF centroid to them.
    os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")
    # Clients get the one-line message of a refusal, never a traceback (see the function).
    hide_client_tracebacks()
    # Searches leave freed memory in malloc's lists between builds (100k x 384 table: 442 -> 462 MB
    # over 10-client searches and DoExchange batches, back once trimmed).
    release_memory_periodically()


def large_work_finished() -> None:
    """Feature code's one hook: an upload, build or compaction has finished and freed its temporaries.

    Gives that memory back to the system at once: on a 100k x 384 Lance ingest, RSS stayed 150 MB
    higher until both glibc malloc and Arrow's pool were asked to return it."""
    release_unused_memory()


# -- malloc and Arrow's pool -------------------------------------------------------------------------


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, for ``mallopt`` and ``malloc_trim`` (no Python binding has them)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


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
    """Call :func:`release_unused_memory` every ``seconds`` on a daemon thread."""

    def release() -> None:
        while True:
            time.sleep(seconds)
            release_unused_memory()

    threading.Thread(target=release, name="memory-release", daemon=True).start()


def release_unused_memory() -> None:
    """Give freed memory back to the system (Arrow's pool, then glibc)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# -- pandas ------------------------------------------------------------------------------------------


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


# -- tracebacks --------------------------------------------------------------------------------------


def hide_client_tracebacks() -> None:
    """Keep tracebacks of client-facing errors (:class:`~flight_lakehouse.errors.ClientError`) out of
    what pyarrow sends to clients. Idempotent; the server also calls it when it is built, so that a
    server embedded in another process (tests) keeps the same error contract.

    Why a patch of ``traceback.format_exception``: a Python exception raised by a Flight handler
    becomes an Arrow status carrying a ``PythonErrorDetail``, and the client's message is the status
    message, ``". Detail: "``, and that detail's ``ToString()``: ``traceback.format_exception(type,
    value, tb)`` looked up on the ``traceback`` module at each call, or, when that raises, only
    ``"Python exception: <class name>"`` (pyarrow/src/arrow/python/common.cc, ``PythonErrorDetail``).
    The traceback always holds the handler's frames (``_flight.pyx`` and our files, even for an
    exception raised with no traceback of its own), so it leaks source paths. ``flight.FlightError``
    subclasses skip the detail (``_flight_error_to_status``), but Flight's status codes are only
    INTERNAL, DEADLINE_EXCEEDED, CANCELLED, UNAUTHENTICATED, PERMISSION_DENIED, UNAVAILABLE and UNKNOWN
    (``FlightServerError``): INVALID_ARGUMENT, NOT_FOUND and UNIMPLEMENTED (our ``ClientError``
    classes) can only come from ``ArrowInvalid``, ``ArrowKeyError`` and ``ArrowNotImplementedError``,
    hence through ``PythonErrorDetail``. Wrapping the handlers cannot help, as the status is formatted
    after the handler has returned, in C++. So ``format_exception`` raises for ``ClientError`` only;
    every other exception, and every other caller, gets the standard function.
    """
    original = traceback.format_exception
    if getattr(original, "_lakehouse_filter", False):
        return
    from flight_lakehouse.errors import ClientError

    def format_exception(exc: Any, *args: Any, **kwargs: Any) -> list[str]:
        value = args[0] if args and not isinstance(exc, BaseException) else exc
        if isinstance(value, ClientError):
            raise RuntimeError("client-facing error: no traceback")
        return original(exc, *args, **kwargs)

    format_exception._lakehouse_filter = True  # type: ignore[attr-defined]
    traceback.format_exception = format_exception  # type: ignore[assignment]
