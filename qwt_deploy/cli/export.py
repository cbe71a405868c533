"""``qwt-export``: PyTorch model -> QwT-v2 compensated, folded INT8 QDQ ONNX."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..errors import InternalError, QwtError
from ..log import configure as configure_logging

from ..examples import EXAMPLES  # the typed registry of built-in examples (name -> Example)

DEFAULT_INPUT_SHAPE = "3,224,224"
DEFAULT_KEEP_FLOAT = "layer_norm,softmax,gelu"

DESCRIPTION = """\
Quantize a trained PyTorch model to INT8 (per-channel weights, per-tensor activations),
compensate the quantization error in closed form (QwT-v2 channel-wise affine compensation),
and write a standard QDQ ONNX file whose compensation is folded into the weight scales and
biases: no extra nodes, no custom ops.

Model input (recognised by content, not extension):
  model.pt2                       a torch.export program (torch.export.save) -- recommended
  --model-factory pkg.mod:fn [w]  a Python factory, plus an optional state-dict file w
  model.pt --trust-pickle         a pickled nn.Module (unpickling runs code from the file)

The exported file's batch axis is dynamic (input and output axis 0, named "batch"): run it at
any batch size. --input-shape and the calibration data fix only the other axes.
"""

EPILOG = """\
examples:
  # the built-in example: EfficientNet-Lite0 with real photos that the install brings
  qwt-export --example efficientnet-lite0 -o lite0.int8.onnx

  # the Fashion-MNIST examples trained in this repo (apt-get install dataset-fashion-mnist):
  # calibrated on 512 training images, checked on test images
  qwt-export --example fashion-cnn -o fashion-cnn.int8.onnx
  qwt-export --example fashion-vit -o fashion-vit.int8.onnx

  # a transformer with token inputs: all-MiniLM-L6-v2 (pip install 'qwt-deploy[text]'),
  # calibrated on pydoc sentences; ONNX with dynamic batch and sequence axes
  qwt-export --example minilm -o minilm.int8.onnx

  # your token model: a torch.export program with dynamic axes, and token batches
  # saved with numpy.savez('tokens.npz', input_ids=ids, attention_mask=mask)
  qwt-export bert.pt2 --calib-data tokens.npz -o bert.int8.onnx

  # your model, your preprocessed calibration array (N x C x H x W float32)
  qwt-export model.pt2 --calib-data calib.npy --target ort -o model.int8.onnx

  # an image folder, preprocessed explicitly (--resize/--crop left out: from the model's input size)
  qwt-export model.pt2 --calib-data images/ --resize 256 --crop 224 --mean 123.7,116.3,103.5 --std 58.4,57.1,57.4

  # preprocessed arrays, and how they were made: recorded so that qwt-run/qwt-serve take images
  qwt-export model.pt2 --calib-data calib.npy --resize 298 --mean 123.7,116.3,103.5 --std 58.4,57.1,57.4

  # the TensorRT layout (symmetric INT8, Q/DQ on layer inputs, float bias), checked against
  # TensorRT's rules; builds lite0.trt.engine where TensorRT and a GPU exist, else writes
  # the trtexec command line to lite0.trt.trtexec.txt
  qwt-export --example efficientnet-lite0 --target trt -o lite0.trt.onnx

  # QwT (v1) block branches on top of CWAC; the report lists each block's R^2 and extra parameters
  qwt-export --example efficientnet-lite0 --method qwt,qwt2 -o lite0.qwt.onnx

  # 4-bit weights (emulated in INT8 containers), compare against plain PTQ
  qwt-export model.pt2 --calib-data calib.npy --w-bits 4 --method none -o plain.onnx

