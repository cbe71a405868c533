"""Grey (1-channel) image models at the edge: Fashion-MNIST's metadata says grey ("L", one
mean/std), the edge runtime converts images to grey from the model's input channels, and
``qwt-run``/``qwt-serve`` on a PNG give what ONNX Runtime and PyTorch give on the same image
preprocessed as in training (``qwt_deploy.data.fashion_mnist.normalize``).

The real images are the 20 Fashion-MNIST test PNGs inside the foolbox wheel (demo extra); the
end-to-end cases export the example and so also need the Debian dataset package.
"""

import glob
import importlib.util
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from qwt_deploy.data import fashion_mnist as fm
from qwt_deploy.edge.metadata import export_metadata, parse_metadata
from qwt_deploy.errors import QwtError
from qwt_deploy.examples import EXAMPLES

if importlib.util.find_spec("foolbox") is None:  # located, not imported (foolbox pulls eagerpy)
    pytest.skip("needs the demo extra (Fashion-MNIST PNGs in the foolbox wheel)", allow_module_level=True)
pytest.importorskip("skimage", reason="needs the demo extra (the edge test helpers use its photos)")
from conftest import assert_no_blocked_imports, run_blocked_cli  # noqa: E402
from test_edge_runtime import direct_ort, photo  # noqa: E402

needs_dataset = pytest.mark.skipif(not fm.available(), reason=fm.missing_reason())
FOOLBOX_DATA = os.path.join(os.path.dirname(importlib.util.find_spec("foolbox").origin), "data")
PNGS = sorted(glob.glob(os.path.join(FOOLBOX_DATA, "fashionMNIST_*.png")))


def example_metadata(name="fashion-cnn") -> dict:
    """The edge metadata exactly as qwt-export writes it for the example."""
    from qwt_deploy.data.preprocess import Preprocess

    ex = EXAMPLES[name]
    pre = Preprocess(**ex.preprocess)  # what qwt-export's CLI builds from the registry
    return export_metadata(pre.to_dict(), ex.input_shape, ex.calib_source, ex.labels_file)


def training_tensor(png: str) -> np.ndarray:
    """1 x 28 x 28: the PNG's pixels normalised exactly as the model's training/test images."""
    with Image.open(png) as im:
        pixels = np.asarray(im.convert("L"))
    return fm.normalize(pixels[None])[0]


@pytest.mark.parametrize("name", ["fashion-cnn", "fashion-vit"])
def test_fashion_metadata_is_grey_with_one_mean_and_std(name):
    meta = example_metadata(name)
    pre = json.loads(meta["qwt_deploy.preprocess"])
    assert pre["color"] == "L" and pre["mean"] == [fm.MEAN] and pre["std"] == [fm.STD] and pre["layout"] == "NCHW L"
    assert json.loads(meta["qwt_deploy.input_shape"]) == [1, 28, 28]
    md = parse_metadata(meta)
    assert md.preprocess is not None and md.preprocess.channels == 1 and md.preprocess.from_images


