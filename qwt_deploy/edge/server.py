"""The HTTP server behind ``qwt-serve`` (standard library ``ThreadingHTTPServer``).

Endpoints:

- ``GET /healthz``: 200 and the model's description once the model is loaded;
- ``POST /v1/predict``: a JSON tensor ``{"shape": [...], "data": [...]}`` (``Content-Type:
  application/json``), a ``.npy`` file (``application/x-npy``), or image bytes (``image/*`` or
  ``application/octet-stream``), preprocessed from the model's metadata; answers the top-k
  (``?top_k=5`` or ``"top_k"`` in the JSON), and the raw outputs on request (``?outputs=1`` or
  ``"outputs": true``) or when the model has no class scores to rank;
- ``GET /metrics``: Prometheus text (requests by path/status/error, latency and batch-size histograms).

Every bad request gets a 4xx with ``{"error": {"code", "message"}}``, protocol errors that
``http.server`` answers itself included (bad request lines, unknown methods, over-long headers,
bad HTTP versions: see ``Handler.send_error``), and each is counted in /metrics by status. We keep
``http.server`` rather than an ASGI stack because overriding its two error paths gives the JSON
contract, and the edge image stays onnxruntime + numpy + Pillow. The handler never lets an
exception escape (a thread that dies mid-request would leave the client hanging), so the server
keeps serving after any request.
"""

from __future__ import annotations

import io
import json
import math
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..log import logger
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
    # Samples one request may carry (0: --max-batch). ONNX Runtime's activations grow with the
    # batch: one (2600,1,28,28) .npy of 8 MB took 480 MB, so a request over this gets 413.
    max_request_samples: int = 0
    # Open connections, each with its own thread; past this a new connection gets 503 at once.
    max_connections: int = 64

    @property
    def sample_limit(self) -> int:
        return self.max_request_samples or self.max_batch


class EdgeServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, model: EdgeModel, cfg: ServeConfig):
        self.model, self.cfg, self.metrics = model, cfg, Metrics()
        self.batcher: Optional[DynamicBatcher] = None
        if cfg.batching and model.dynamic_batch:
            self.batcher = DynamicBatcher(model.run, cfg.max_batch, cfg.max_wait_ms, cfg.max_queue,
                                          on_batch=self.metrics.record_batch)
        self._slots = threading.BoundedSemaphore(max(1, cfg.max_connections))
        super().__init__((cfg.host, cfg.port), Handler)

    # One thread per connection, at most cfg.max_connections of them: 500 slow sockets made 181
    # threads. Past the bound, the connection gets a 503 JSON answer and is closed at once.
    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request):
        # A lingering close: when we answer an error before reading the whole request (a 400 on
        # the request line, a 413), closing with unread bytes makes the kernel send a reset, and
        # the client loses our answer. Stop writing, read what is in flight briefly, then close.
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(0.5)
            left = 1 << 20
            while left > 0:
                chunk = request.recv(65536)
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        self.close_request(request)

    def _refuse(self, request) -> None:
        limit = self.cfg.max_connections
        body = json.dumps({"error": {"code": "too_many_connections", "message": f"{limit} connections are already "
                                     "open (qwt-serve --max-connections); retry later"}}).encode()
        self.metrics.record("other", 503, 0.0, "too_many_connections")
        try:
            request.settimeout(1.0)  # never let one refused client block the accept loop
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        super().shutdown_request(request)  # no lingering: this runs in the accept loop

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

    # ---- protocol errors -----------------------------------------------------------------
    # http.server answers what it cannot parse (bad request line or version, unknown method,
    # over-long URI or headers) through send_error, with an HTML page and outside /metrics. They
    # are the client's errors, so they get 4xx: an unknown method 405 (not 501), an HTTP version
    # other than 1.0/1.1 400 (not 505), as a 5xx would tell monitoring that the server is at fault.
    _PROTOCOL_ERRORS = {400: "bad_request", 405: "method_not_allowed", 408: "request_timeout",
                        414: "uri_too_long", 431: "headers_too_large"}

    def send_error(self, code, message=None, explain=None):
        code = int(code)
        error = self._PROTOCOL_ERRORS.get(code, f"http_{code}")
        if code == 501:  # an unknown or lowercase method
            code, error, message = 405, "method_not_allowed", (
                f"method {str(self.command)[:20]!r} is not supported; use GET for /healthz and /metrics, "
                "POST for /v1/predict")
        elif code == 505:
            code, error = 400, "bad_http_version"
        if getattr(self, "request_version", "") not in ("HTTP/1.0", "HTTP/1.1"):
            self.request_version = "HTTP/1.0"  # else http.server sends no status line (HTTP/0.9 style)
        self.close_connection = True  # whatever follows on this connection cannot be trusted
        path = urlsplit(getattr(self, "path", "") or "").path
        self._t0, self._recorded = time.perf_counter(), False
        self._label = path if path in KNOWN_PATHS else "other"
        self._error = error
        try:
            self._json(code, {"error": {"code": self._error, "message": message or self.responses.get(
                code, ("error",))[0]}})
        except OSError:
            pass

    def parse_request(self) -> bool:
        if not self.raw_requestline.strip():  # http.server closes without an answer
            self.command, self.request_version, self.requestline = None, "HTTP/1.0", ""
            self.send_error(400, "the request line is empty")
            return False
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9" or not self.request_version.startswith("HTTP/1."):
            self.send_error(505, "HTTP/0.9 requests (no version) are not supported; send HTTP/1.1")
            return False
        return True

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
        # digits only: int() would also take "1_0", "+10", " 10 " and "١٠"
        if len(self.headers.get_all("Content-Length")) > 1 or not re.fullmatch(r"[0-9]{1,18}", length):
            raise _closing(BadInput("bad_request", f"Content-Length {length!r} is not one byte count", 400))
        n = int(length)
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
        want_outputs = _query_flag(self.path, "outputs")
        if ctype == "application/json":
            x, top_k, want_outputs = self._json_tensor(body, top_k, want_outputs)
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
        if len(x) > cfg.sample_limit:
            raise BadInput("too_many_samples", f"the request holds {len(x)} samples, more than the limit of "
                           f"{cfg.sample_limit} per request (qwt-serve --max-request-samples); split it", 413)
        t0 = time.perf_counter()
        outs = self.server.infer(x)
        result: dict = {"inference_ms": round((time.perf_counter() - t0) * 1e3, 3)}
        if outs and outs[0].ndim == 2:
            result["top_k"] = [[t.to_dict() for t in model.top_k(row, top_k)] for row in outs[0]]
        # Raw outputs only on request (?outputs=1): a classifier's answer is its top-k, and 1,000
        # logits per sample are ~20 KB of JSON nobody reads. A model without top-k (embeddings,
        # detection maps) always answers its outputs: they are its only answer.
        if want_outputs or "top_k" not in result:
            result["outputs"] = [{"name": n, "shape": list(o.shape), "data": o.tolist()}
                                 for n, o in zip(model.output_names, outs)]
        self._json(200, result)
        return 200

    def _json_tensor(self, body: bytes, top_k: int, want_outputs: bool) -> tuple[np.ndarray, int, bool]:
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise BadInput("bad_json", f"body is not valid JSON ({e})", 400) from None
        if not isinstance(req, dict) or "data" not in req:
            raise BadInput("bad_json", 'JSON body must be an object {"shape": [...], "data": [...]}', 400)
        model = self.server.model
        dtype = req.get("dtype", str(model.input_dtype))
        if dtype != str(model.input_dtype):
            raise BadInput("wrong_dtype", f"dtype {str(dtype)[:40]!r}; the model takes {model.input_dtype}")
        try:
            arr = np.asarray(req["data"])
        except (ValueError, TypeError, OverflowError, RecursionError) as e:  # ragged or absurdly deep lists
            raise BadInput("wrong_shape", f"data is not a regular nested list of numbers ({str(e)[:200]})") from None
        if arr.dtype.kind not in "fiu":
            raise BadInput("wrong_dtype", f"data must hold numbers only, got {arr.dtype.name} values")
        if "shape" in req:
            shape = req["shape"]
            # type(v) is int: a bool is an int to isinstance; math.prod: Python ints, where
            # np.prod([2**32, 2**32]) overflows int64 to 0; a dim past 2**31 cannot be real
            if not isinstance(shape, list) or len(shape) > 32 or not all(type(v) is int and 0 <= v < 2**31
                                                                         for v in shape):
                raise BadInput("bad_shape", f"shape must be a list of at most 32 integers in 0..2^31-1, got "
                               f"{str(shape)[:100]}")
            if math.prod(shape) != arr.size:
                raise BadInput("wrong_shape", f"shape {str(shape)[:100]} needs {math.prod(shape)} values, data has "
                               f"{arr.size}")
            arr = arr.reshape(shape)
        if "top_k" in req:
            if type(req["top_k"]) is not int:  # not a bool, not a float
                raise BadInput("bad_top_k", f"top_k must be an integer, got {str(req['top_k'])[:40]}", 400)
            top_k = req["top_k"]
        if "outputs" in req:
            if type(req["outputs"]) is not bool:
                raise BadInput("bad_outputs", f"outputs must be true or false, got {str(req['outputs'])[:40]}", 400)
            want_outputs = req["outputs"]
        with np.errstate(over="ignore", invalid="ignore"):  # 1e300 -> inf: refused as not_finite, not warned
            arr = arr.astype(model.input_dtype)
        return model.tensor_from_array(arr), top_k, want_outputs


def _closing(e: BadInput) -> BadInput:
    e.close = True  # the body (if any) was not read: close the connection after answering
    return e


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _query_flag(path: str, key: str) -> bool:
    """``?key=1|true|yes`` (or ``0|false|no``); absent: False."""
    q = parse_qs(urlsplit(path).query, keep_blank_values=True).get(key)
    if not q:
        return False
    v = q[0].lower()
    if v not in _TRUE + _FALSE:
        raise BadInput(f"bad_{key}", f"{key}={q[0][:40]!r} is not one of 1, true, yes, 0, false, no", 400)
    return v in _TRUE


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

    def shut_down(why: str) -> None:
        logger.info("qwt-serve: %s: shutting down (stop accepting, finish open requests)", why)
        httpd.shutdown()

    def stop(signum, frame):  # docker stop sends SIGTERM to PID 1: shut down cleanly, at once
        # logged from the thread, not here: a signal handler must not take logging's lock
        threading.Thread(target=shut_down, args=(signal.Signals(signum).name,), daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    batching = f"on (max batch {cfg.max_batch}, max wait {cfg.max_wait_ms:g} ms)" if httpd.batcher else "off"
    ready(f"qwt-serve: {model.path} on http://{host}:{port} (runtime {model.runtime.value}, threads {cfg.threads}, "
          f"batching {batching})")
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        logger.info("qwt-serve: SIGINT: shutting down")
    finally:
        t0 = time.perf_counter()
        httpd.server_close()
        answered = sum(n for (path, status, _), n in httpd.metrics.requests.items()
                       if path == "/v1/predict" and status == 200)
        logger.info("qwt-serve: stopped (%d prediction(s) answered; closed in %.2f s)", answered,
                    time.perf_counter() - t0)
