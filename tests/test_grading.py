"""The math-verify grading pool: a hard per-item deadline that holds off the main thread too, and
workers that die are replaced. Real math-verify in real worker processes."""

from __future__ import annotations

import threading
import time

import pytest

from thoughtfold.tasks.grading import MathGrader

TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def grader():
    pool = MathGrader(timeout_s=TIMEOUT_S, num_workers=2)
    pool.grade([("\\boxed{1/2}", "0.5")])  # start the workers outside any timing
    yield pool
    pool.close()


@pytest.mark.parametrize("pathological", ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{(10^{10})!}"])
def test_pathological_input_times_out(grader, pathological):
    start = time.monotonic()
    scores = grader.grade([(pathological, "1"), ("\\boxed{0.5}", "1/2")])
    elapsed = time.monotonic() - start
    assert scores == [0.0, 1.0]
    assert elapsed < TIMEOUT_S + 2.5, elapsed  # cut at the deadline, not minutes later
    assert grader.timeouts >= 1


def test_timeout_works_in_a_thread(grader):
    """math-verify's signal-based timeout cannot work off the main thread; ours must."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(grader.grade([("\\boxed{9^{9^{9^{9}}}}", "2")])))
    start = time.monotonic()
    worker.start()
    worker.join(timeout=30)
    assert out == [[0.0]]
    assert time.monotonic() - start < TIMEOUT_S + 2.5
    assert grader.grade([("\\boxed{1/2}", "0.5")]) == [1.0]  # the pool recovered


def test_dead_workers_are_replaced(grader):
    for worker in grader.workers:
        worker.proc.kill()
        worker.proc.wait()
    assert grader.grade([("\\boxed{1/2}", "0.5"), ("\\boxed{2/3}", "0.5")]) == [1.0, 0.0]


def test_plain_integers_are_graded_exactly_without_workers():
    pool = MathGrader(timeout_s=TIMEOUT_S, num_workers=1)
    assert pool.grade([("1,000", "1000"), ("\\boxed{-0}", "0"), (None, "3")]) == [1.0, 1.0, 0.0]
    assert pool.workers == []  # no sympy, no process started