def test_rgb_metadata_is_unchanged_and_the_colour_follows_the_input_channels():
    rgb = json.loads(export_metadata(dict(resize=256, crop=224, mean=[1.0, 2.0, 3.0], std=[4.0, 5.0, 6.0],
                                          layout="NCHW RGB"), [3, 224, 224], "photos/")["qwt_deploy.preprocess"])
    assert (rgb["color"], rgb["layout"], rgb["mean"], rgb["std"]) == ("RGB", "NCHW RGB", [1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    # the CLI repeats one --mean value for R, G, B: a grey model gets that one value
    grey = json.loads(export_metadata(dict(resize=28, crop=28, mean=[9.0] * 3, std=[3.0] * 3, layout="NCHW RGB"),
                                      [1, 28, 28], "digits/")["qwt_deploy.preprocess"])
    assert (grey["color"], grey["mean"], grey["std"]) == ("L", [9.0], [3.0])
    with pytest.raises(QwtError, match="1-channel images but the mean has 3 different values"):
        export_metadata(dict(resize=28, crop=28, mean=[1.0, 2.0, 3.0], std=[3.0] * 3), [1, 28, 28], "digits/")


def test_metadata_from_before_the_colour_key_still_reads():
    """Missing colour => RGB. A grey model exported then (RGB, three equal values) reads as grey
    from its input shape; metadata that contradicts the input gives tensors only, never images."""
    old = {"resize": 28, "crop": 28, "mean": [fm.MEAN] * 3, "std": [fm.STD] * 3, "layout": "NCHW RGB"}
    rgb = parse_metadata({"qwt_deploy.preprocess": json.dumps(old), "qwt_deploy.input_shape": "[3, 28, 28]"})
    assert rgb.preprocess.color == "RGB" and rgb.preprocess.mean == (fm.MEAN,) * 3
    grey = parse_metadata({"qwt_deploy.preprocess": json.dumps(dict(old, color="RGB")),
                           "qwt_deploy.input_shape": "[1, 28, 28]"})
    assert grey.preprocess.color == "L" and grey.preprocess.mean == (fm.MEAN,) and grey.preprocess.std == (fm.STD,)
    mixed = dict(old, mean=[1.0, 2.0, 3.0])
    assert parse_metadata({"qwt_deploy.preprocess": json.dumps(mixed), "qwt_deploy.input_shape": "[1, 28, 28]"}
                          ).preprocess is None
    new_grey = export_metadata(dict(old, mean=[fm.MEAN], std=[fm.STD]), [1, 28, 28], "x/")
    assert parse_metadata(dict(new_grey, **{"qwt_deploy.input_shape": "[3, 28, 28]"})).preprocess is None


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_edge_grey_preprocessing_equals_training_normalisation(mode):
    """A real Fashion-MNIST PNG (grey, or the same pixels saved as RGB) through the edge path gives
    the training tensor bit for bit, and calibration's Preprocess agrees."""
    from qwt_deploy.data.preprocess import Preprocess
    from qwt_deploy.edge.preprocess import preprocess_image_bytes

    pre = parse_metadata(example_metadata()).preprocess
    for png in PNGS[:5]:
        with Image.open(png) as im:
            buf = io.BytesIO()
            im.convert(mode).save(buf, "PNG")
            cal = Preprocess(**EXAMPLES["fashion-cnn"].preprocess).center(im)
        got = preprocess_image_bytes(buf.getvalue(), pre)
        ref = training_tensor(png)
        assert got.shape == ref.shape == cal.shape == (1, 28, 28) and got.dtype == np.float32
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(cal, ref)


def test_grey_preprocessing_of_a_colour_photo_matches_calibration():
    """Resize + crop + luma on a real colour photo: edge and calibration implementations agree."""
    from qwt_deploy.data.preprocess import Preprocess
    from qwt_deploy.edge.metadata import ImagePreprocess
    from qwt_deploy.edge.preprocess import preprocess_image_bytes

    with Image.open(photo("coffee.png")) as im:
        ref = Preprocess(resize=40, crop=32, mean=(110.0,), std=(60.0,)).center(im)
    got = preprocess_image_bytes(open(photo("coffee.png"), "rb").read(),
                                 ImagePreprocess(40, 32, (110.0,), (60.0,), color="L"))
    assert got.shape == ref.shape == (1, 32, 32)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def fashion_cnn_onnx(tmp_path_factory):
    if not fm.available():
        pytest.skip(fm.missing_reason())
    from qwt_deploy.cli.export import main as export

    out = str(tmp_path_factory.mktemp("grey") / "fashion-cnn.int8.onnx")
    assert export(["--example", "fashion-cnn", "--num-calib", "64", "--quiet", "--no-latency", "--threads", "1",
                   "-o", out]) == 0
    return out


def ort_per_sample(path: str, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime on each sample alone (batch 1, as qwt-run runs one image)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {s.get_inputs()[0].name: xi[None]})[0] for xi in x])


