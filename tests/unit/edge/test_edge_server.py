"""qwt-serve over real HTTP on 127.0.0.1 (ephemeral ports), run with torch unimportable:
predictions equal qwt-run's, batching on/off agree, every bad request gets its 4xx and the
server keeps answering, and /metrics counts it all."""

import collections
import concurrent.futures as cf
import json
import re
import socket

import numpy as np
import pytest

from conftest import Server, assert_no_blocked_imports
from test_edge_runtime import LABELS, edge_model_path, output_tolerance, photo  # noqa: F401

MAX_BYTES = 1_000_000  # above the test photo (chelsea.png, ~240 KB)


@pytest.fixture(scope="module")
def servers(edge_model_path):
    on = Server(edge_model_path, "--max-batch", "8", "--max-wait-ms", "50", "--max-request-bytes", str(MAX_BYTES))
    off = Server(edge_model_path, "--no-batching", "--max-request-bytes", str(MAX_BYTES))
    yield {"on": on, "off": off}
    for s in (on, off):
        assert_no_blocked_imports(s.stop())


def metric(text, name, **labels):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_healthz_describes_the_model(servers):
    status, body = servers["on"].request("GET", "/healthz")
    assert status == 200 and body["status"] == "ok"
    assert body["input_shape"] == ["N", 3, 32, 32] and body["labels"] == 10 and body["images"]["crop"] == 32


def test_predict_image_equals_qwt_run(servers, edge_model_path, tmp_path, capsys):
    from qwt_deploy.cli.run import main

    out = str(tmp_path / "run.npy")
    assert main([edge_model_path, "--input", photo(), "--output", out, "--top-k", "3"]) == 0
    capsys.readouterr()
    ref = np.load(out)
    for name in ("on", "off"):
        status, body = servers[name].request("POST", "/v1/predict?top_k=3&outputs=1", open(photo(), "rb").read(),
                                             {"Content-Type": "image/png"})
        assert status == 200, body
        got = np.asarray(body["outputs"][0]["data"], np.float32)
        np.testing.assert_array_equal(got, ref)  # same input, batch of one: bit-identical
        assert [t["index"] for t in body["top_k"][0]] == list(np.argsort(-ref[0], kind="stable")[:3])
        assert body["top_k"][0][0]["label"] == LABELS[body["top_k"][0][0]["index"]]


def test_batching_on_and_off_agree_under_concurrency(servers, edge_model_path):
    xs = np.random.default_rng(2).standard_normal((24, 3, 32, 32)).astype(np.float32)
    before = metric(servers["on"].request("GET", "/metrics")[1], "qwt_batch_size_count")
    results = {}
    for name in ("on", "off"):
        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda x: servers[name].predict_tensor(x[None], outputs=True), xs))
        assert all(s == 200 for s, _ in answers), answers[0]
        results[name] = np.concatenate([np.asarray(b["outputs"][0]["data"], np.float32) for _, b in answers])
    tol = output_tolerance(edge_model_path, results["off"])
    assert np.abs(results["on"] - results["off"]).max() <= tol
    runs = metric(servers["on"].request("GET", "/metrics")[1], "qwt_batch_size_count") - before
    assert runs < len(xs), "24 concurrent requests with a 50 ms window must share model runs"


