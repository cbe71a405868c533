"""ONNX Runtime sessions, Polygraphy-style: a loader named for what it makes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class SessionFromOnnx:
    """Build a CPU ``InferenceSession`` from a file path or serialized model bytes.

    ``allow_spinning=False`` matters when two sessions live in one process (benchmarks):
    idle spinning threads of one session otherwise steal the other's cores.
    """

    model: "str | bytes"
    threads: int = 2
    optimized_model_path: Optional[str] = None
    allow_spinning: bool = True
    level: str = "all"  # all | disable
    # True: keep every Q/DQ node as written (session.disable_quant_qdq), i.e. run a QDQ graph
    # in float simulation. That is how the TensorRT layout is checked on a CPU: ORT's QDQ
    # fusion would otherwise rewrite parts of it into its own integer kernels, which is
    # neither what TensorRT runs nor what the PyTorch simulation computes.
    disable_qdq_fusion: bool = False
    config_entries: Optional[dict] = None  # extra session config entries (benches try ORT options)
    disabled_optimizers: tuple[str, ...] = ()  # ORT graph transformers to skip, by name
    profile_prefix: Optional[str] = None  # write an ORT profile (JSON) with this file prefix

    def __call__(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.level == "all"
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if self.optimized_model_path:
            so.optimized_model_filepath = self.optimized_model_path
        if self.disable_qdq_fusion:
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        if not self.allow_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for k, v in (self.config_entries or {}).items():
            so.add_session_config_entry(k, v)
        if self.profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = self.profile_prefix
        extra = dict(disabled_optimizers=list(self.disabled_optimizers)) if self.disabled_optimizers else {}
        return ort.InferenceSession(self.model, so, providers=["CPUExecutionProvider"], **extra)


def run(session, x):
    """First output for ``x``: an array (single-input model), a feed dict, or anything with
    ``feed(session)`` (``qwt_deploy.data.inputs.InputSet``: token ids + attention mask, ...)."""
    if isinstance(x, dict):
        feed = x
    else:
        feed = x.feed(session) if hasattr(x, "feed") else {session.get_inputs()[0].name: x}
    return session.run(None, feed)[0]


@dataclass
class LatencySamples:
    """One session's timings from :func:`interleaved_samples_ms`."""

    round_ms: list[float]  # mean ms per run, one value per round
    run_ms: list[float]  # every single run (low percentiles ~ an undisturbed machine)


def interleaved_samples_ms(sessions: dict, x, rounds: int = 7, per_round: int = 5, warmup: int = 1,
                           feeds: Optional[dict] = None) -> dict[str, LatencySamples]:
    """Time each session on ``x`` (as :func:`run` takes it; ``feeds`` may give a session its
    own feed dict instead) in alternating rounds in one process: these machines are noisy, so
    only ratios within one run mean anything. Every sample is kept. Create the sessions with
    ``allow_spinning=False``."""
    import time

    inputs = {k: (feeds or {}).get(k, x) for k in sessions}
    for k, s in sessions.items():
        for _ in range(warmup):
            run(s, inputs[k])
    out = {k: LatencySamples([], []) for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                t1 = time.perf_counter()
                run(s, inputs[k])
                out[k].run_ms.append((time.perf_counter() - t1) * 1e3)
            out[k].round_ms.append((time.perf_counter() - t0) / per_round * 1e3)
    return out


def interleaved_latency_ms(sessions: dict, x, rounds: int = 7, per_round: int = 5) -> dict:
    """Median per-run time (ms) of each session on ``x``, over the rounds of
    :func:`interleaved_samples_ms`."""
    import numpy as np

    return {k: float(np.median(v.round_ms)) for k, v in interleaved_samples_ms(sessions, x, rounds, per_round).items()}
