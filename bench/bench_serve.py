"""Bounded load test of qwt-serve on loopback: batching on vs off, interleaved.

    python bench/bench_serve.py --model lite0.int8.onnx            # 1,000 requests each, 8 concurrent
    python bench/bench_serve.py --model lite0.int8.onnx --threads 1 --requests 200
    python bench/bench_serve.py --model lite0.int8.onnx --soak 5000      # memory soak: RSS every 500 requests

Starts two qwt-serve processes on 127.0.0.1 (ephemeral ports): one with dynamic batching, one
with --no-batching. Requests are real photos (the 20 foolbox ImageNet JPEGs and scikit-image's
photos) sent as image bytes, so decoding and preprocessing are in the measurement. The two
servers are loaded in alternating rounds, so that a noisy shared CPU hits both alike. Reports
p50/p99 latency, throughput, errors, mean batch size (from /metrics) and each server's RSS after
warm-up, after each round and after the load: a leak grows round after round, while ONNX Runtime's
memory arena grows to the peak concurrency once and then stays flat. Writes bench/results/serve.json.

--soak N sends N requests to each server in stages of --soak-stage (default 500), alternating
between the servers stage by stage, and prints each server's RSS (VmRSS from /proc/PID/status)
after every stage, with the growth per 1,000 requests over the first and the second half of the
soak: a leak keeps growing at the same rate, a warm-up (ORT arena, allocator pools) flattens out.
Writes bench/results/serve_soak.json.

Without --model, EfficientNet-Lite0 INT8 is exported first (needs the demo extra and torch).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import http.client
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")


def photos() -> list[tuple[bytes, str]]:
    out = []
    for mod, pattern in (("foolbox", "data/imagenet_*.jpg"), ("skimage", "data/*.png"), ("skimage", "data/*.jpg")):
        spec = importlib.util.find_spec(mod)
        if spec is None:
            continue
        for p in sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), pattern))):
            if os.path.getsize(p) < 2_000_000:
                out.append((open(p, "rb").read(), "image/png" if p.endswith(".png") else "image/jpeg"))
    if not out:
        sys.exit("no photos found: pip install '.[demo]' (foolbox, scikit-image)")
    return out


class Server:
    def __init__(self, model: str, flags: list[str], fresh_connections: bool = False):
        self.fresh = fresh_connections  # a new TCP connection (so a new server thread) per request
        self.proc = subprocess.Popen([sys.executable, "-m", "qwt_deploy.cli.serve", model, "--port", "0", *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            sys.exit(f"qwt-serve did not start: {line} {self.proc.stderr.read()}")
        self.port = int(m.group(1))
        self.local = threading.local()

    def rss_mb(self) -> float:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def conn(self) -> http.client.HTTPConnection:
        if getattr(self.local, "c", None) is None:
            self.local.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        return self.local.c

    def predict(self, body: bytes, ctype: str) -> tuple[bool, float]:
        t = time.perf_counter()
        try:
            c = self.conn()
            c.request("POST", "/v1/predict", body=body, headers={"Content-Type": ctype})
            r = c.getresponse()
            data = r.read()
            ok = r.status == 200 and b'"top_k"' in data
            if self.fresh:
                c.close()
                self.local.c = None
        except (OSError, http.client.HTTPException):
            self.local.c = None
            ok = False
        return ok, time.perf_counter() - t

    def metrics(self) -> str:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        c.request("GET", "/metrics")
        return c.getresponse().read().decode()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def metric_sum(text: str, name: str) -> float:
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + " ") or l.startswith(name + "{"))


def slope_kb_per_1000(requests: list[int], rss_mb: list[float]) -> float:
    """Least-squares RSS growth in KB per 1,000 requests (0 for fewer than two points)."""
    if len(requests) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(requests, float), np.asarray(rss_mb, float), 1)[0] * 1024 * 1000)


def soak(servers: dict, imgs: list, total: int, stage: int, concurrency: int) -> dict:
    """``total`` requests per server in stages of ``stage``; RSS after each stage."""
    table = {name: dict(requests=[0], rss_mb=[round(s.rss_mb(), 1)], errors=0) for name, s in servers.items()}
    pools = {name: cf.ThreadPoolExecutor(concurrency) for name in servers}  # persistent keep-alive clients
    done, k, t0 = 0, 0, time.perf_counter()
    try:
        while done < total:
            n = min(stage, total - done)
            for name, s in servers.items():
                jobs = [imgs[(k + i) % len(imgs)] for i in range(n)]
                out = list(pools[name].map(lambda j: s.predict(*j), jobs))
                table[name]["errors"] += sum(1 for ok, _ in out if not ok)
                table[name]["requests"].append(done + n)
                table[name]["rss_mb"].append(round(s.rss_mb(), 1))
            done += n
            k += n
            print(f"  {done} requests per server, {time.perf_counter() - t0:.0f} s: "
                  + ", ".join(f"{name} {t['rss_mb'][-1]:.1f} MB" for name, t in table.items()), file=sys.stderr)
    finally:
        for pool in pools.values():
            pool.shutdown()
    for t in table.values():
        h = len(t["requests"]) // 2  # first stage after warm-up .. middle, middle .. end
        t["growth_kb_per_1000_first_half"] = round(slope_kb_per_1000(t["requests"][1:h + 1], t["rss_mb"][1:h + 1]), 1)
        t["growth_kb_per_1000_second_half"] = round(slope_kb_per_1000(t["requests"][h:], t["rss_mb"][h:]), 1)
        # RSS wobbles by several MB from stage to stage (allocator arenas, ORT buffers); the peaks
        # say more than a slope: a leak keeps raising the peak, a warm-up does not.
        t["peak_mb_first_half"] = max(t["rss_mb"][1:h + 1], default=None)
        t["peak_mb_second_half"] = max(t["rss_mb"][h + 1:], default=None)
    return table


def print_soak(table: dict) -> None:
    names = list(table)
    print(f"{'requests':>9}" + "".join(f"{n + ' RSS MB':>22}" for n in names))
    for i, r in enumerate(table[names[0]]["requests"]):
        print(f"{r:>9}" + "".join(f"{table[n]['rss_mb'][i]:>22.1f}" for n in names))
    for key in ("growth_kb_per_1000_first_half", "growth_kb_per_1000_second_half", "peak_mb_first_half",
                "peak_mb_second_half", "errors"):
        print(f"{key:<34}" + "  ".join(f"{n} {table[n][key]}" for n in names))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="INT8 ONNX model (default: export EfficientNet-Lite0 INT8 first)")
    p.add_argument("--requests", type=int, default=1000, help="requests per server (default 1000)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8, help="alternating rounds the requests are split into")
    p.add_argument("--threads", type=int, default=2, help="qwt-serve --threads (ORT intra-op threads)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--soak", type=int, default=0, metavar="N",
                   help="memory soak instead of the load test: N requests per server, RSS after every stage")
    p.add_argument("--soak-stage", type=int, default=500, help="requests per soak stage (default 500)")
    p.add_argument("--fresh-connections", action="store_true",
                   help="one TCP connection per request (as curl or a health checker does), not keep-alive")
    p.add_argument("--out", help="JSON results (default bench/results/serve.json, or serve_soak.json with --soak)")
    a = p.parse_args()
    a.out = a.out or os.path.join(RESULTS, "serve_soak.json" if a.soak else "serve.json")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    model = a.model
    if not model:
        model = os.path.join(RESULTS, "lite0.int8.onnx")
        if not os.path.exists(model):
            print("exporting EfficientNet-Lite0 INT8 ...", file=sys.stderr)
            subprocess.run(["qwt-export", "--example", "efficientnet-lite0", "--no-latency", "--quiet", "-o", model],
                           check=True)
    imgs = photos()
    common = ["--threads", str(a.threads)]
    servers = {"batching": Server(model, common + ["--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms)],
                                  a.fresh_connections),
               "no_batching": Server(model, common + ["--no-batching"], a.fresh_connections)}
    res = {}
    try:
        for name, s in servers.items():
            res[name] = dict(rss_start_mb=s.rss_mb(), lat=[], errors=0, wall=0.0)
            with cf.ThreadPoolExecutor(a.concurrency) as pool:  # warm-up: every photo once, concurrently
                list(pool.map(lambda i: s.predict(*imgs[i % len(imgs)]), range(max(len(imgs), 4 * a.concurrency))))
            res[name]["rss_before_mb"] = s.rss_mb()
            res[name]["metrics_before"] = s.metrics()
        if a.soak:
            table = soak(servers, imgs, a.soak, a.soak_stage, a.concurrency)
            report = dict(model=os.path.abspath(model), photos=len(imgs), server_threads=a.threads,
                          max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, concurrency=a.concurrency,
                          soak_requests=a.soak, stage=a.soak_stage, fresh_connections=a.fresh_connections,
                          malloc_arena_max=os.environ.get("MALLOC_ARENA_MAX"), cpu_count=os.cpu_count(),
                          load_avg_at_end=os.getloadavg(),
                          rss_after_warmup_mb={n: round(r["rss_before_mb"], 1) for n, r in res.items()},
                          rss_at_start_mb={n: round(r["rss_start_mb"], 1) for n, r in res.items()}, soak=table)
            with open(a.out, "w") as f:
                json.dump(report, f, indent=1)
            print_soak(table)
            print(f"wrote {a.out}")
            return 0 if all(t["errors"] == 0 for t in table.values()) else 1
        # One client pool per server for the whole run: its 8 keep-alive connections (and so the
        # server's 8 handler threads) persist across rounds, as behind a real client pool.
        pools = {name: cf.ThreadPoolExecutor(a.concurrency) for name in servers}
        per_round = [a.requests // a.rounds + (1 if r < a.requests % a.rounds else 0) for r in range(a.rounds)]
        k = 0
        for r, n in enumerate(per_round):
            for name in (("batching", "no_batching") if r % 2 == 0 else ("no_batching", "batching")):
                s = servers[name]
                jobs = [imgs[(k + i) % len(imgs)] for i in range(n)]
                t = time.perf_counter()
                out = list(pools[name].map(lambda j: s.predict(*j), jobs))
                res[name]["wall"] += time.perf_counter() - t
                res[name]["lat"] += [dt for ok, dt in out if ok]
                res[name]["errors"] += sum(1 for ok, _ in out if not ok)
                res[name].setdefault("rss_by_round", []).append(round(s.rss_mb(), 1))
            k += n
        for pool in pools.values():
            pool.shutdown()
        summary = {}
        for name, s in servers.items():
            m = s.metrics()
            runs = metric_sum(m, "qwt_batch_size_count") - metric_sum(res[name]["metrics_before"], "qwt_batch_size_count")
            samples = metric_sum(m, "qwt_batch_size_sum") - metric_sum(res[name]["metrics_before"], "qwt_batch_size_sum")
            lat = np.array(res[name]["lat"]) * 1e3
            summary[name] = dict(
                requests=a.requests, concurrency=a.concurrency, errors=res[name]["errors"],
                p50_ms=round(float(np.percentile(lat, 50)), 2), p99_ms=round(float(np.percentile(lat, 99)), 2),
                mean_ms=round(float(lat.mean()), 2), throughput_rps=round(a.requests / res[name]["wall"], 1),
                mean_batch=round(samples / runs, 2) if runs else None,
                rss_start_mb=round(res[name]["rss_start_mb"], 1), rss_before_mb=round(res[name]["rss_before_mb"], 1),
                rss_after_mb=round(s.rss_mb(), 1), rss_by_round_mb=res[name]["rss_by_round"])
    finally:
        for s in servers.values():
            s.stop()
    report = dict(model=os.path.abspath(model), photos=len(imgs), server_threads=a.threads, max_batch=a.max_batch,
                  max_wait_ms=a.max_wait_ms, rounds=a.rounds, cpu_count=os.cpu_count(),
                  load_avg_at_end=os.getloadavg(), results=summary,
                  throughput_ratio_batching_vs_off=round(summary["batching"]["throughput_rps"] /
                                                         summary["no_batching"]["throughput_rps"], 3),
                  note="loopback, client and servers on the same shared CPU; interleaved rounds")
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    cols = ("errors", "p50_ms", "p99_ms", "throughput_rps", "mean_batch", "rss_before_mb", "rss_after_mb")
    print(f"{'mode':<12}" + "".join(f"{c:>15}" for c in cols))
    for name, r in summary.items():
        print(f"{name:<12}" + "".join(f"{str(r[c]):>15}" for c in cols))
    print(f"wrote {a.out}")
    return 0 if all(r["errors"] == 0 for r in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
