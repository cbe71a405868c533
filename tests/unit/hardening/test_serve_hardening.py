"""qwt-serve against hostile or unlucky requests (issue 12): every answer is JSON with an error
code and a 4xx (never a 5xx, never HTML, never without a status line), counted in /metrics, and
no request can make the server allocate far beyond its stated budget. Runs an in-process server
on 127.0.0.1 for a tiny onnx.helper model (no export, no torch): ~2 s in all, of which the
Hypothesis test (150 examples) takes about 1 s."""

from __future__ import annotations

import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tiny_model import SAMPLE, InProcessServer, write_tiny_model

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy overflow warnings fail the test


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny.onnx"))


@pytest.fixture(scope="module")
def server(model_path):
    s = InProcessServer(model_path, max_batch=8)
    yield s
    s.close()


def _json(status_ctype_body):
    status, ctype, body = status_ctype_body
    assert ctype == "application/json", (status, ctype, body[:200])
    return status, json.loads(body)


def _png(w, h, mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _raw(port, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as so:
        so.sendall(data)
        out = b""
        while True:
            try:
                chunk = so.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
    return out


def _metric(server, code, error) -> float:
    text = server.request("GET", "/metrics")[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("qwt_requests_total{") and f'code="{code}"' in line and f'error="{error}"' in line)


# ---- defect 1: a tiny file whose resized copy is huge ---------------------------------------
def test_tall_png_is_refused_before_it_is_resized(server):
    body = _png(1, 200_000)  # 467 bytes; resized to a short side of 28: 28 x 5,600,000 pixels
    status, err = _json(server.request("POST", "/v1/predict", body, {"Content-Type": "image/png"}))
    assert status == 413 and err["error"]["code"] == "image_too_large", err
    assert "aspect ratio" in err["error"]["message"]
    assert server.predict_ok()


def test_image_formats_are_the_documented_ones(server):
    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, "TIFF")  # Pillow decodes it, but the server documents JPEG/PNG/BMP/WebP
    status, err = _json(server.request("POST", "/v1/predict", buf.getvalue(), {"Content-Type": "image/tiff"}))
    assert status == 400 and err["error"]["code"] == "undecodable_image" and "accepted format" in err["error"]["message"]
    status, _ = _json(server.request("POST", "/v1/predict", _png(40, 30), {"Content-Type": "image/png"}))
    assert status == 200


# ---- defect 3: one request may not hold more than --max-batch samples ------------------------
def test_request_sample_limit(server):
    buf = io.BytesIO()
    np.save(buf, np.zeros((9, *SAMPLE), np.float32))
    status, err = _json(server.request("POST", "/v1/predict", buf.getvalue(), {"Content-Type": "application/x-npy"}))
    assert status == 413 and err["error"]["code"] == "too_many_samples" and "--max-request-samples" in err["error"]["message"]
    buf = io.BytesIO()
    np.save(buf, np.zeros((8, *SAMPLE), np.float32))
    status, ok = _json(server.request("POST", "/v1/predict", buf.getvalue(), {"Content-Type": "application/x-npy"}))
    assert status == 200 and len(ok["top_k"]) == 8


# ---- defect 4: JSON that made 500s -----------------------------------------------------------
@pytest.mark.parametrize("req, code", [
    ({"data": [], "shape": [4294967296, 4294967296]}, "bad_shape"),  # int64 product overflowed to 0
    ({"data": [0.0] * 784, "shape": [True, 1, 28, 28]}, "bad_shape"),  # a bool is an int to isinstance
    ({"data": [0.0] * 784, "shape": [1, 1, 28, 28.0]}, "bad_shape"),
    ({"data": [1e300] * 784, "shape": [1, 1, 28, 28]}, "not_finite"),  # float32 overflow: no numpy warning
    ({"data": [[0.0], [0.0, 1.0]]}, "wrong_shape"),
    ({"data": {"a": 1}}, "wrong_dtype"),
    ({"data": [2**70] * 784, "shape": [1, 1, 28, 28]}, "wrong_dtype"),
    ({"data": [0.0] * 784, "shape": [1, 1, 28, 28], "top_k": True}, "bad_top_k"),
    ({"data": [0.0] * 784, "shape": [1, 1, 28, 28], "dtype": ["float32"]}, "wrong_dtype"),
])
def test_json_errors_are_4xx(server, req, code, capfd):
    status, err = _json(server.request("POST", "/v1/predict", json.dumps(req), {"Content-Type": "application/json"}))
    assert 400 <= status < 500 and err["error"]["code"] == code, (status, err)
    assert capfd.readouterr().err == ""  # nothing from the client's input reaches the server's stderr


# ---- defect 7: protocol errors are JSON, have a status line, and are counted ----------------
@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "get"])
def test_unknown_methods_get_json(server, method):
    before = _metric(server, 405, "method_not_allowed")
    status, err = _json(server.request(method, "/v1/predict"))
    assert status == 405 and err["error"]["code"] == "method_not_allowed"  # the client's error: a 4xx, not 501
    assert _metric(server, 405, "method_not_allowed") == before + 1


