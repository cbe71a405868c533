"""TensorRT engine build: real where TensorRT and a CUDA GPU exist, an honest skip elsewhere."""

import os
import sys

import onnx
import pytest

from qwt_deploy import api
from qwt_deploy.runtime.tensorrt import build_engine_next_to, engine_paths, probe_tensorrt

from conftest import quantized


@pytest.fixture(scope="module")
def trt_onnx(small_program, mech_data, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("trt") / "small.trt.onnx")
    api.export(quantized(small_program, mech_data[:32], target="trt"), path)
    return path


def test_engine_builds_where_tensorrt_and_cuda_exist(trt_onnx):
    status = probe_tensorrt()
    if not status.available:
        pytest.skip(f"no TensorRT engine build here: {status.reason}")
    import tensorrt as trt

    result = build_engine_next_to(trt_onnx)
    assert result.built, result.reason
    assert os.path.getsize(result.engine_path) > 0 and os.path.exists(result.log_path)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    with open(result.engine_path, "rb") as f:
        engine = runtime.deserialize_cuda_engine(f.read())
    assert engine is not None
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    assert names == {"input", "output"}


def test_missing_tensorrt_writes_the_command_line_and_says_why(trt_onnx, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail, as on a CPU box
    paths = engine_paths(trt_onnx)
    for p in paths.values():
        if os.path.exists(p):
            os.unlink(p)
    result = build_engine_next_to(trt_onnx)
    assert not result.built and "import tensorrt failed" in result.reason
    msg = result.message()
    assert msg.startswith("no TensorRT engine was built: import tensorrt failed") and paths["command"] in msg
    with open(paths["command"]) as f:
        text = f.read()
    # paths relative to the file's folder (it travels to the GPU machine with the model), and
    # the optimization profile of the dynamic batch axis
    name, engine = os.path.basename(trt_onnx), os.path.basename(paths["engine"])
    assert f"trtexec --onnx={name} --saveEngine={engine} " in text and os.path.dirname(trt_onnx) not in text
    x = onnx.load(trt_onnx).graph.input[0].name
    assert f"--minShapes={x}:1x3x32x32 --optShapes={x}:8x3x32x32 --maxShapes={x}:32x3x32x32" in text
    assert not os.path.exists(paths["engine"]) and not os.path.exists(paths["log"])  # nothing faked
    assert not [f for f in os.listdir(os.path.dirname(trt_onnx)) if f.startswith(".tmp-")]
    assert result.to_dict()["built"] is False and result.to_dict()["engine_path"] is None
