"""The typed configuration of one ``qwt-export`` run (no options dicts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from calibration.preprocess import Preprocess
from calibration.sequential import CalibrationSettings

METHODS = ("none", "bias-correction", "qwt", "qwt2", "qwt,qwt2")  # qwt = QwT (v1) block branches
CALIB_METHODS = ("auto", "minmax", "percentile", "mse")
TARGETS = ("ort", "trt")  # ONNX Runtime CPU integer kernels | TensorRT explicit quantization


@dataclass
class ExportConfig:
    model: Optional[str]  # model file (torch.export program, or state dict with a factory)
    output: str
    model_factory: Optional[str] = None
    trust_pickle: bool = False
    calib_data: str = "bundled"  # .npy/.npz | image folder | bundled | synthetic
    num_calib: int = 512
    batch_size: int = 32
    preprocess: Preprocess = field(default_factory=Preprocess)
    target: str = "ort"
    quant: CalibrationSettings = field(default_factory=CalibrationSettings)
    seed: int = 0
    check_samples: int = 64  # inputs used for the PyTorch-vs-ONNX Runtime check
    measure_latency: bool = True
    threads: int = 2
    keep_unfolded: bool = False
    example_shape: tuple[int, ...] = (3, 224, 224)  # only for nn.Modules that need tracing
    labels_file: Optional[str] = None  # class names, one per line, written into the ONNX metadata
    # op kinds that stay float (placement.DEFAULT_KEEP_FLOAT); e.g. add "add" for transformers
    keep_float: tuple[str, ...] = ("layer_norm", "softmax", "gelu")
    # --target ort: zero-pad quantized Convs' input channels to a multiple of 4 so ONNX Runtime's
    # fast MLAS INT8 conv kernel runs them (exact; graph_passes/pad_conv_input_channels.py)
    pad_conv_channels: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return d
