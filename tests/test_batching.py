"""The group commit of concurrent calls (``flight_lakehouse.batching``) with real threads: concurrent
callers share batches, each gets its own result, a failing batch fails only its own callers."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from flight_lakehouse.batching import Coalescer


def test_concurrent_callers_share_batches_and_get_their_own_results() -> None:
    batches: list[list[int]] = []

    def square_slowly(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        time.sleep(0.005)  # long enough for the other callers to queue up
        return [item * item for item in items]

    coalescer: Coalescer[int, int] = Coalescer(square_slowly)
    start = threading.Barrier(8)

    def caller(first: int) -> list[tuple[int, int]]:
        start.wait()
        return [(item, coalescer.submit(item)) for item in range(first, 400, 8)]

    with ThreadPoolExecutor(8) as pool:
        answers = [answer for part in pool.map(caller, range(8)) for answer in part]
    assert sorted(answers) == [(item, item * item) for item in range(400)]
    assert sorted(item for batch in batches for item in batch) == list(range(400)), "each item ran once"
    assert max(len(batch) for batch in batches) > 1, "concurrent callers never shared a batch"
    assert len(batches) < 400


def test_a_failing_batch_fails_its_callers_and_the_next_batch_runs() -> None:
    def refuse_negative(items: Sequence[int]) -> list[int]:
        if any(item < 0 for item in items):
            raise ValueError("negative item")
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(refuse_negative)
    with pytest.raises(ValueError, match="negative item"):
        coalescer.submit(-1)
    assert coalescer.submit(5) == 5


def test_at_most_runners_batches_run_at_once() -> None:
    running, most = 0, 0
    guard = threading.Lock()

    def count_overlap(items: Sequence[int]) -> list[int]:
        nonlocal running, most
        with guard:
            running += 1
            most = max(most, running)
        time.sleep(0.003)
        with guard:
            running -= 1
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(count_overlap, runners=2)
    start = threading.Barrier(8)

    def caller(first: int) -> list[int]:
        start.wait()
        return [coalescer.submit(item) for item in range(first, 200, 8)]

    with ThreadPoolExecutor(8) as pool:
        answers = sorted(answer for part in pool.map(caller, range(8)) for answer in part)
    assert answers == list(range(200))
    assert most == 2, f"{most} batches ran at once with runners=2"


def test_an_exception_result_is_raised_to_its_caller_alone() -> None:
    def refuse_odd(items: Sequence[int]) -> list[int | BaseException]:
        return [ValueError(f"odd {item}") if item % 2 else item for item in items]

    coalescer: Coalescer[int, int] = Coalescer(refuse_odd)
    start = threading.Barrier(4)

    def caller(first: int) -> list[int | str]:
        start.wait()
        answers: list[int | str] = []
        for item in range(first, 40, 4):
            try:
                answers.append(coalescer.submit(item))
            except ValueError as exc:
                answers.append(str(exc))
        return answers

    with ThreadPoolExecutor(4) as pool:
        answers = [answer for part in pool.map(caller, range(4)) for answer in part]
    assert sorted(a for a in answers if isinstance(a, int)) == list(range(0, 40, 2))
    assert sorted(a for a in answers if isinstance(a, str)) == sorted(f"odd {i}" for i in range(1, 40, 2))
