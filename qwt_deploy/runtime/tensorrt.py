"""TensorRT engine build, Polygraphy style: a loader named for what it makes, called to make it.

``tensorrt`` is imported lazily, only when an engine is built: the package and its
libnvinfer libraries exist only on machines with an NVIDIA GPU, and nothing else in
qwt-deploy needs them. :func:`build_engine_next_to` always writes the equivalent ``trtexec``
command line beside the ONNX file, so a graph exported on a CPU workstation can be built on
the GPU box; where TensorRT and a CUDA GPU are both present it also builds the engine and
saves it with the build log. Where they are not, it says which of them is missing and why,
and builds nothing: no placeholder engine is ever written.

The network is created strongly typed. TensorRT 11 supports nothing else (precision flags
such as ``--int8``/``--fp16`` are obsolete): each tensor runs in the type the ONNX graph
gives it, and INT8 comes only from the graph's Q/DQ pairs (backends.md §3 rule 7).
"""

from __future__ import annotations

import ctypes
import os
import shlex
from dataclasses import dataclass
from typing import Callable, Optional

from ..atomic import atomic_write_bytes


@dataclass(frozen=True)
class TensorRTStatus:
    available: bool
    reason: str  # what was found, or which check failed and why


def cuda_device_count() -> tuple[int, str]:
    """Number of CUDA GPUs through the driver API (libcuda), without torch or pycuda."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return 0, f"no CUDA driver (libcuda.so.1 could not be loaded: {e})"
    rc = cuda.cuInit(0)
    if rc != 0:
        return 0, f"CUDA driver present but cuInit failed with CUDA error {rc} (no usable GPU)"
    count = ctypes.c_int(0)
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        return 0, f"cuDeviceGetCount failed with CUDA error {rc}"
    return count.value, f"{count.value} CUDA device(s)"


def probe_tensorrt() -> TensorRTStatus:
    """Can an engine be built here? Checks ``import tensorrt`` first, then for a CUDA GPU."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError from a missing libnvinfer
        return TensorRTStatus(False, f"import tensorrt failed ({type(e).__name__}: {e})")
    n, why = cuda_device_count()
    if n == 0:
        return TensorRTStatus(False, f"TensorRT {getattr(trt, '__version__', '?')} imports, but {why}")
    return TensorRTStatus(True, f"TensorRT {getattr(trt, '__version__', '?')}, {why}")


def engine_paths(onnx_path: str) -> dict[str, str]:
    """``<model>.engine``, ``<model>.engine.log`` and ``<model>.trtexec.txt`` beside the ONNX file."""
    base = onnx_path[:-5] if onnx_path.endswith(".onnx") else onnx_path
    return {"engine": base + ".engine", "log": base + ".engine.log", "command": base + ".trtexec.txt"}


# Optimization profile for dynamic axes: TensorRT builds an engine for a range of shapes and
# tunes its kernels for the "opt" one. The batch axis gets 1..32 (tuned for 8, qwt-serve's
# default --max-batch); any other dynamic axis (a token model's sequence) 1..512, tuned for
# 128, unless the model's qwt_deploy.input_shape metadata fixes it.
BATCH_RANGE = (1, 8, 32)
OTHER_AXIS_RANGE = (1, 128, 512)


@dataclass(frozen=True)
class ShapeProfile:
    """``--minShapes/--optShapes/--maxShapes``: per input with a dynamic axis, its three shapes."""

    shapes: dict  # input name -> (min, opt, max), each a tuple of ints
    notes: tuple = ()  # which axes got which range, for the command file's comments

    def flags(self) -> str:
        def one(k: int) -> str:
            return ",".join(f"{shlex.quote(n)}:{'x'.join(map(str, s[k]))}" for n, s in self.shapes.items())

        return f"--minShapes={one(0)} --optShapes={one(1)} --maxShapes={one(2)}"


def shape_profile(model, batch: tuple = BATCH_RANGE, other: tuple = OTHER_AXIS_RANGE) -> Optional[ShapeProfile]:
    """The profile for ``model``'s graph inputs with a dynamic axis (a named or 0 dim), or None
    when every input is static (trtexec then needs no shape flags)."""
    import json

    meta = {p.key: p.value for p in model.metadata_props}
    try:
        sample = json.loads(meta.get("qwt_deploy.input_shape", "null"))
    except ValueError:
        sample = None
    initializers = {t.name for t in model.graph.initializer}
    shapes, notes = {}, []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = inp.type.tensor_type.shape.dim
        fixed = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
        if all(v is not None for v in fixed):
            continue
        lo, opt, hi = [], [], []
        for axis, v in enumerate(fixed):
            name = dims[axis].dim_param or f"axis {axis}"
            if v is not None:
                r = (v, v, v)
            elif axis == 0:
                r = batch
                notes.append(f"{inp.name} axis 0 ({name}): batch {batch[0]}..{batch[2]}, tuned for {batch[1]}")
            elif isinstance(sample, list) and len(sample) == len(fixed) - 1 and isinstance(sample[axis - 1], int):
                r = (sample[axis - 1],) * 3
                notes.append(f"{inp.name} axis {axis} ({name}): {r[0]}, the exported input shape")
            else:
                r = other
                notes.append(f"{inp.name} axis {axis} ({name}): {other[0]}..{other[2]}, tuned for {other[1]}")
            lo.append(r[0]), opt.append(r[1]), hi.append(r[2])
        shapes[inp.name] = (tuple(lo), tuple(opt), tuple(hi))
    return ShapeProfile(shapes, tuple(notes)) if shapes else None


