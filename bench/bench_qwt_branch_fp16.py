"""QwT (v1) branches in FP16 for --target trt: what FP16 costs and whether the CPU check holds.

For each Fashion-MNIST example (CNN: 1x1 Conv branches; ViT: D x D MatMul branches), at W8A8
and W4A8, methods qwt and qwt,qwt2, --target trt:

- test accuracy of the PyTorch simulation with FP16 branches (what TensorRT runs) and, for
  comparison, of the same pipeline calibrated and simulated with FP32 branches;
- ONNX Runtime on the check copy (pipeline.trt_float_simulation: integer accumulators + FP16
  branches emulated as FP32 sums of FP16-rounded values) vs the simulation: fraction of output
  elements within 1 output step, max steps;
- the same without the FP16 emulation (ORT's CPU provider then silently drops the FP16
  roundings), to show why the check copy needs it;
- branch bytes (FP16 vs FP32) and file size.

No latency: TensorRT is not installable here and ORT CPU timings say nothing about it.

    python bench/bench_qwt_branch_fp16.py [--quick] [--threads 1] [--out bench/results/qwt_branch_fp16.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import calibration.qwt_branch as qwt_branch  # noqa: E402
from calibration.data import batches  # noqa: E402
from calibration.qwt_branch import compensation_summary, with_qwt_branches  # noqa: E402
from calibration.sequential import CalibrationSettings, calibrate  # noqa: E402
from graph_passes import fold_cwac_into_weight_scales  # noqa: E402
from graph_passes.rewrite_layers_as_integer_accumulators import rewrite_layers_as_integer_accumulators  # noqa: E402
from qwt_deploy.check.agreement import compare  # noqa: E402
from qwt_deploy.examples import EXAMPLES  # noqa: E402
from qwt_deploy.export.qdq import export_onnx  # noqa: E402
from qwt_deploy.load.capture import capture, export_program  # noqa: E402
from qwt_deploy.pipeline import trt_float_simulation  # noqa: E402
from qwt_deploy.quantize.placement import plan_for_trt  # noqa: E402
from qwt_deploy.quantize.simulate import SimulatedModel  # noqa: E402
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, run  # noqa: E402


def _batched(fn, x, bs=500):
    return np.concatenate([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def _deployed(graph0, xc, bits, method, precision):
    """Calibrate + export for trt with the given branch precision (patched per run)."""
    saved = dict(qwt_branch.BRANCH_PRECISION)
    qwt_branch.BRANCH_PRECISION["trt"] = precision
    try:
        g = with_qwt_branches(graph0, method)
        plan = plan_for_trt(g)
        r = calibrate(g, plan, batches(xc, 32), CalibrationSettings(w_bits=bits[0], a_bits=bits[1], method=method))
        folded, _ = fold_cwac_into_weight_scales(export_onnx(g, plan, r.params))
    finally:
        qwt_branch.BRANCH_PRECISION.clear()
        qwt_branch.BRANCH_PRECISION.update(saved)
    return g, plan, r, folded


def bench_example(name, quick, threads, log):
    ex = EXAMPLES[name]
    try:
        model = ex.build()
        xc = ex.calibration(64 if quick else 512, 0)
        xe, ye = ex.evaluation(2000 if quick else None, 1)
    except Exception as e:  # missing dataset package: say so, do not fail the other example
        return dict(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    graph0 = capture(export_program(model, torch.zeros((2,) + tuple(ex.input_shape))))
    rows = []
    for bits in ((8, 8), (4, 8)):
        for method in ("qwt", "qwt,qwt2"):
            row = dict(example=name, bits=f"W{bits[0]}A{bits[1]}", method=method, eval_samples=int(len(xe)))
            for precision in ("fp16", "fp32"):
                t = time.perf_counter()
                g, plan, r, folded = _deployed(graph0, xc, bits, method, precision)
                sim = SimulatedModel(g, plan, r.params)
                with torch.no_grad():
                    ref = _batched(lambda b: sim(torch.from_numpy(b)).numpy(), xe)
                comp = compensation_summary(g, r)
                row[f"sim_accuracy_{precision}"] = float((ref.argmax(1) == ye).mean())
                row[f"branch_bytes_{precision}"] = comp["branch_bytes"]
                row[f"file_bytes_{precision}"] = len(folded.SerializeToString())
                row[f"calib_s_{precision}"] = r.seconds
                if precision == "fp16":
                    row.update(branch_params=comp["branch_params"], blocks_kept=comp["blocks_kept"],
                               blocks_found=comp["blocks_found"], branch_precision=comp["branch_precision"])
                    sess = trt_float_simulation(folded, threads)
                    got = _batched(lambda b: run(sess, b), xe)
                    a = compare(ref, got)
                    row.update(check_within_1_step=a.within_1_step, check_max_steps=a.max_steps,
                               check_accuracy=float((got.argmax(1) == ye).mean()))
                    rw, _ = rewrite_layers_as_integer_accumulators(folded)  # no FP16 emulation
                    plain = SessionFromOnnx(rw.SerializeToString(), threads, allow_spinning=False, level="disable",
                                            disable_qdq_fusion=True)()
                    b = compare(ref, _batched(lambda x: run(plain, x), xe))
                    row.update(no_emulation_within_1_step=b.within_1_step, no_emulation_max_steps=b.max_steps)
                row[f"wall_s_{precision}"] = time.perf_counter() - t
            rows.append(row)
            log(f"{name} {row['bits']} {method:9s} acc fp16 {row['sim_accuracy_fp16']:.4f} fp32 {row['sim_accuracy_fp32']:.4f} | "
                f"check within 1 step {row['check_within_1_step']:.5f} (max {row['check_max_steps']:.2f}) | "
                f"no FP16 emulation {row['no_emulation_within_1_step']:.5f} (max {row['no_emulation_max_steps']:.2f}) | "
                f"branch {row['branch_bytes_fp16']:,} B fp16 vs {row['branch_bytes_fp32']:,} B fp32, "
                f"{row['blocks_kept']}/{row['blocks_found']} kept")
    return dict(rows=rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 calibration / 2000 test images (default 512 / 10k)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--examples", default="fashion-cnn,fashion-vit")
    ap.add_argument("--out", default=None, help="JSON results file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    res = {k: bench_example(k, a.quick, a.threads, print) for k in a.examples.split(",")}
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