def _pytorch_top1(name: str, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return EXAMPLES[name].build()(torch.from_numpy(x)).argmax(1).numpy()


@needs_dataset
def test_qwt_run_on_a_png_equals_ort_and_pytorch_on_the_training_tensor(fashion_cnn_onnx, tmp_path):
    """qwt-run (torch unimportable) on a Fashion-MNIST PNG = ONNX Runtime on the same image as
    training preprocessed it (bit for bit); its top-1 = the PyTorch FP32 model's."""
    from qwt_deploy.edge.model import EdgeModel

    out = str(tmp_path / "y.npy")
    r = run_blocked_cli("qwt_deploy.cli.run", [fashion_cnn_onnx, "--input", PNGS[0], "--json", "--top-k", "1",
                                               "--output", out])
    assert r.returncode == 0, r.stderr
    assert_no_blocked_imports(r.stderr)
    x = np.stack([training_tensor(p) for p in PNGS])
    ref = direct_ort(fashion_cnn_onnx, x[:1])
    np.testing.assert_array_equal(np.load(out), ref)
    top = json.loads(r.stdout)["top_k"][0][0]
    assert top["index"] == int(_pytorch_top1("fashion-cnn", x[:1])[0])
    assert top["label"] == fm.CLASSES[top["index"]]
    # the same path in-process on all 20 PNGs
    m = EdgeModel(fashion_cnn_onnx)
    assert m.accepts_images and m.describe()["images"]["color"] == "L"
    got = np.concatenate([m.run(m.tensor_from_image(open(p, "rb").read()))[0] for p in PNGS])
    np.testing.assert_array_equal(got, ort_per_sample(fashion_cnn_onnx, x))
    agree = float(np.mean(got.argmax(1) == _pytorch_top1("fashion-cnn", x)))
    assert agree >= 0.95, agree  # INT8 vs FP32: W8A8 agrees on ~99.9% of the 10k test images


@needs_dataset
def test_qwt_serve_answers_a_png_like_qwt_run(fashion_cnn_onnx):
    from conftest import Server

    srv = Server(fashion_cnn_onnx, "--max-wait-ms", "1")
    try:
        status, body = srv.request("POST", "/v1/predict?top_k=2&outputs=1", open(PNGS[1], "rb").read(),
                                   {"Content-Type": "image/png"})
        assert status == 200, body
        got = np.asarray(body["outputs"][0]["data"], np.float32)
        np.testing.assert_array_equal(got, direct_ort(fashion_cnn_onnx, training_tensor(PNGS[1])[None]))
        assert body["top_k"][0][0]["label"] == fm.CLASSES[int(got.argmax())]
        status, health = srv.request("GET", "/healthz")
        assert health["input_shape"] == ["N", 1, 28, 28] and health["images"]["color"] == "L"
    finally:
        assert_no_blocked_imports(srv.stop())


@needs_dataset
def test_fashion_vit_png_through_the_edge_equals_training_tensor(tmp_path):
    from qwt_deploy.cli.export import main as export
    from qwt_deploy.edge.model import EdgeModel

    out = str(tmp_path / "fashion-vit.int8.onnx")
    assert export(["--example", "fashion-vit", "--num-calib", "64", "--quiet", "--no-latency", "--threads", "1",
                   "-o", out]) == 0
    m = EdgeModel(out)
    x = np.stack([training_tensor(p) for p in PNGS])
    got = np.concatenate([m.run(m.tensor_from_image(open(p, "rb").read()))[0] for p in PNGS])
    np.testing.assert_array_equal(got, ort_per_sample(out, x))
    assert float(np.mean(got.argmax(1) == _pytorch_top1("fashion-vit", x))) >= 0.95


def test_grey_model_calibrates_from_an_image_folder(tmp_path):
    """The CLI writes one --mean/--std as three values; a 1-channel model then reads the folder as grey."""
    from qwt_deploy.data.sources import load_calibration
    from qwt_deploy.data.preprocess import Preprocess
    from qwt_deploy.errors import QwtError

    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[..., 0] = 200  # pure red: grey "L" = 0.299 * 200 = 59.8, not the channel mean
    Image.fromarray(rgb).save(tmp_path / "a.png")
    pre = Preprocess(resize=28, crop=28, mean=(10.0,) * 3, std=(2.0,) * 3)
    x = load_calibration(str(tmp_path), (1, 28, 28), 4, pre)
    assert x.shape == (1, 1, 28, 28)
    assert np.allclose(x, (np.asarray(Image.fromarray(rgb).convert("L"), np.float32)[6:34, 6:34] - 10) / 2)
    with pytest.raises(QwtError, match="1-channel"):
        load_calibration(str(tmp_path), (1, 28, 28), 4, Preprocess(resize=28, crop=28, mean=(1.0, 2.0, 3.0)))
