#!/usr/bin/env python3
"""A seeded fuzz corpus against a running qwt-serve (issue 12): hostile JSON, .npy, image and
random bodies, wrong and missing content types, bad methods, request lines, HTTP versions and
Content-Length values, tall images and oversized batches. Generated from --seed (nothing is
checked in), sent over raw sockets so that malformed requests reach the server as written.

    python scripts/fuzz_serve.py --port 8080 [--count 2400] [--seed 12] [--pid PID] [--valid 10000]

Prints one JSON object: counts by status, the requests that got a 5xx or a non-JSON answer (or
no status line), whether /v1/predict still answers a valid tensor afterwards, and with --pid the
server's RSS before/after and its peak (VmHWM). --valid N then sends N valid requests and reports
the RSS after them. Exit code 1 if any answer was a 5xx, not JSON, or missing.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import random
import socket
import sys
import time

import numpy as np
from PIL import Image

CTYPES = ["application/json", "application/x-npy", "application/npy", "image/png", "image/jpeg", "image/gif",
          "image/tiff", "application/octet-stream", "text/plain", "multipart/form-data", "", "application/json; x=1"]
METHODS = ["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "get", "post", "FOO"]
PATHS = ["/v1/predict", "/healthz", "/metrics", "/", "/v1/predict?top_k=3", "/v1/predict?top_k=-1",
         "/v1/predict?top_k=abc", "/v1/predict?top_k=1_0", "/v1/predict?outputs=1", "//v1/predict", "/%00", "*"]


def _rss_kb(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _image(rng: random.Random) -> bytes:
    fmt = rng.choice(["PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF"])
    if rng.random() < 0.15:  # thin: tiny file, huge resized copy
        w, h = (1, rng.choice([1000, 100_000, 1_000_000])) if rng.random() < 0.5 else (rng.choice([1000, 100_000]), 1)
        fmt = "PNG"
    else:
        w, h = rng.randint(1, 400), rng.randint(1, 400)
    buf = io.BytesIO()
    Image.new(rng.choice(["L", "RGB"]), (w, h), rng.randint(0, 255)).save(buf, fmt)
    data = bytearray(buf.getvalue())
    for _ in range(rng.choice([0, 0, 1, 3, 20])):
        data[rng.randrange(len(data))] = rng.randrange(256)
    if rng.random() < 0.2:
        data = data[: rng.randrange(len(data) + 1)]
    return bytes(data)


def _json_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.5:
        return rng.choice([0, 1, -1, 2**31, 2**63, 2**64 + 1, 1e300, -1e-300, 0.5, True, False, None, "x", "", [], {}])
    return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]


def _json_body(rng: random.Random, sample: tuple) -> bytes:
    n = rng.choice([1, 1, 2])
    shape = [n, *sample]
    size = int(np.prod(shape))
    kind = rng.randrange(8)
    d: dict = {}
    if kind == 0:  # valid, maybe with odd extras
        d = {"shape": shape, "data": np.zeros(size).tolist()}
    elif kind == 1:  # shape overflow, bools, floats, negative
        d = {"data": rng.choice([[], [0.0] * size]), "shape": rng.choice([
            [4294967296, 4294967296], [True, *sample], [1.0, *sample], [-1, *sample], [2**64, 0], "1,1", None, {}])}
    elif kind == 2:
        d = {"shape": shape, "data": [rng.choice([1e300, -1e300, 1e39, 2**70, "1", None, True]) for _ in range(size)]}
    elif kind == 3:
        d = {"data": _json_value(rng)}
    elif kind == 4:
        d = {"shape": shape, "data": np.zeros(size).tolist(), "dtype": rng.choice(["float64", "int8", 5, None, []]),
             "top_k": rng.choice([0, -1, 10**9, True, 1.5, "3", None]), "outputs": rng.choice([1, "yes", None, True])}
    elif kind == 5:
        return rng.choice([b"", b"{", b"[]", b"null", b"\xff\xfe", b"[" * 100_000, b'{"data": ' + b"[" * 5000,
                           b'{"data": 1e999999}', b'{"data": 1' + b"0" * 5000 + b"}"])
    elif kind == 6:
        d = {"shape": [rng.randint(0, 3) for _ in range(rng.randint(0, 40))], "data": []}
    else:
        d = {"shape": shape, "data": np.zeros(size).reshape(shape).tolist()}
    return json.dumps(d).encode()


def _npy_body(rng: random.Random, sample: tuple) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:  # oversized batch, still under the 8 MiB default body limit
        return _npy(np.zeros((rng.choice([9, 64, 2600 if np.prod(sample) <= 800 else 64]), *sample), np.float32))
    if kind == 1:
        dt = rng.choice(["float16", "float64", "int8", "uint8", "int64", "bool", "complex64", "U2", "datetime64[s]"])
        return _npy(np.ones((1, *sample), dt))
    if kind == 2:
        return _npy(np.zeros([rng.randint(0, 5) for _ in range(rng.randint(0, 5))], np.float32))
    if kind == 3:
        a = np.zeros((1, *sample), np.float32)
        a.flat[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
        return _npy(a)
    if kind == 4:
        data = bytearray(_npy(np.zeros((1, *sample), np.float32)))
        for _ in range(rng.randint(1, 10)):
            data[rng.randrange(min(len(data), 128))] = rng.randrange(256)  # header damage
        return bytes(data)
    data = _npy(np.zeros((2, *sample), np.float32))
    return data[: rng.randrange(len(data))]


def _request(rng: random.Random, sample: tuple) -> tuple[str, bytes]:
    """(label, raw request bytes)."""
    kind = rng.choices(["json", "npy", "image", "binary", "method", "line", "length"], [30, 20, 25, 8, 7, 5, 5])[0]
    method, path, version = "POST", "/v1/predict", "HTTP/1.1"
    headers: dict = {}
    if kind == "json":
        body, ctype = _json_body(rng, sample), rng.choice(["application/json"] * 4 + CTYPES)
    elif kind == "npy":
        body, ctype = _npy_body(rng, sample), rng.choice(["application/x-npy"] * 4 + CTYPES)
    elif kind == "image":
        body, ctype = _image(rng), rng.choice(["image/png", "image/jpeg", "application/octet-stream"] * 3 + CTYPES)
    elif kind == "binary":
        body, ctype = bytes(rng.randrange(256) for _ in range(rng.randint(0, 2000))), rng.choice(CTYPES)
    elif kind == "method":
        method, path, body, ctype = rng.choice(METHODS), rng.choice(PATHS), b"", ""
    elif kind == "line":
        line = rng.choice([b"GET /\r\n", b"GET / HTTP/0.9\r\n", b"GET / HTTP/2.0\r\n", b"GET / HTTP/1.x\r\n",
                           b"GARBAGE\r\n", b"GET / HTTP/1.1 extra\r\n", b"\x16\x03\x01\x02\x00\r\n",
                           b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n", b" \r\n"])
        extra = rng.choice([b"", b"Host: x\r\n", b"X: " + b"a" * 70_000 + b"\r\n", b"".join(
            b"H%d: v\r\n" % i for i in range(120))])
        return kind, line + extra + b"Connection: close\r\n\r\n"
    else:  # Content-Length games
        body, ctype = _json_body(rng, sample), "application/json"
        n = len(body)
        headers["Content-Length"] = rng.choice([f"{n}", "1_0", f"+{n}", f" {n} ", "-1", "abc", "99999999999999999999",
                                                str(n + 5), str(max(n - 3, 0)), "\u0661\u0660", f"{n}, {n}"])
        if rng.random() < 0.2:
            headers["Transfer-Encoding"] = "chunked"
    headers.setdefault("Content-Length", str(len(body)))
    if ctype:
        headers["Content-Type"] = ctype
    headers["Connection"] = "close"
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return kind, head.encode("utf-8") + body


def send_raw(host: str, port: int, data: bytes, timeout: float = 30.0) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as so:
        try:
            so.sendall(data)
        except OSError:
            pass  # the server may answer (413/400) and close before the whole body is sent
        try:
            so.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        while True:
            try:
                chunk = so.recv(1 << 16)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
    return out


def parse(resp: bytes, head_request: bool = False) -> tuple[int, bool]:
    """(status or -1 if no status line, whether the body is a JSON object; a HEAD answer has no body)."""
    head, _, body = resp.partition(b"\r\n\r\n")
    first = head.split(b"\r\n", 1)[0].split()
    if len(first) < 2 or not first[0].startswith(b"HTTP/") or not first[1].isdigit():
        return -1, False
    if head_request:
        return int(first[1]), b"Content-Type: application/json" in head
    try:
        return int(first[1]), isinstance(json.loads(body), dict)
    except ValueError:
        return int(first[1]), False


def valid_request(sample: tuple) -> bytes:
    body = json.dumps({"shape": [1, *sample], "data": np.zeros((1, *sample)).tolist()}).encode()
    return (b"POST /v1/predict HTTP/1.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=2400)
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--pid", type=int, help="the server's process id, to report its RSS")
    p.add_argument("--valid", type=int, default=0, help="then send this many valid requests and report RSS")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    np.random.seed(a.seed)
    import urllib.request

    desc = json.loads(urllib.request.urlopen(f"http://{a.host}:{a.port}/healthz", timeout=30).read())
    sample = tuple(desc["input_shape"][1:])
    report: dict = dict(seed=a.seed, count=a.count, sample_shape=list(sample))
    if a.pid:
        report["rss_kb_before"] = _rss_kb(a.pid)
    by_status: collections.Counter = collections.Counter()
    by_kind: dict = collections.defaultdict(collections.Counter)
    bad = []
    t0 = time.perf_counter()
    for i in range(a.count):
        kind, raw = _request(rng, sample)
        try:
            status, is_json = parse(send_raw(a.host, a.port, raw), raw.startswith(b"HEAD "))
            if status == 200 and raw.startswith((b"GET /metrics ", b"HEAD /metrics ")):
                is_json = True  # Prometheus text, by design
        except OSError as e:
            status, is_json = -2, False  # no connection at all
            bad.append(dict(i=i, kind=kind, error=str(e)))
        by_status[status] += 1
        by_kind[kind][status] += 1
        if status >= 500 or status < 0 or not is_json:  # 503 too: nothing here overloads one client's server
            bad.append(dict(i=i, kind=kind, status=status, json=is_json, request=raw[:120].decode("latin-1")))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["by_status"] = {str(k): v for k, v in sorted(by_status.items())}
    report["by_kind"] = {k: {str(s): n for s, n in sorted(c.items())} for k, c in sorted(by_kind.items())}
    report["bad"] = sorted(bad, key=lambda b: b.get("status", -2) < 500)[:50]  # 5xx first
    report["bad_count"] = len(bad)
    report["5xx"] = sum(v for k, v in by_status.items() if k >= 500)
    status, is_json = parse(send_raw(a.host, a.port, valid_request(sample)))
    report["answers_after"] = status == 200 and is_json
    if a.pid:
        report["rss_kb_after"], report["rss_kb_peak"] = _rss_kb(a.pid), _rss_kb(a.pid, "VmHWM")
    if a.valid:
        req, rss = valid_request(sample), []
        for i in range(a.valid):
            status, _ = parse(send_raw(a.host, a.port, req))
            assert status == 200, status
            if a.pid and (i + 1) % max(1, a.valid // 10) == 0:
                rss.append(_rss_kb(a.pid))
        report["valid_requests"] = a.valid
        if a.pid:
            report["rss_kb_during_valid"] = rss
    print(json.dumps(report, indent=1))
    return 0 if report["bad_count"] == 0 and report["answers_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
