"""``qwt-run``: run an exported INT8 model on one image or array, without PyTorch.

Imports only the edge runtime (onnxruntime, numpy, Pillow): this is the command an edge box
runs to check a model before serving it.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

DESCRIPTION = """\
Run an INT8 ONNX model written by qwt-export on one input and print the top-k classes (or
write the raw outputs). Images are preprocessed exactly as at calibration, from the model's
metadata (resize, crop, mean/std; converted to grey for a 1-channel model such as fashion-cnn,
to RGB for a 3-channel one); .npy arrays are taken as already preprocessed (C,H,W or
N,C,H,W). PyTorch is not needed.
"""

EPILOG = """\
examples:
  qwt-run lite0.int8.onnx --input cat.jpg                 # top-5 with ImageNet names
  qwt-run lite0.int8.onnx --input cat.jpg --top-k 1
  qwt-run fashion-cnn.int8.onnx --input shoe.png           # 28x28 grey, Fashion-MNIST class names
  qwt-run model.int8.onnx --input batch.npy --output logits.npy

Exit code 2 on bad input (missing file, wrong shape or dtype, undecodable image).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwt-run", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="INT8 ONNX model written by qwt-export")
    p.add_argument("--input", "-i", required=True, help="an image (JPEG, PNG, ...) or a preprocessed .npy array")
    p.add_argument("--top-k", type=int, default=5, help="classes to print per sample (default 5)")
    p.add_argument("--output", "-o", help="write the outputs: .npy (first output) or .npz (all, by name)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--json", action="store_true", help="print the top-k as JSON (the same fields /v1/predict returns)")
    from ..edge.model import Runtime

    p.add_argument("--runtime", type=Runtime, choices=list(Runtime), default=Runtime.ONNXRUNTIME, metavar="{"
                   + ",".join(r.value for r in Runtime) + "}", help="onnxruntime (default); openvino (pip install "
                   "openvino; often faster on x86 with AVX-512 VNNI); auto: the faster installed one, timed on the "
                   "model at start-up")
    return p


def load_input(model, path: str):
    """The input tensor (N,C,H,W) for ``path``: a .npy array, else an image."""
    import numpy as np

    from ..edge.model import BadInput
    from ..errors import QwtError

    if not os.path.isfile(path):
        raise QwtError(f"input {path} does not exist", "pass an image file or a .npy array")
    try:
        if path.lower().endswith(".npy"):
            try:
                arr = np.load(path, allow_pickle=False)  # never unpickle an input file
            except ValueError as e:
                raise QwtError(f"input {path} is not a plain .npy array ({e})", "save it with numpy.save") from None
            return model.tensor_from_array(arr)
        with open(path, "rb") as f:
            return model.tensor_from_image(f.read())
    except BadInput as e:
        raise QwtError(f"input {path}: {e.message}", _FIX.get(e.code, "check the input")) from None


_FIX = {"wrong_shape": "pass C,H,W or N,C,H,W matching the model (see the message)",
        "wrong_dtype": "save the array as float32", "not_finite": "remove NaN/inf values",
        "undecodable_image": "pass a JPEG/PNG/BMP/WebP image, or a preprocessed .npy array",
        "image_too_large": "pass a smaller image (or crop it), or a preprocessed .npy array",
        "no_image_preprocessing": "pass a preprocessed .npy array, or re-export as the message says"}


def write_outputs(path: str, names, outs) -> None:
    import numpy as np

    from ..atomic import atomic_write_bytes
    from ..errors import QwtError

    buf = io.BytesIO()
    if path.lower().endswith(".npz"):
        np.savez(buf, **dict(zip(names, outs)))
    elif path.lower().endswith(".npy"):
        np.save(buf, outs[0])
    else:
        raise QwtError(f"--output {path} is neither .npy nor .npz", "name it out.npy (first output) or out.npz (all)")
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from ..errors import QwtError

    try:
        if a.top_k < 1:
            raise QwtError(f"--top-k {a.top_k} is below 1", "pass --top-k 1 or more")
        if a.output:
            from ..atomic import check_writable

            check_writable(a.output, inputs=(a.model, a.input))
        from ..edge.model import EdgeModel

        model = EdgeModel(a.model, threads=a.threads, runtime=a.runtime)
        x = load_input(model, a.input)
        outs = model.run(x)
        if a.output:
            write_outputs(a.output, model.output_names, outs)
    except QwtError as e:
        print(f"qwt-run: error: {e}", file=sys.stderr)
        return 2
    if outs[0].ndim == 2:
        tops = [[t.to_dict() for t in model.top_k(row, a.top_k)] for row in outs[0]]
        if a.json:
            import json

            print(json.dumps({"top_k": tops}))
        else:
            for i, top in enumerate(tops):
                if len(tops) > 1:
                    print(f"sample {i}:")
                print(f"{'rank':>4}  {'class':>5}  {'prob':>6}  {'score':>8}  label")
                for r, t in enumerate(top, 1):
                    print(f"{r:>4}  {t['index']:>5}  {t['probability']:>6.3f}  {t['score']:>8.3f}  {t.get('label', '')}")
    elif not a.output:
        print(f"outputs: {', '.join(f'{n} {list(o.shape)}' for n, o in zip(model.output_names, outs))} "
              "(not N x classes: pass --output out.npz to keep them)")
    if a.output:
        print(f"wrote {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
