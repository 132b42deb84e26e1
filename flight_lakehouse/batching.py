"""Group commit for concurrent calls: the callers that arrive while one batch runs form the next batch.

Used by the in-memory vector search: ten clients each asking for one query vector cost ten graph
searches, ten re-rankings and ten result tables, each handing the GIL back and forth between the gRPC
threads; one batch of ten does the same work once, and the graph search spreads it over the cores.

There is no batching thread and no waiting for a batch to fill: the first caller runs its own call at
once (a batch of one); callers arriving meanwhile queue, and when the batch ends the first of them is
woken to run the whole queue as the next batch, while the others sleep until their result is set. Up
to ``runners`` batches run at once (a caller finding fewer running starts one at once).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class _Call(Generic[T, R]):
    item: T
    done: threading.Event = field(default_factory=threading.Event)
    result: R | None = None
    error: BaseException | None = None
    leads: bool = False  # woken to run the next batch, not with a result


class Coalescer(Generic[T, R]):
    """Runs ``run_batch`` over the items of concurrent :meth:`submit` calls, at most ``runners``
    batches at a time.

    ``run_batch`` gets the items in arrival order and returns one result per item; a result that is an
    exception is raised to its caller alone, and if ``run_batch`` raises, every caller of that batch
    gets the exception.
    """

    def __init__(
        self, run_batch: Callable[[Sequence[T]], Sequence[R | BaseException]], runners: int = 1
    ) -> None:
        self._run_batch = run_batch
        self._runners = runners
        self._guard = threading.Lock()
        self._queue: list[_Call[T, R]] = []
        self._running = 0

    def submit(self, item: T) -> R:
        """The result of ``item``, computed in a batch with the items of concurrent callers."""
        call: _Call[T, R] = _Call(item)
        with self._guard:
            self._queue.append(call)
            leads = self._running < self._runners
            if leads:
                self._running += 1
        if not leads:
            call.done.wait()
            leads = call.leads
        if leads:
            self._run_next_batch()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    def _run_next_batch(self) -> None:
        with self._guard:
            batch, self._queue = self._queue, []
        try:
            results = self._run_batch([call.item for call in batch])
            for call, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    call.error = result
                else:
                    call.result = result
        except BaseException as exc:  # every caller of the batch learns why
            for call in batch:
                call.error = exc
        with self._guard:
            if self._queue:  # the next batch is run by its first caller, woken here
                successor = self._queue[0]
                successor.leads = True
                successor.done.set()
            else:
                self._running -= 1
        for call in batch:
            call.done.set()
