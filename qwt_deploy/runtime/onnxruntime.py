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
        return ort.InferenceSession(self.model, so, providers=["CPUExecutionProvider"])


def run(session, x):
    """First output for ``x``: an array (single-input model), a feed dict, or anything with
    ``feed(session)`` (``calibration.inputs.InputSet``: token ids + attention mask, ...)."""
    if isinstance(x, dict):
        feed = x
    else:
        feed = x.feed(session) if hasattr(x, "feed") else {session.get_inputs()[0].name: x}
    return session.run(None, feed)[0]


def interleaved_latency_ms(sessions: dict, x, rounds: int = 7, per_round: int = 5) -> dict:
    """Median per-run time (ms) of each session on ``x`` (as :func:`run` takes it), measured in
    alternating rounds in one process: these machines are noisy, so only ratios within one run
    mean anything. Create the sessions with ``allow_spinning=False``."""
    import time

    import numpy as np

    times = {k: [] for k in sessions}
    for s in sessions.values():
        run(s, x)  # warm-up
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                run(s, x)
            times[k].append((time.perf_counter() - t0) / per_round * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}
