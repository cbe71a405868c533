"""``qwt-serve``: an HTTP inference server for an exported INT8 model, without PyTorch."""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Serve an INT8 ONNX model written by qwt-export over HTTP. Image preprocessing and class names
come from the model's metadata, so no other configuration is needed. Concurrent requests are
batched (up to --max-batch samples, waiting at most --max-wait-ms for company).

  GET  /healthz      200 once the model is loaded
  POST /v1/predict   JSON {"shape": [1,3,224,224], "data": [...]}, a .npy body
                     (Content-Type: application/x-npy), or image bytes (Content-Type: image/jpeg ...)
                     -> {"top_k": [[{"index", "label", "probability", "score"}]]}; the raw
                     outputs too with ?outputs=1 (always for a model without class scores)
  GET  /metrics      Prometheus text: requests by status, latency and batch-size histograms

Bad requests get a 4xx JSON error naming the problem; the server keeps serving.
"""

EPILOG = """\
examples:
  qwt-serve lite0.int8.onnx                              # http://127.0.0.1:8080
  curl -s --data-binary @cat.jpg -H 'Content-Type: image/jpeg' localhost:8080/v1/predict
  curl -s --data-binary @cat.jpg -H 'Content-Type: image/jpeg' 'localhost:8080/v1/predict?top_k=3&outputs=1'
  qwt-serve lite0.int8.onnx --host 0.0.0.0 --port 9000 --threads 2 --max-batch 16
  qwt-serve lite0.int8.onnx --no-batching               # one model run per request
"""


def build_parser() -> argparse.ArgumentParser:
    from ..edge.server import ServeConfig

    d = ServeConfig()
    # QWT_HOST / QWT_PORT: defaults from the environment, so a container image (and its health
    # check) can set them once; explicit flags still win.
    host = os.environ.get("QWT_HOST") or d.host
    try:
        port = int(os.environ.get("QWT_PORT") or d.port)
    except ValueError:
        port = -1  # reported by main() as a bad port
    p = argparse.ArgumentParser(prog="qwt-serve", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="INT8 ONNX model written by qwt-export")
    p.add_argument("--host", default=host, help=f"address to bind (default $QWT_HOST or {d.host}: this machine "
                   "only; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=port, help=f"TCP port (default $QWT_PORT or {d.port}; 0 = any free port)")
    p.add_argument("--threads", type=int, default=d.threads, help=f"ONNX Runtime intra-op threads (default {d.threads})")
    p.add_argument("--no-batching", action="store_true", help="run each request on its own")
    from ..edge.model import Runtime

    p.add_argument("--runtime", type=Runtime, choices=list(Runtime), default=Runtime.ONNXRUNTIME, metavar="{"
                   + ",".join(r.value for r in Runtime) + "}", help="onnxruntime (default); openvino (pip install "
                   "openvino; often faster on x86 with AVX-512 VNNI); auto: the faster installed one, timed on the "
                   "model at start-up" + " and named in /healthz")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"dynamic batching: samples per run (default {d.max_batch})")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help=f"dynamic batching: longest wait for more requests (default {d.max_wait_ms:g})")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help=f"larger bodies get 413 (default {d.max_request_bytes})")
    p.add_argument("--max-request-samples", type=int, default=0, metavar="N",
                   help="samples one request may hold; more get 413 (default: --max-batch)")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help=f"open connections served at once; more get 503 (default {d.max_connections})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"default top-k per sample (default {d.top_k})")
    p.add_argument("--access-log", action="store_true", help="log every request to stderr")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from ..edge.server import ServeConfig, serve
    from ..log import configure as configure_logging

    configure_logging(0)  # the shutdown lines (SIGTERM, stopped) are INFO on stderr
    from ..errors import QwtError

    try:
        for name, v, lo in (("--threads", a.threads, 1), ("--max-batch", a.max_batch, 1),
                            ("--max-request-bytes", a.max_request_bytes, 1), ("--top-k", a.top_k, 1),
                            ("--max-request-samples", a.max_request_samples, 0),
                            ("--max-connections", a.max_connections, 1)):
            if v < lo:
                raise QwtError(f"{name} {v} is below {lo}", f"pass {name} {lo} or more")
        if not 0 <= a.port <= 65535:
            raise QwtError(f"--port {a.port} is not a TCP port", "pass 0..65535")
        if a.max_wait_ms < 0:
            raise QwtError(f"--max-wait-ms {a.max_wait_ms} is negative", "pass 0 or more")
        from ..edge.model import EdgeModel

        model = EdgeModel(a.model, threads=a.threads, runtime=a.runtime)
        cfg = ServeConfig(host=a.host, port=a.port, threads=a.threads, batching=not a.no_batching,
                          max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, max_request_bytes=a.max_request_bytes,
                          top_k=a.top_k, access_log=a.access_log, max_request_samples=a.max_request_samples,
                          max_connections=a.max_connections)
        try:
            serve(model, cfg, ready=lambda line: print(line, flush=True))
        except OSError as e:
            raise QwtError(f"cannot listen on {a.host}:{a.port} ({e.strerror or e})",
                           "choose another --port or --host") from None
    except QwtError as e:
        print(f"qwt-serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