Writes OUTPUT and OUTPUT-minus-.onnx + .report.json (per-layer alpha/beta and fit quality,
INT8 coverage, ONNX Runtime vs PyTorch agreement, latency, sizes). Exit code 2 on bad input.
"""


def _one_target(s: str) -> str:
    if "," in s:  # qwt-check --targets takes a list; an export writes one file for one layout
        raise argparse.ArgumentTypeError(f"{s!r}: qwt-export writes one file for one target; run it once per "
                                         "target (qwt-check --targets ort,trt compares several)")
    return s


def _floats3(s: str) -> tuple[float, float, float]:
    parts = [float(p) for p in s.split(",")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("give one value or three comma-separated values (R,G,B)")
    return tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    from ..config import CALIB_METHODS, METHODS, TARGET_NAMES

    p = argparse.ArgumentParser(prog="qwt-export", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="model file (torch.export program), or state dict with --model-factory")
    p.add_argument("-o", "--output", help="output ONNX path (default: <model>.int8.onnx)")
    src = p.add_argument_group("model source")
    src.add_argument("--example", choices=sorted(EXAMPLES), help="use a built-in example model and its bundled real data "
                     "(efficientnet-lite0: photos from the demo extra; fashion-*: Fashion-MNIST; minilm: "
                     "pydoc sentences, needs the text extra)")
    src.add_argument("--model-factory", metavar="PKG.MOD:FN", help="callable that builds the nn.Module")
    src.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled nn.Module (runs code from the file)")
    src.add_argument("--input-shape", default=DEFAULT_INPUT_SHAPE, help="C,H,W used to trace an nn.Module (default 3,224,224)")
    cal = p.add_argument_group("calibration data")
    cal.add_argument("--calib-data", help="preprocessed .npy/.npz (N,C,H,W); for a model with several inputs "
                     "(token ids + attention mask) an .npz with one array per input, named as the inputs; an image "
                     "folder, 'bundled' (real photos "
                     "from the demo extra), example:NAME (a built-in example's data, e.g. example:fashion-cnn = 512 Fashion-MNIST "
                     "training images), or 'synthetic' (noise: accuracy figures then mean nothing)")
    cal.add_argument("--num-calib", type=int, default=512, help="calibration samples (default 512, as in the QwT papers)")
    cal.add_argument("--batch-size", type=int, default=32, help="calibration samples per forward pass (default "
                     "32): larger is faster and holds more activations in memory")
    # Preprocessing: None = not given. Image sources (a folder, 'bundled') complete it from the
    # model's input size; for arrays only given values are recorded (Preprocess.for_input/for_arrays).
    cal.add_argument("--resize", type=int, default=None, help="images: resize the short side to this (default: "
                     "crop / 0.875, e.g. 256 for a 224 crop). With .npy/.npz data: how the arrays were made, "
                     "recorded in the model so qwt-run/qwt-serve take images (give --resize, --mean and --std)")
    cal.add_argument("--crop", type=int, default=None, help="images: center-crop size; must be the model's input "
                     "size (default: the model's input height = width)")
    cal.add_argument("--mean", type=_floats3, default=None, help="images: per-channel mean on 0..255 (one value, or "
                     "R,G,B; default 127 for image folders; with arrays recorded only when given)")
    cal.add_argument("--std", type=_floats3, default=None, help="images: per-channel std on 0..255 (default 128 for "
                     "image folders; with arrays recorded only when given)")
    q = p.add_argument_group("quantization and compensation")
    q.add_argument("--target", "--targets", dest="target", type=_one_target, choices=TARGET_NAMES, default="ort",
                   help="backend layout (--targets is the same flag, as qwt-check spells it; one target per "
                   "file: run qwt-export once per target). ort = ONNX Runtime CPU integer "
                   "kernels (uint8 asymmetric activations, Q on op outputs so ORT fuses QLinearConv/QGemm, INT32 "
                   "bias). trt = TensorRT explicit quantization (symmetric INT8 activations with zero point 0, Q/DQ "
                   "on the inputs of Conv/Gemm and on the skip input of residual Adds so TensorRT fuses them, float "
                   "bias); checked against TensorRT's rules (qwt-check --lint trt), verified in ONNX Runtime float "
                   "simulation, and built into an engine where TensorRT and a GPU exist"),
    q.add_argument("--method", choices=METHODS, default="qwt2", metavar="METHOD", help="one of "
                   + " | ".join(METHODS) + " (a comma joins QwT v1 branches to a per-layer method). "
                   "qwt2 = channel-wise affine compensation (default); "
                   "bias-correction = same with alpha fixed at 1; none = plain PTQ; qwt = QwT (v1): one closed-form "
                   "linear branch per residual block (1x1 conv / MatMul + Add, float, extra parameters and latency); "
                   "qwt,qwt2 = both")
    q.add_argument("--w-bits", type=int, default=8, choices=range(2, 9), metavar="{2..8}", help="weight bits (default 8)")
    q.add_argument("--a-bits", type=int, default=8, choices=range(2, 9), metavar="{2..8}", help="activation bits (default 8)")
    q.add_argument("--keep-float", default=DEFAULT_KEEP_FLOAT, metavar="LIST",
                   help="comma-separated nodes left in float, each an op kind (add, mul, conv, linear, matmul, "
                        "embedding: every node of that kind; or an ONNX op type), an exact node name "
                        "(_blocks.15._project_conv: the module path, as the report's layer table names it), or "
                        "re:PATTERN (a regular expression searched in node names), e.g. --keep-float "
                        "'add,_blocks.15._project_conv,re:^_blocks\\.1[45]\\.'. A Conv/Linear kept float keeps its "
                        "float weights (on --target ort its bias is written as an INT32 DequantizeLinear so that ONNX "
                        "Runtime does not quantize the weight itself). A name or pattern that selects no node, or a word that is none of these, "
                        "is an error; a kind the model lacks is not. LayerNorm, Softmax, GELU and every op without "
                        "an integer kernel are float anyway. Use 'add' to keep residual adds float (transformers' "
                        "outlier channels; the minilm example's default)")
    q.add_argument("--calib-method", choices=CALIB_METHODS, default="auto", help="activation range observer; "
                   "auto (default) = minmax for --target ort, mse for --target trt (symmetric INT8 wastes half "
                   "its grid on ReLU outputs, so clipping outliers pays there)")
    q.add_argument("--percentile", type=float, default=99.99, help="for --calib-method percentile (default 99.99)")
    q.add_argument("--weight-observer", choices=("auto", "minmax", "mse"), default="auto",
                   help="per-channel weight range: auto = mse below 8 bits, else minmax")
    q.add_argument("--ridge", type=float, default=1e-3, help="CWAC ridge, relative to the layer's mean output variance; "
                   "channels with ~zero variance fall back to alpha=1 (default 1e-3)")
    q.add_argument("--qwt-ridge", type=float, default=1e-3, help="QwT branch ridge, relative to the block input's "
                   "mean variance (0 = plain least squares; default 1e-3)")
    q.add_argument("--qwt-group-channels", type=int, default=64, help="QwT CNN branch: input channels per group of "
                   "the 1x1 conv, as QwT's ResNet code (0 = dense; default 64)")
    q.add_argument("--qwt-blocks", default="auto", metavar="auto|residual|REGEX", help="how QwT finds blocks: "
                   "auto = group layers by module path up to the first '.<index>.' (_blocks.3, layer1.0, "
                   "encoder.layer.2), else residual regions; residual = every Y = Add(X, f(X)) region; or a regex "
                   "whose group 1 is the block key (default auto)")
    q.add_argument("--cwac-reference", choices=("same-input", "float-input"), default="same-input",
                   help="input of the full-precision layer in the fit: the quantized input the layer sees (QwT-v2), "
                        "or the value before its input quantizer")
    add_accuracy_arguments(p)
    p.add_argument("--labels", metavar="FILE", help="class names, one per line, stored in the ONNX metadata so "
                   "qwt-run/qwt-serve print names (default for --example efficientnet-lite0: ImageNet-1k)")
    o = p.add_argument_group("run")
    o.add_argument("--seed", type=int, default=0, help="seed for the random crops of bundled photos, example "
                   "data, synthetic data and PyTorch (default 0): the same flags and seed give the same file")
    o.add_argument("--threads", type=int, default=2, help="CPU threads for calibration and ONNX Runtime (default 2)")
    o.add_argument("--no-latency", action="store_true", help="skip the FP32 vs INT8 latency measurement")
    o.add_argument("--keep-unfolded", action="store_true", help="also write the graph with explicit CWAC Mul/Add nodes")
    o.add_argument("--no-pad-conv-channels", action="store_true",
                   help="--target ort: do not zero-pad quantized Convs' input channels to a multiple of 4. The pad "
                        "exists because ONNX Runtime's fast INT8 conv kernel (MLAS) needs channels %% 4 == 0 and a "
                        "3-channel image stem otherwise falls back to a slower path; it is exact (same logits), so "
                        "use this only to compare or to keep the graph exactly as the IR")
    o.add_argument("--quiet", action="store_true", help="no progress bar, no notes: only warnings, errors and the summary")
    o.add_argument("-v", "--verbose", action="store_true", help="debug detail on stderr")
    return p


def add_accuracy_arguments(p: argparse.ArgumentParser) -> None:
    """--eval-data, --eval-labels, the gates, --save-fp32, --auto-fallback (cli/accuracy_flags.py)."""
    from .accuracy_flags import add_arguments

    add_arguments(p)


def accuracy_fields(a) -> dict:
    from .accuracy_flags import config_fields

    return config_fields(a)


def _keep_float(text: str) -> tuple[str, ...]:
    """The --keep-float entries. Whether each selects a node is for the model's graph to say
    (Target.plan); only a malformed re: pattern fails here, before the model is loaded."""
    from ..quantization.placement import REGEX_PREFIX, compile_pattern

    entries = tuple(k.strip() for k in text.split(",") if k.strip())
    for e in entries:
        if e.startswith(REGEX_PREFIX):
            compile_pattern(e)
    return entries


def config_from_args(a) -> "ExportConfig":
    from ..data.preprocess import Preprocess
    from ..calibration.sequential import CalibrationSettings
    from ..calibration.method import Method

    from ..config import ExportConfig

    factory = a.model_factory
    calib = a.calib_data
    labels = a.labels
    if a.example:
        ex = EXAMPLES[a.example]
        factory = ex.factory
        calib = calib or ex.calib_source
        if a.input_shape == DEFAULT_INPUT_SHAPE and ex.input_shape:
            a.input_shape = ",".join(str(d) for d in ex.input_shape)
        if a.keep_float == DEFAULT_KEEP_FLOAT and ex.keep_float is not None:
            a.keep_float = ",".join(ex.keep_float)
        if ex.preprocess and calib == ex.calib_source:
            a.resize, a.crop, a.mean, a.std = (ex.preprocess[k] for k in ("resize", "crop", "mean", "std"))
        if not labels and ex.labels_file and a.example != "efficientnet-lite0":
            labels = ex.labels_file
        if a.example == "efficientnet-lite0" and not labels:
            from ..edge.metadata import BUNDLED_IMAGENET_LABELS

            labels = BUNDLED_IMAGENET_LABELS
    if labels:
        from ..edge.metadata import read_labels_file

        read_labels_file(labels)  # fail before calibrating, not after
    if calib and calib.startswith("example:"):
        from ..examples import example_from_source

        example_from_source(calib)  # an unknown name fails now, before the model is loaded
    if not calib:
        raise QwtError("no calibration data given", "pass --calib-data calib.npy (or an image folder); "
                       "use --calib-data synthetic only for smoke tests")
    if not a.model and not factory:
        raise QwtError("no model given", "pass a model file, --model-factory, or --example efficientnet-lite0")
    out = a.output
    if not out:
        base = a.example or os.path.splitext(os.path.basename(a.model or "model"))[0]
        out = f"{base}.int8.onnx"
    try:
        shape = tuple(int(v) for v in a.input_shape.split(","))
    except ValueError:
        raise QwtError(f"--input-shape {a.input_shape} is not C,H,W", "write e.g. --input-shape 3,224,224") from None
    if a.num_calib < 1:
        raise QwtError("--num-calib must be at least 1", "use 512 (the papers' setting) or more")
    for flag, v in (("--batch-size", a.batch_size), ("--threads", a.threads)):
        if v < 1:
            raise QwtError(f"{flag} {v} is below 1", f"pass {flag} 1 or more")
    return ExportConfig(
        model=a.model, output=out, model_factory=factory, trust_pickle=a.trust_pickle, calib_data=calib,
        num_calib=a.num_calib, batch_size=a.batch_size, seed=a.seed, threads=a.threads,
        preprocess=Preprocess(resize=a.resize, crop=a.crop, mean=a.mean, std=a.std), target=a.target,
        quant=CalibrationSettings(w_bits=a.w_bits, a_bits=a.a_bits, calib_method=a.calib_method,
                                  percentile=a.percentile, weight_observer=a.weight_observer, method=Method.parse(a.method),
                                  ridge=a.ridge, reference=a.cwac_reference, qwt_ridge=a.qwt_ridge,
                                  qwt_group_channels=a.qwt_group_channels, qwt_blocks=a.qwt_blocks),
        measure_latency=not a.no_latency, keep_unfolded=a.keep_unfolded, example_shape=shape, labels_file=labels,
        keep_float=_keep_float(a.keep_float), pad_conv_channels=not a.no_pad_conv_channels,
        **accuracy_fields(a))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(-1 if args.quiet else 1 if args.verbose else 0)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        cfg = config_from_args(args)
        from ..pipeline import run_export
        from ..report import layer_rows, summary_rows, table

        bar = None
        if not args.quiet:
            from .progress import layer_progress_bar

            bar = layer_progress_bar()
        report = run_export(cfg, progress=bar).to_dict()
    except QwtError as e:
        print(f"qwt-export: error: {e}", file=sys.stderr)
        return 2
    except InternalError as e:
        print(f"qwt-export: internal error (a qwt-deploy bug, please report it): {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # the staged outputs were removed on the way out: nothing half-written is left
        print("qwt-export: interrupted; no output was written", file=sys.stderr)
        return 130
    print(table(summary_rows(report), "qwt-export summary"))
    if report["layers"] and cfg.quant.method.fits_layers:
        print("\nlargest compensation gains (output SQNR of the layer vs its FP32 version on the same input):")
        print(layer_rows(report))
    print(f"\nwrote {cfg.output}{' and ' + report['fp32_path'] if report.get('fp32_path') else ''} and "
          f"{report['report_path']}")
    failures = (report.get("accuracy_gates") or {}).get("failures")
    if failures:  # the files are written (for inspection); the exit code says the bar was missed
        print("qwt-export: accuracy gate FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
