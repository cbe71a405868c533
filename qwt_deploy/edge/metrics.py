"""Request counts and latency histograms in the Prometheus text format (no client library:
the edge image carries only onnxruntime, numpy and Pillow)."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, cum = [], 0
        sep = "," if labels else ""
        for b, c in zip(list(self.buckets) + ["+Inf"], self.counts):
            cum += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b}"}} {cum}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum:.6f}", f"{name}_count{lab} {self.count}"]
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (path, status code, error code) -> n
        self.latency: dict[str, Histogram] = {}  # path -> seconds, answered requests of any status
        self.batch_size = Histogram(BATCH_BUCKETS)

    def record(self, path: str, status: int, seconds: float, error: str = "") -> None:
        with self._lock:
            self.requests[(path, status, error)] += 1
            self.latency.setdefault(path, Histogram(LATENCY_BUCKETS_S)).observe(seconds)

    def record_batch(self, n: int) -> None:
        with self._lock:
            self.batch_size.observe(n)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP qwt_requests_total HTTP requests answered, by path, status code and error code.",
                     "# TYPE qwt_requests_total counter"]
            for (path, status, error), n in sorted(self.requests.items()):
                lines.append(f'qwt_requests_total{{path="{path}",code="{status}",error="{error}"}} {n}')
            lines += ["# HELP qwt_request_duration_seconds Time from request read to response written.",
                      "# TYPE qwt_request_duration_seconds histogram"]
            for path, h in sorted(self.latency.items()):
                lines += h.lines("qwt_request_duration_seconds", f'path="{path}"')
            lines += ["# HELP qwt_batch_size Samples per model run (dynamic batching).",
                      "# TYPE qwt_batch_size histogram"]
            lines += self.batch_size.lines("qwt_batch_size")
        return "\n".join(lines) + "\n"