def trtexec_command(onnx_path: str, engine_path: str, workspace_mib: int = 1024,
                    profile: Optional[ShapeProfile] = None) -> str:
    return (f"trtexec --onnx={shlex.quote(onnx_path)} --saveEngine={shlex.quote(engine_path)} "
            f"--stronglyTyped --memPoolSize=workspace:{workspace_mib}M" + (f" {profile.flags()}" if profile else ""))


def _command_file(command: str, onnx_path: str, profile: Optional[ShapeProfile]) -> str:
    shapes = ["# Shape flags for the dynamic axes (change the ranges to what you will run):"]
    shapes += [f"#   {n}" for n in profile.notes] if profile else []
    return (f"# Build a TensorRT engine from {os.path.basename(onnx_path)} on a machine with TensorRT and an NVIDIA GPU.\n"
            "# The graph is explicitly quantized (Q/DQ): no --int8/--fp16 flags and no calibration cache.\n"
            "# --stronglyTyped is TensorRT 10's flag; TensorRT 11 builds every network strongly typed.\n"
            "# Paths are relative to this file's folder: run it there (copy the folder to the GPU machine).\n"
            + ("\n".join(shapes) + "\n" if profile else "")
            + f"{command}\n")


@dataclass
class EngineBytesFromOnnx:
    """Parse an ONNX file into a strongly typed network and build a serialized engine.

    Calling it returns ``(engine bytes or None, build log lines)``; parser errors are in the
    log. Requires ``tensorrt`` and a CUDA GPU (see :func:`probe_tensorrt`).
    """

    onnx_path: str
    workspace_mib: int = 1024
    profile: Optional[ShapeProfile] = None  # required by TensorRT when an input has a dynamic axis

    def __call__(self) -> tuple[Optional[bytes], list[str]]:
        import tensorrt as trt

        lines: list[str] = []

        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                lines.append(f"[{getattr(severity, 'name', severity)}] {msg}")

        logger = _Logger()
        builder = trt.Builder(logger)
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        network = builder.create_network(1 << int(flag) if flag is not None else 0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(self.onnx_path):
            for i in range(parser.num_errors):
                lines.append(f"[PARSER ERROR] {parser.get_error(i)}")
            return None, lines
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mib << 20)
        if self.profile is not None:
            opt_profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in self.profile.shapes.items():
                opt_profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(opt_profile)
        serialized = builder.build_serialized_network(network, config)
        return (bytes(serialized) if serialized is not None else None), lines


@dataclass
class EngineBuildResult:
    built: bool
    reason: str
    command: str
    command_path: str
    engine_path: Optional[str] = None
    log_path: Optional[str] = None

    def message(self) -> str:
        if self.built:
            return (f"TensorRT engine built: {self.engine_path} (build log {self.log_path}; "
                    f"equivalent trtexec command in {self.command_path})")
        return (f"no TensorRT engine was built: {self.reason}. The ONNX file is ready for TensorRT; "
                f"build it on a GPU machine with the command in {self.command_path} (run in that folder):\n"
                f"  {self.command}")

    def to_dict(self) -> dict:
        return dict(built=self.built, reason=self.reason, command=self.command, command_path=self.command_path,
                    engine_path=self.engine_path, log_path=self.log_path)


def build_engine_next_to(onnx_path: str, probe: Callable[[], TensorRTStatus] = probe_tensorrt,
                         workspace_mib: int = 1024) -> EngineBuildResult:
    """Write ``<model>.trtexec.txt``; where TensorRT and a GPU exist, also build and save
    ``<model>.engine`` and ``<model>.engine.log``. Never writes a partial or fake engine."""
    import onnx

    paths = engine_paths(onnx_path)
    profile = shape_profile(onnx.load(onnx_path, load_external_data=False))
    # relative to the command file's folder: the file is copied to a GPU machine with the model
    here = os.path.dirname(os.path.abspath(paths["command"]))
    command = trtexec_command(os.path.relpath(os.path.abspath(onnx_path), here),
                              os.path.relpath(os.path.abspath(paths["engine"]), here), workspace_mib, profile)
    atomic_write_bytes(paths["command"], _command_file(command, onnx_path, profile).encode())
    status = probe()
    if not status.available:
        return EngineBuildResult(False, status.reason, command, paths["command"])
    engine, log = EngineBytesFromOnnx(onnx_path, workspace_mib, profile)()
    atomic_write_bytes(paths["log"], ("\n".join([f"# {status.reason}"] + log) + "\n").encode())
    if engine is None:
        first = next((l for l in log if "ERROR" in l), "see the build log")
        return EngineBuildResult(False, f"TensorRT could not build the engine ({first})", command, paths["command"],
                                 log_path=paths["log"])
    atomic_write_bytes(paths["engine"], engine)
    return EngineBuildResult(True, status.reason, command, paths["command"], paths["engine"], paths["log"])
