"""QwT (v1) branches in FP16 for --target trt: what FP16 costs and whether the CPU check holds.

For each Fashion-MNIST example (CNN: 1x1 Conv branches; ViT: D x D MatMul branches), at W8A8
and W4A8, methods qwt and qwt,qwt2, --target trt, each file made by the public API as
``qwt-export --target trt`` makes it (``api.quantize`` -> ``api.export``):

- test accuracy of the PyTorch simulation with FP16 branches (what TensorRT runs) and, for
  comparison, of the same pipeline calibrated and simulated with FP32 branches (the trt target
  with ``branch_precision="fp32"``: ``dataclasses.replace(TRT, branch_precision="fp32")``);
- ONNX Runtime on the check copy (``api.check_session``: integer accumulators + FP16
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
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

from qwt_deploy import api
from qwt_deploy.calibration.sequential import CalibrationSettings
from qwt_deploy.comparison.agreement import compare
from qwt_deploy.config import QuantizeConfig
from qwt_deploy.examples import EXAMPLES
from qwt_deploy.graph_passes.rewrite_layers_as_integer_accumulators import rewrite_layers_as_integer_accumulators
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, run
from qwt_deploy.targets import TRT

# --target trt with the QwT branches in each precision (the fp32 one exists only for this comparison)
TARGETS = {"fp16": TRT, "fp32": dataclasses.replace(TRT, branch_precision="fp32")}


def _batched(fn, x, bs=500):
    return np.concatenate([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def bench_example(name, quick, threads, log):
    ex = EXAMPLES[name]
    try:
        model = ex.build()
        xc = ex.calibration(64 if quick else 512, 0)
        xe, ye = ex.evaluation(2000 if quick else None, 1)
    except Exception as e:  # missing dataset package: say so, do not fail the other example
        return dict(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    rows = []
    for bits in ((8, 8), (4, 8)):
        for method in ("qwt", "qwt,qwt2"):
            row = dict(example=name, bits=f"W{bits[0]}A{bits[1]}", method=method, eval_samples=int(len(xe)))
            for precision, target in TARGETS.items():
                t = time.perf_counter()
                cfg = QuantizeConfig(target=target, settings=CalibrationSettings(w_bits=bits[0], a_bits=bits[1],
                                                                                 method=method),
                                     num_calib=len(xc), threads=threads, example_shape=tuple(ex.input_shape))
                qm = api.quantize(model, xc, cfg)
                exported = api.export(qm)
                sim = qm.simulation()
                with torch.no_grad():
                    ref = _batched(lambda b: sim(torch.from_numpy(b)).numpy(), xe)
                comp = api.model_report(exported)["compensation"]
                row[f"sim_accuracy_{precision}"] = float((ref.argmax(1) == ye).mean())
                row[f"branch_bytes_{precision}"] = comp["branch_bytes"]
                row[f"file_bytes_{precision}"] = len(exported.data)
                row[f"calib_s_{precision}"] = qm.result.seconds
                if precision == "fp16":
                    row.update(branch_params=comp["branch_params"], blocks_kept=comp["blocks_kept"],
                               blocks_found=comp["blocks_found"], branch_precision=comp["branch_precision"])
                    sess = api.check_session(exported, threads)
                    got = _batched(lambda b: run(sess, b), xe)
                    a = compare(ref, got)
                    row.update(check_within_1_step=a.within_1_step, check_max_steps=a.max_steps,
                               check_accuracy=float((got.argmax(1) == ye).mean()))
                    # the check copy without its FP16 emulation (TRT.runtime_copy minus emulate_fp16_in_fp32),
                    # in the check's session settings
                    rw, _ = rewrite_layers_as_integer_accumulators(exported.folded)
                    plain = SessionFromOnnx(rw.SerializeToString(), threads, allow_spinning=False,
                                            **target.session_settings())()
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