def _raw(port, data: bytes) -> tuple[int, dict]:
    """A hand-written request (no Content-Length, lying Content-Length...)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        resp = b""
        while b"\r\n\r\n" not in resp:
            resp += s.recv(65536)
        head, body = resp.split(b"\r\n\r\n", 1)
        n = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        while len(body) < n:
            body += s.recv(65536)
    return int(head.split()[1]), json.loads(body)


BAD = {  # name: (request, expected status, expected error code)
    "bad_json": (("POST", "/v1/predict", b'{"shape": [1, 3', {"Content-Type": "application/json"}), 400, "bad_json"),
    "wrong_shape": (("POST", "/v1/predict", json.dumps({"shape": [1, 3, 16, 16], "data": [0.0] * 768}),
                     {"Content-Type": "application/json"}), 422, "wrong_shape"),
    "shape_data_mismatch": (("POST", "/v1/predict", json.dumps({"shape": [1, 3, 32, 32], "data": [0.0] * 5}),
                             {"Content-Type": "application/json"}), 422, "wrong_shape"),
    "wrong_dtype": (("POST", "/v1/predict", json.dumps({"shape": [3, 32, 32], "data": ["x"] * 3072}),
                     {"Content-Type": "application/json"}), 422, "wrong_dtype"),
    "declared_int8": (("POST", "/v1/predict", json.dumps({"shape": [3, 32, 32], "data": [0] * 3072, "dtype": "int8"}),
                       {"Content-Type": "application/json"}), 422, "wrong_dtype"),
    "nan": (("POST", "/v1/predict", '{"shape": [3, 32, 32], "data": [' + ",".join(["NaN"] * 3072) + "]}",
             {"Content-Type": "application/json"}), 422, "not_finite"),
    "undecodable_image": (("POST", "/v1/predict", b"\x89PNG\r\n\x1a\n" + b"\x00" * 500, {"Content-Type": "image/png"}),
                          400, "undecodable_image"),
    "too_large": (("POST", "/v1/predict", b"\xff" * (MAX_BYTES + 1), {"Content-Type": "image/jpeg"}), 413, "too_large"),
    "media_type": (("POST", "/v1/predict", b"hello", {"Content-Type": "text/plain"}), 415, "unsupported_media_type"),
    "pickle_npy": (("POST", "/v1/predict", None, {"Content-Type": "application/x-npy"}), 400, "bad_npy"),
    "bad_top_k": (("POST", "/v1/predict?top_k=0", None, {"Content-Type": "image/png"}), 400, "bad_top_k"),
    "not_found": (("GET", "/v2/predict", None, {}), 404, "not_found"),
    "get_predict": (("GET", "/v1/predict", None, {}), 405, "method_not_allowed"),
}


@pytest.mark.parametrize("server_name", ["on", "off"])
def test_each_bad_request_gets_its_4xx_and_serving_goes_on(servers, server_name):
    import io

    srv = servers[server_name]
    before = srv.request("GET", "/metrics")[1]
    png = open(photo(), "rb").read()
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for name, ((method, path, body, headers), status, code) in BAD.items():
        if name == "pickle_npy":
            body = pickled.getvalue()
        elif name == "bad_top_k":
            body = png
        got_status, got = srv.request(method, path, body, headers)
        assert (got_status, got["error"]["code"]) == (status, code), (name, got)
        assert got["error"]["message"], name
        ok, res = srv.request("POST", "/v1/predict", png, {"Content-Type": "image/png"})  # still serving
        assert ok == 200 and res["top_k"], name
    status, body = _raw(srv.port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\r\n")
    assert (status, body["error"]["code"]) == (411, "length_required")
    after = srv.request("GET", "/metrics")[1]
    expected = collections.Counter()
    for (method, path, _, _), status, code in BAD.values():
        expected[(path.split("?")[0] if path.split("?")[0] in ("/v1/predict", "/healthz", "/metrics") else "other",
                  status, code)] += 1
    expected[("/v1/predict", 411, "length_required")] += 1
    for (path, status, code), n in expected.items():
        assert metric(after, "qwt_requests_total", code=status, error=code, path=path) - \
            metric(before, "qwt_requests_total", code=status, error=code, path=path) == n, (path, status, code)
    assert metric(after, "qwt_requests_total", code=200, path="/v1/predict") - \
        metric(before, "qwt_requests_total", code=200, path="/v1/predict") == len(BAD)
    assert metric(after, "qwt_requests_total", code=500) == 0
    assert metric(after, "qwt_request_duration_seconds_count", path="/v1/predict") > len(BAD)


def test_metrics_is_prometheus_text(servers):
    assert servers["off"].request("GET", "/healthz")[0] == 200
    status, text = servers["off"].request("GET", "/metrics")
    assert status == 200
    assert "# TYPE qwt_requests_total counter" in text and "# TYPE qwt_request_duration_seconds histogram" in text
    buckets = [float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith('qwt_request_duration_seconds_bucket{path="/healthz"')]
    assert buckets and buckets == sorted(buckets)  # cumulative


def test_serve_refuses_a_bad_model_file_with_one_line(tmp_path, capsys):
    from qwt_deploy.cli.serve import main

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    assert main([str(bad), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be loaded" in err[0] and "Fix:" in err[0]
