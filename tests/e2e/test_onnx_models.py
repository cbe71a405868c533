"""FP32 ONNX files as the pipeline's source, on real third-party models from packages (slow).

A new model needs data here, not code: each case names the file, how to make real inputs for it,
and what it must reach. Figures: every Conv an INT8 kernel in ONNX Runtime, ONNX Runtime within
1 output step of the PyTorch simulation, and the INT8 output close to FP32 on held-out photos."""

import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qwt_deploy as qd

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    name: str
    path: str  # an installed package's file, "package/relative/path.onnx"
    pre: Optional[qd.Preprocess]  # how real photos become its input
    min_cosine: float  # INT8 vs FP32 output cosine on held-out photos (mean over rows, every output)
    # a PyTorch model instead of a file: () -> (module, photos(n, seed, evaluation) -> inputs)
    torch_model: Optional[Callable] = None
    # inputs other than preprocessed photos: (n, seed, evaluation) -> inputs
    inputs: Optional[Callable] = None


def _site(rel: str) -> str:
    import importlib.util

    pkg = rel.split("/")[0]
    spec = importlib.util.find_spec(pkg)
    return os.path.join(os.path.dirname(spec.origin), *rel.split("/")[1:]) if spec else ""


def _mtcnn(name: str, size: int):
    """facenet-pytorch's MTCNN nets (PReLU, ceil-mode max pooling, softmax, 2-3 outputs) on
    crops of the astronaut photo, normalised as facenet-pytorch's detect_face does."""
    def make():
        import test_onnx_source_models as m  # the loader that avoids facenet-pytorch's torchvision import

        net = m.mtcnn_nets()[name]
        return net, lambda n, seed, evaluation=False: m.mtcnn_normalize(m.crops(size, n, seed + (7 if evaluation else 0)))
    return make


def _text_crops(n: int, seed: int, evaluation: bool = False) -> np.ndarray:
    """Real printed text for PP-OCRv4's detector: random crops of ``skimage.data.text`` (calibration)
    or of the scanned ``skimage.data.page`` (held out, never calibrated on), 320x320, grey as BGR,
    normalised as rapidocr's DetPreProcess: (x / 255 - 0.5) / 0.5."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.page() if evaluation else data.text())
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, 320, 320), np.float32)
    w, h = img.size
    for i in range(n):
        cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        a = np.asarray(img.crop((x0, y0, x0 + cw, y0 + ch)).resize((320, 320), Image.BILINEAR), np.float32)
        out[i] = (a / 255.0 - 0.5) / 0.5
    return out


CASES = [
    # PP-OCRv4 text detector (rapidocr-onnxruntime 1.4.4): ConvTranspose, Resize, HardSigmoid/HardSwish,
    # squeeze-excitation gates, a Sigmoid probability map. Its map is far from FP32 for any 8-bit
    # quantizer: mean row cosine 0.975 here (qwt2); on the bench's photos with text 0.92, against
    # 0.83 / 0.86 for ORT quantize_static MinMax / Percentile (bench/results/onnx_models.md)
    Case("ppocr-v4-det", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", None, 0.95,
         inputs=_text_crops),
    # YOLOv8n-style detector (nudenet 3.4.2): SiLU, Split, Concat, Resize, a DFL head; input /255
    Case("nudenet-320n", "nudenet/320n.onnx", qd.Preprocess(resize=320, crop=320, mean=(0.0,) * 3, std=(255.0,) * 3),
         0.99),
    Case("mtcnn-pnet", "", None, 0.99, _mtcnn("pnet", 48)),
    Case("mtcnn-rnet", "", None, 0.99, _mtcnn("rnet", 24)),
    Case("mtcnn-onet", "", None, 0.99, _mtcnn("onet", 48)),
]


def _photos(n, pre, seed, evaluation=False):
    from qwt_deploy.data.photos import calibration_photos, crops, evaluation_photos

    return crops(evaluation_photos() if evaluation else calibration_photos(), n, pre, seed)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_onnx_model_quantizes_with_integer_convs_and_stays_close_to_fp32(case, tmp_path):
    if case.torch_model is not None:  # PyTorch -> FP32 ONNX with PyTorch's exporter, then the same path
        import torch

        from qwt_deploy.frontend.onnx_source import fp32_onnx_from_module

        net, photos = case.torch_model()
        cal, held = photos(128, 0), photos(64, 1, evaluation=True)
        path = str(tmp_path / "fp32.onnx")
        onnx.save(fp32_onnx_from_module(net, (torch.from_numpy(cal[:2]),),
                                        dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    else:
        path = _site(case.path)
        if not os.path.isfile(path):
            pytest.skip(f"{case.path} is not installed (pip install --no-deps {case.path.split('/')[0]})")
        make = case.inputs or (lambda n, seed, evaluation=False: _photos(n, case.pre, seed, evaluation))
        cal, held = make(64, 0), make(32, 1, evaluation=True)
    # evaluation=held: every calibration sample is calibrated on (nothing held out of them)
    qm = qd.quantize(path, cal, qd.QuantizeConfig(num_calib=len(cal), batch_size=16), evaluation=held)
    ex = qd.export(qm, str(tmp_path / "m.int8.onnx"))
    v = qd.verify(ex, held, measure_latency=False)
    convs = sum(n.op == "conv" for n in qm.graph.nodes)
    outputs = {o.name for o in ex.folded.graph.output}
    # every Conv is an INT8 kernel, except one whose output is a graph output (kept float there)
    head_convs = sum(n.op == "conv" and n.output in qm.graph.outputs for n in qm.graph.nodes)
    assert v.coverage["by_type"].get("QLinearConv", 0) >= convs - head_convs > 0, (v.coverage, outputs)
    assert v.agreement.within_1_step >= 0.999, v.agreement
    fp32 = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(tmp_path / "m.int8.onnx"), providers=["CPUExecutionProvider"])
    for a, b in zip(fp32.run(None, {fp32.get_inputs()[0].name: held}), int8.run(None, {int8.get_inputs()[0].name: held})):
        a, b = a.reshape(len(held), -1), b.reshape(len(held), -1)
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        assert float(cos.mean()) >= case.min_cosine, cos


def test_lite0_from_its_fp32_onnx_matches_the_pytorch_input(tmp_path):
    """The FP32 ONNX of EfficientNet-Lite0 (PyTorch's dynamo exporter) as input: 60/60 compute
    ops integer and top-1 agreement with FP32 on 525 held-out crops as with the PyTorch input."""
    import torch

    from qwt_deploy.data.preprocess import LITE0
    from qwt_deploy.examples.efficientnet_lite0 import build

    onnx_path = str(tmp_path / "lite0.onnx")
    torch.onnx.export(build(), (torch.zeros(1, 3, 224, 224),), onnx_path, dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    qm = qd.quantize(onnx_path, "bundled", qd.QuantizeConfig(num_calib=256))  # half the default: suite time
    ex = qd.export(qm, str(tmp_path / "lite0.int8.onnx"))
    held = _photos(525, LITE0, 1, evaluation=True)
    v = qd.verify(ex, held[:64], measure_latency=False)  # the simulation is the slow side: 64 crops
    assert v.coverage["integer_ops"] == v.coverage["compute_ops"] == 60, v.coverage
    assert v.agreement.within_1_step >= 0.999

    def logits(path):
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {"inputs": held[i:i + 64]})[0] for i in range(0, len(held), 64)])

    ref, got = logits(onnx_path), logits(str(tmp_path / "lite0.int8.onnx"))
    assert float(np.mean(ref.argmax(1) == got.argmax(1))) >= 0.975  # PyTorch input, 512 crops: 0.981
