"""qwt-deploy: a trained model -> QwT-compensated INT8 -> folded QDQ ONNX -> any backend.

The public Python API (see :mod:`qwt_deploy.api`)::

    import qwt_deploy as qd
    qm = qd.quantize(model, calib, qd.QuantizeConfig(target="ort"))
    exported = qd.export(qm, "model.int8.onnx")
    report = qd.verify(exported, heldout)

The pipeline reads bottom to top in the package layout (each layer imports only below it):

    qwt_deploy/data          model inputs: arrays, images, text (no torch on the edge side)
    qwt_deploy/graph         the small graph IR
    qwt_deploy/frontend      read a model file and capture it into the IR
    qwt_deploy/quantization  quantizer placement, fake-quant, exact kernel emulation, simulation
    calibration/             (qwt_deploy.calibration) observers and compensation: CWAC, bias
                             correction, QwT branches, run sequentially over the graph
    qwt_deploy/exporter      IR -> QDQ ONNX
    graph_passes/            (qwt_deploy.graph_passes) ONNX passes: fold, pad, rule checks
    qwt_deploy/runtime       ONNX Runtime sessions, TensorRT engines, INT8 coverage
    qwt_deploy/edge          the torch-free edge runtime (qwt-run, qwt-serve)
    qwt_deploy/targets       one Target per backend (ort, trt): all that differs between them
    qwt_deploy/comparison    cross-backend comparison in quantization steps
    qwt_deploy/api.py        the one wiring of the pipeline (this API)
    qwt_deploy/cli           qwt-export, qwt-check, qwt-run, qwt-serve
"""

from ._version import __version__

# Where each public name lives. Imported lazily (PEP 562 module __getattr__): the edge runtime
# (qwt_deploy.edge, qwt-run, qwt-serve) runs without torch, and importing any submodule runs
# this file first, so it must not import the torch-side pipeline eagerly.
_PUBLIC = {
    "quantize": "api", "export": "api", "verify": "api", "check": "api", "load": "api",
    "calibration_inputs": "api", "export_float": "api",
    "evaluate": "api", "sensitivity": "api", "auto_fallback": "api", "Fallback": "api",
    "Accuracy": "comparison.accuracy", "AccuracyGates": "comparison.accuracy", "HoldOut": "comparison.accuracy",
    "QuantizedModel": "api", "ExportedModel": "api", "Verification": "api",
    "QuantizeConfig": "config", "CalibrationSettings": "calibration.sequential",
    "Method": "calibration.method", "LayerCompensation": "calibration.method",
    "Preprocess": "data.preprocess", "InputSet": "data.inputs",
    "Target": "targets", "TARGETS": "targets", "get_target": "targets",
    "QwtError": "errors", "InternalError": "errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
