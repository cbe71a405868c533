"""Typed configuration (no options dicts).

:class:`QuantizeConfig`: how the public API quantizes, independent of files.
:class:`ExportConfig`: one ``qwt-export`` run, files included; it derives its QuantizeConfig.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from .calibration.method import Method
from .calibration.sequential import CalibrationSettings
from .data.preprocess import Preprocess
from .quantization.placement import DEFAULT_KEEP_FLOAT
from .targets import TARGETS, Target, get_target

METHODS = Method.CHOICES  # --method spellings; parsed once by Method.parse
CALIB_METHODS = ("auto", "minmax", "percentile", "mse")
TARGET_NAMES = tuple(TARGETS)  # ort: ONNX Runtime CPU integer kernels | trt: TensorRT explicit quantization


@dataclass
class QuantizeConfig:
    """How to quantize, independent of files: what :func:`quantize` needs besides the model
    and the calibration data."""

    target: Union[str, Target] = "ort"  # "ort" | "trt" | a Target
    settings: CalibrationSettings = field(default_factory=CalibrationSettings)  # method, bits, observers
    num_calib: int = 512  # at most this many calibration samples are used (the QwT papers' 512)
    batch_size: int = 32
    seed: int = 0
    threads: int = 2
    # kept float: op kinds, node names, "re:PATTERN" (placement.resolve_keep_float); e.g. add
    # "add" for transformers. A name or pattern that selects no node is an error (Target.plan)
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    preprocess: Preprocess = field(default_factory=Preprocess)  # for image folders and bundled photos
    example_shape: tuple[int, ...] = (3, 224, 224)  # one image input: the shape an nn.Module is traced with

    def __post_init__(self):
        self.target = get_target(self.target)



@dataclass
class ExportConfig:
    model: Optional[str]  # model file (torch.export program, or state dict with a factory)
    output: str
    model_factory: Optional[str] = None
    trust_pickle: bool = False
    calib_data: str = "bundled"  # .npy/.npz | image folder | bundled | synthetic | example:NAME
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
    # kept float: op kinds, node names, "re:PATTERN" (see QuantizeConfig.keep_float)
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    # --target ort: zero-pad quantized Convs' input channels to a multiple of 4 so ONNX Runtime's
    # fast MLAS INT8 conv kernel runs them (exact; graph_passes/pad_conv_input_channels.py)
    pad_conv_channels: bool = True
    # accuracy against FP32 on held-out data (api.quantize holds it out; comparison.accuracy)
    eval_data: Optional[str] = None  # --eval-data: own held-out inputs (default: a split of the calibration data)
    eval_labels: Optional[str] = None  # --eval-labels: one class per eval sample (.npy or text, one per line)
    holdout_fraction: float = 0.1  # share of the calibration samples held out (at least 32)
    min_agreement: Optional[float] = None  # gates: exit 1 when missed (None: not gated)
    max_kl: Optional[float] = None
    min_cosine: Optional[float] = None
    save_fp32: bool = False  # also write <model>.fp32.onnx (the FP32 reference, same graph)
    auto_fallback: bool = False  # keep the most sensitive layers float until the gates are met
    max_float_layers: int = 8  # the auto-fallback's cap
    sensitivity_samples: int = 32  # held-out samples the sensitivity ranking runs on

    def quantize_config(self) -> QuantizeConfig:
        return QuantizeConfig(target=self.target, settings=self.quant, num_calib=self.num_calib,
                              batch_size=self.batch_size, seed=self.seed, threads=self.threads,
                              keep_float=tuple(self.keep_float), preprocess=self.preprocess,
                              example_shape=tuple(self.example_shape))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        d["quant"] = self.quant.to_dict()
        return d