@pytest.mark.parametrize("raw, status", [
    (b"GET /\r\n\r\n", 400),  # HTTP/0.9: http.server answered without a status line
    (b"GET / HTTP/0.9\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 400),  # http.server: 505, a 5xx for the client's error
    (b" \r\nHost: x\r\n\r\n", 400),  # http.server: closed without an answer
    (b"GET / HTTP/1.x\r\n\r\n", 400),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"POST /v1/predict HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 1_0\r\n\r\n0123456789", 400),
    (b"POST /v1/predict HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: +10\r\n\r\n0123456789", 400),
])
def test_malformed_requests_get_json_with_a_status_line(server, raw, status):
    out = _raw(server.port, raw)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), out[:200]
    assert b"Content-Type: application/json" in head and json.loads(body)["error"]["code"]
    assert _metric(server, status, json.loads(body)["error"]["code"]) >= 1
    assert server.predict_ok()


# ---- defect 8: bounded connection threads -----------------------------------------------------
def test_connections_are_bounded(model_path):
    s = InProcessServer(model_path, max_connections=4)
    idle = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(4)]
    try:
        time.sleep(0.2)
        threads = threading.active_count()
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as so:  # answered at accept, unread
            out = so.recv(65536)
        assert out.startswith(b"HTTP/1.1 503 ") and b'"too_many_connections"' in out, out[:200]
        assert threading.active_count() <= threads  # no thread was started for it
    finally:
        for so in idle:
            so.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not s.request("GET", "/healthz")[0] == 200:
        time.sleep(0.05)
    assert s.predict_ok() and _metric(s, 503, "too_many_connections") == 1
    s.close()


# ---- property: no body, content type, shape or dtype gives a 5xx -----------------------------
_SHAPES = st.lists(st.one_of(st.integers(-2, 30), st.integers(2**31, 2**64), st.booleans(), st.floats(allow_nan=True),
                             st.none(), st.text(max_size=3)), max_size=6)
_DATA = st.recursive(st.one_of(st.floats(allow_nan=False), st.integers(-2**80, 2**80), st.booleans(), st.none(),
                               st.text(max_size=4)), lambda c: st.lists(c, max_size=6), max_leaves=40)
_JSON_BODIES = st.fixed_dictionaries({}, optional={"data": _DATA, "shape": st.one_of(_SHAPES, st.integers()),
                                                   "dtype": st.one_of(st.sampled_from(["float32", "float64", "int8"]),
                                                                      st.integers()),
                                                   "top_k": st.one_of(st.integers(-5, 200), st.booleans(), st.floats()),
                                                   "outputs": st.one_of(st.booleans(), st.integers())}
                                     ).map(lambda d: json.dumps(d).encode())
_NPY_DTYPES = st.sampled_from(["float32", "float64", "float16", "int8", "uint8", "int64", "bool", "complex64", "U3",
                               "datetime64[s]"])


@st.composite
def _npy_bodies(draw):
    shape = tuple(draw(st.lists(st.integers(0, 30), max_size=5)))
    if int(np.prod(shape)) > 20_000:
        shape = (1, *SAMPLE)
    arr = np.zeros(shape, draw(_NPY_DTYPES))
    if arr.dtype.kind == "f" and arr.size:
        arr.flat[0] = draw(st.sampled_from([np.nan, np.inf, 1e30, -0.0]))
    buf = io.BytesIO()
    np.save(buf, arr)
    data = buf.getvalue()
    cut = draw(st.integers(0, len(data)))
    return data if draw(st.booleans()) else data[:cut]  # whole, or truncated


@st.composite
def _image_bodies(draw):
    w, h = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF"]))
    buf = io.BytesIO()
    Image.new("RGB", (w, h), tuple(draw(st.lists(st.integers(0, 255), min_size=3, max_size=3)))).save(buf, fmt)
    data = bytearray(buf.getvalue())
    for _ in range(draw(st.integers(0, 3))):  # flip a few bytes
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


_CTYPES = st.sampled_from(["application/json", "application/x-npy", "application/npy", "image/png", "image/jpeg",
                           "application/octet-stream", "text/plain", "", "application/json; charset=utf-8"])


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=st.one_of(_JSON_BODIES, _npy_bodies(), _image_bodies(), st.binary(max_size=300)), ctype=_CTYPES,
       query=st.sampled_from(["", "?top_k=3", "?top_k=-1", "?top_k=1_0", "?top_k=99999999999999999999", "?outputs=1",
                              "?outputs=maybe"]))
def test_parsing_never_gives_a_5xx(server, body, ctype, query):
    status, ctype_out, out = server.request("POST", "/v1/predict" + query, body, {"Content-Type": ctype} if ctype else {})
    assert status < 500, (status, out[:300])
    assert ctype_out == "application/json" and isinstance(json.loads(out), dict)
