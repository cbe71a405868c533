"""What qwt-serve keeps per request must not grow with the number of requests (a server runs for
months). Structural checks, no timing or RSS: the RSS soak is ``bench/bench_serve.py --soak``."""

import http.client
import threading
import time

import numpy as np
import pytest

from qwt_deploy.edge.metrics import LATENCY_BUCKETS_S, Metrics

pytest.importorskip("skimage", reason="needs the demo extra (the edge test helpers use its photos)")
from test_edge_runtime import edge_model_path, photo  # noqa: E402,F401


def test_metrics_hold_counts_not_requests():
    """Every latency goes into fixed histogram buckets; the counter has one key per distinct
    (path, status, error): 10,000 requests take the memory of a few."""
    m = Metrics()
    rng = np.random.default_rng(0)
    for i, s in enumerate(rng.exponential(0.05, 10_000)):
        m.record("/v1/predict", 200 if i % 10 else 422, float(s), "" if i % 10 else "wrong_shape")
        m.record_batch(1 + i % 8)
    assert len(m.requests) == 2 and sum(m.requests.values()) == 10_000
    h = m.latency["/v1/predict"]
    assert len(m.latency) == 1 and len(h.counts) == len(LATENCY_BUCKETS_S) + 1 and h.count == 10_000
    assert len(m.batch_size.counts) == len(m.batch_size.buckets) + 1 and m.batch_size.count == 10_000


def test_server_state_stays_bounded_over_many_fresh_connections(edge_model_path):
    """One TCP connection per request (curl, health checkers): the handler threads end, unknown
    paths share one metrics label, and the batcher's queue drains."""
    from qwt_deploy.edge.model import EdgeModel
    from qwt_deploy.edge.server import EdgeServer, ServeConfig

    srv = EdgeServer(EdgeModel(edge_model_path), ServeConfig(port=0, max_wait_ms=1))
    loop = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    loop.start()
    port = srv.server_address[1]
    png = open(photo(), "rb").read()
    try:
        baseline = threading.active_count()
        for i in range(60):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            if i % 3:
                c.request("POST", "/v1/predict", body=png, headers={"Content-Type": "image/png"})
            else:
                c.request("GET", f"/no/such/path/{i}")
            c.getresponse().read()
            c.close()
        deadline = time.monotonic() + 10  # handler threads end once their connection closes
        while threading.active_count() > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= baseline, threading.enumerate()
        labels = {path for path, _, _ in srv.metrics.requests}
        assert labels == {"/v1/predict", "other"}, labels
        assert srv.batcher is not None and srv.batcher._queue.qsize() == 0
    finally:
        srv.shutdown()
        srv.server_close()
