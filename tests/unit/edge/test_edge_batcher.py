"""The dynamic batcher on its own: rows come back to the right request, batches respect the
maximum, a failing run fails only its own requests, and the worker keeps going."""

import concurrent.futures as cf
import threading

import numpy as np
import pytest

from qwt_deploy.edge.batcher import DynamicBatcher, Overloaded


def test_rows_return_to_their_request_and_batches_stay_bounded():
    sizes, lock = [], threading.Lock()

    def run(x):
        with lock:
            sizes.append(len(x))
        return [x * 2, x.sum(axis=(1, 2, 3))]

    b = DynamicBatcher(run, max_batch=8, max_wait_ms=30)
    try:
        xs = [np.full((1 + i % 3, 1, 2, 2), i, np.float32) for i in range(40)]
        with cf.ThreadPoolExecutor(16) as pool:
            outs = list(pool.map(lambda x: b.submit(x).result(timeout=30), xs))
    finally:
        b.close()
    for x, (doubled, sums) in zip(xs, outs):
        np.testing.assert_array_equal(doubled, x * 2)
        np.testing.assert_array_equal(sums, x.sum(axis=(1, 2, 3)))
    assert sum(sizes) == sum(len(x) for x in xs)
    assert max(sizes) <= 8 and len(sizes) < len(xs)  # requests were combined, never beyond the max


def test_a_failing_run_fails_its_requests_and_the_worker_survives():
    def run(x):
        if (x < 0).any():
            raise RuntimeError("boom")
        return [x]

    b = DynamicBatcher(run, max_batch=4, max_wait_ms=0)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            b.submit(-np.ones((1, 1), np.float32)).result(timeout=10)
        np.testing.assert_array_equal(b.submit(np.ones((2, 1), np.float32)).result(timeout=10)[0], np.ones((2, 1)))
    finally:
        b.close()


def test_full_queue_is_refused_at_once():
    gate = threading.Event()

    def run(x):
        gate.wait(10)
        return [x]

    b = DynamicBatcher(run, max_batch=1, max_wait_ms=0, max_queue=2)
    try:
        futs = [b.submit(np.zeros((1, 1), np.float32))]  # taken by the worker, blocked in run
        for _ in range(50):
            try:
                futs.append(b.submit(np.zeros((1, 1), np.float32)))
            except Overloaded:
                break
        else:
            pytest.fail("the queue never filled")
        assert len(futs) <= 4
    finally:
        gate.set()
        b.close()
