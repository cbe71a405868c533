"""The HTTP server behind ``qwt-serve`` (standard library ``ThreadingHTTPServer``).

Endpoints:

- ``GET /healthz``: 200 and the model's description once the model is loaded;
- ``POST /v1/predict``: a JSON tensor ``{"shape": [...], "data": [...]}`` (``Content-Type:
  application/json``), a ``.npy`` file (``application/x-npy``), or image bytes (``image/*`` or
  ``application/octet-stream``), preprocessed from the model's metadata; answers the outputs and
  the top-k (``?top_k=5`` or ``"top_k"`` in the JSON);
- ``GET /metrics``: Prometheus text (requests by path/status/error, latency and batch-size histograms).

Every bad request gets a 4xx with ``{"error": {"code", "message"}}``; the handler never lets an
exception escape (a thread that dies mid-request would leave the client hanging), so the server
keeps serving after any request.
"""

from __future__ import annotations

import io
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .batcher import DynamicBatcher, Overloaded
from .metrics import Metrics
from .model import BadInput, EdgeModel

KNOWN_PATHS = ("/healthz", "/v1/predict", "/metrics")
# A body over --max-request-bytes but under this is read and dropped before the 413, because
# most clients only read the answer after sending the whole body; larger ones close the connection.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
IMAGE_TYPES = ("image/", "application/octet-stream")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless asked: an edge box is often on an untrusted network
    port: int = 8080
    threads: int = 1  # ONNX Runtime intra-op threads
    batching: bool = True
    max_batch: int = 8
    max_wait_ms: float = 2.0
    max_queue: int = 256
    max_request_bytes: int = 8 * 1024 * 1024
    top_k: int = 5
    max_top_k: int = 100
    access_log: bool = False
    request_timeout_s: float = 30.0  # a client that stalls mid-body frees its thread after this


class EdgeServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, model: EdgeModel, cfg: ServeConfig):
        self.model, self.cfg, self.metrics = model, cfg, Metrics()
        self.batcher: Optional[DynamicBatcher] = None
        if cfg.batching and model.dynamic_batch:
            self.batcher = DynamicBatcher(model.run, cfg.max_batch, cfg.max_wait_ms, cfg.max_queue,
                                          on_batch=self.metrics.record_batch)
        super().__init__((cfg.host, cfg.port), Handler)

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        if self.batcher is None:
            outs = self.model.run(x)
            self.metrics.record_batch(len(x))
            return outs
        return self.batcher.submit(x).result()

    def server_close(self) -> None:
        super().server_close()
        if self.batcher is not None:
            self.batcher.close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a load balancer or client reuses connections
    server: EdgeServer
    server_version = "qwt-serve"

    def setup(self):
        self.timeout = self.server.cfg.request_timeout_s
        super().setup()

    def handle_expect_100(self):
        """``Expect: 100-continue`` (curl sends it for large uploads): refuse a too-large body
        before the client sends it."""
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = 0
        if n > self.server.cfg.max_request_bytes:
            limit = self.server.cfg.max_request_bytes

            def refuse(path):
                raise _closing(BadInput("too_large", f"request body is {n} bytes, more than the limit of {limit} "
                                        "bytes (qwt-serve --max-request-bytes)", 413))

            self._handle(refuse)
            return False
        return super().handle_expect_100()

    def log_message(self, fmt, *args):
        if self.server.cfg.access_log:
            sys.stderr.write("%s - %s\n" % (self.address_string(), fmt % args))

    # ---- plumbing ------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        # Counted before the answer leaves, so that a client reading /metrics right after its
        # answer always sees its own request.
        if not self._recorded:
            self._recorded = True
            self.server.metrics.record(self._label, status, time.perf_counter() - self._t0, self._error)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode())

    def _handle(self, fn) -> None:
        self._t0 = time.perf_counter()
        path = urlsplit(self.path).path
        self._label = path if path in KNOWN_PATHS else "other"
        self._error, self._recorded = "", False
        try:
            fn(path)
        except BadInput as e:
            if getattr(e, "close", False):
                self.close_connection = True  # the unread body would be parsed as the next request
            self._error = e.code
            self._json(e.status, {"error": {"code": e.code, "message": e.message}})
        except Overloaded as e:
            self._error = "overloaded"
            self._json(503, {"error": {"code": "overloaded", "message": f"{e}; retry later"}})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
            if not self._recorded:
                self._recorded = True
                self.server.metrics.record(self._label, 499, time.perf_counter() - self._t0, "client_gone")
        except Exception as e:  # a bug, not the client's fault; answer and keep serving
            self.close_connection = True
            self._error = "internal"
            try:
                self._json(500, {"error": {"code": "internal", "message": f"{type(e).__name__}: {e}"}})
            except OSError:
                pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _closing(BadInput("length_required", "chunked uploads are not accepted; send Content-Length", 411))
        length = self.headers.get("Content-Length")
        if length is None:
            raise _closing(BadInput("length_required", "the request has no Content-Length header", 411))
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            raise _closing(BadInput("bad_request", f"Content-Length {length!r} is not a byte count", 400)) from None
        limit = self.server.cfg.max_request_bytes
        if n > limit:
            err = BadInput("too_large", f"request body is {n} bytes, more than the limit of {limit} bytes "
                           "(qwt-serve --max-request-bytes)", 413)
            if n <= DRAIN_LIMIT_BYTES:  # read and drop it, so that the client (still sending) gets the 413
                left = n
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
                raise err if left == 0 else _closing(err)
            raise _closing(err)
        if n == 0:
            raise BadInput("empty_body", "the request body is empty", 400)
        body = self.rfile.read(n)
        if len(body) != n:
            raise _closing(BadInput("bad_request", f"body ended after {len(body)} of {n} bytes", 400))
        return body

    # ---- endpoints -----------------------------------------------------------------------
    def do_GET(self):
        self._handle(self._get)

    def do_HEAD(self):
        self._handle(self._get)

    def do_POST(self):
        self._handle(self._post)

    def _get(self, path: str) -> int:
        if path == "/healthz":
            self._json(200, {"status": "ok", **self.server.model.describe()})
        elif path == "/metrics":
            self._send(200, self.server.metrics.render().encode(), "text/plain; version=0.0.4")
        elif path == "/v1/predict":
            raise BadInput("method_not_allowed", "use POST for /v1/predict", 405)
        else:
            raise BadInput("not_found", f"no endpoint {path}; try /healthz, /v1/predict, /metrics", 404)
        return 200

    def _post(self, path: str) -> int:
        if path != "/v1/predict":
            if path in KNOWN_PATHS:
                raise _closing(BadInput("method_not_allowed", f"use GET for {path}", 405))
            raise _closing(BadInput("not_found", f"no endpoint {path}; POST to /v1/predict", 404))
        body = self._read_body()
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        model, cfg = self.server.model, self.server.cfg
        top_k = _query_int(self.path, "top_k", cfg.top_k)
        if ctype == "application/json":
            x, top_k = self._json_tensor(body, top_k)
        elif ctype in ("application/x-npy", "application/npy"):
            try:
                arr = np.load(io.BytesIO(body), allow_pickle=False)  # never unpickle a request
            except Exception as e:
                raise BadInput("bad_npy", f"body is not a .npy array ({type(e).__name__}: {e})", 400) from None
            if not isinstance(arr, np.ndarray):
                raise BadInput("bad_npy", "body is an .npz archive; send one .npy array", 400)
            x = model.tensor_from_array(arr)
        elif ctype.startswith(IMAGE_TYPES):
            x = model.tensor_from_image(body)
        else:
            raise BadInput("unsupported_media_type", f"Content-Type {ctype or '(none)'} is not accepted; use "
                           "application/json ({\"shape\",\"data\"}), application/x-npy, or image/jpeg|png|...", 415)
        if not 1 <= top_k <= cfg.max_top_k:
            raise BadInput("bad_top_k", f"top_k must be between 1 and {cfg.max_top_k}, got {top_k}", 400)
        t0 = time.perf_counter()
        outs = self.server.infer(x)
        result = {"outputs": [{"name": n, "shape": list(o.shape), "data": o.tolist()}
                              for n, o in zip(model.output_names, outs)],
                  "inference_ms": round((time.perf_counter() - t0) * 1e3, 3)}
        if outs and outs[0].ndim == 2:
            result["top_k"] = [[t.to_dict() for t in model.top_k(row, top_k)] for row in outs[0]]
        self._json(200, result)
        return 200

    def _json_tensor(self, body: bytes, top_k: int) -> tuple[np.ndarray, int]:
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise BadInput("bad_json", f"body is not valid JSON ({e})", 400) from None
        if not isinstance(req, dict) or "data" not in req:
            raise BadInput("bad_json", 'JSON body must be an object {"shape": [...], "data": [...]}', 400)
        model = self.server.model
        dtype = req.get("dtype", str(model.input_dtype))
        if dtype != str(model.input_dtype):
            raise BadInput("wrong_dtype", f"dtype {dtype!r}; the model takes {model.input_dtype}")
        try:
            arr = np.asarray(req["data"])
        except ValueError as e:  # ragged nested lists
            raise BadInput("wrong_shape", f"data is not a regular nested list ({e})") from None
        if arr.dtype.kind not in "fiu":
            raise BadInput("wrong_dtype", f"data must hold numbers only, got {arr.dtype.name} values")
        if "shape" in req:
            shape = req["shape"]
            if not isinstance(shape, list) or not all(isinstance(v, int) and v >= 0 for v in shape):
                raise BadInput("bad_json", f"shape must be a list of non-negative integers, got {shape!r}", 400)
            if int(np.prod(shape)) != arr.size:
                raise BadInput("wrong_shape", f"shape {shape} needs {int(np.prod(shape))} values, data has {arr.size}")
            arr = arr.reshape(shape)
        if "top_k" in req:
            if not isinstance(req["top_k"], int):
                raise BadInput("bad_top_k", f"top_k must be an integer, got {req['top_k']!r}", 400)
            top_k = req["top_k"]
        return model.tensor_from_array(arr.astype(model.input_dtype)), top_k


def _closing(e: BadInput) -> BadInput:
    e.close = True  # the body (if any) was not read: close the connection after answering
    return e


def _query_int(path: str, key: str, default: int) -> int:
    q = parse_qs(urlsplit(path).query).get(key)
    if not q:
        return default
    try:
        return int(q[0])
    except ValueError:
        raise BadInput("bad_top_k", f"{key}={q[0]!r} is not an integer", 400) from None


def serve(model: EdgeModel, cfg: ServeConfig, ready=print) -> None:
    """Serve until SIGTERM/SIGINT. ``ready`` gets one line with the bound address (port 0 = any)."""
    httpd = EdgeServer(model, cfg)
    host, port = httpd.server_address[:2]

    def stop(signum, frame):  # docker stop sends SIGTERM to PID 1: shut down cleanly, at once
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    batching = f"on (max batch {cfg.max_batch}, max wait {cfg.max_wait_ms:g} ms)" if httpd.batcher else "off"
    ready(f"qwt-serve: {model.path} on http://{host}:{port} (threads {cfg.threads}, batching {batching})")
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
