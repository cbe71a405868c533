"""The edge runtime (qwt-run): preprocessing from metadata, top-k, and no torch anywhere.

Mechanics run on the small random-weight CNN from conftest, exported by qwt-export with real
photos as calibration images (so the image preprocessing lands in the metadata); the real
EfficientNet-Lite0 case is in tests/e2e/test_lite0_end_to_end.py (slow).
"""

import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch

from conftest import REPO, assert_no_blocked_imports, run_blocked_cli

pytest.importorskip("skimage", reason="needs the demo extra (real photos): pip install '.[demo]'")

SKIMAGE_DATA = os.path.join(os.path.dirname(importlib.util.find_spec("skimage").origin), "data")
PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "horse.png"]
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="session")
def edge_model_path(tmp_path_factory, small_program):
    """The small CNN exported by qwt-export, calibrated on real photos resized to 36, cropped to 32."""
    from qwt_deploy.cli.export import main

    d = tmp_path_factory.mktemp("edge")
    pt2 = str(d / "small.pt2")
    torch.export.save(small_program, pt2)
    photos = d / "photos"
    photos.mkdir()
    for p in PHOTOS:
        shutil.copy(os.path.join(SKIMAGE_DATA, p), photos / p)
    labels = d / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    out = str(d / "small.int8.onnx")
    assert main([pt2, "--calib-data", str(photos), "--resize", "36", "--crop", "32", "--mean", "120,115,100",
                 "--std", "60,58,57", "--num-calib", "6", "--labels", str(labels), "--quiet", "--no-latency",
                 "--threads", "1", "-o", out]) == 0
    return out


def photo(name="chelsea.png"):
    return os.path.join(SKIMAGE_DATA, name)


def direct_ort(path, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def output_tolerance(path, ref: np.ndarray) -> float:
    """One output quantization step (the scale of a final DequantizeLinear); a float final layer
    (e.g. Gemm in float after INT8 inputs) gets float32 rounding room instead."""
    m = onnx.load(path)
    node = [n for n in m.graph.node if n.output[0] == m.graph.output[0].name][0]
    if node.op_type == "DequantizeLinear":
        inits = {i.name: i for i in m.graph.initializer}
        return float(onnx.numpy_helper.to_array(inits[node.input[1]])) + 1e-7
    return 1e-5 * max(1.0, float(np.abs(ref).max()))


def test_metadata_is_json_with_preprocess_shape_and_labels(edge_model_path):
    props = {p.key: p.value for p in onnx.load(edge_model_path).metadata_props}
    pre = json.loads(props["qwt_deploy.preprocess"])
    assert (pre["resize"], pre["crop"], pre["mean"], pre["std"]) == (36, 32, [120.0, 115.0, 100.0], [60.0, 58.0, 57.0])
    assert pre["from_images"] is True and pre["interpolation"] == "bicubic" and "NCHW" in pre["layout"]
    assert json.loads(props["qwt_deploy.input_shape"]) == [3, 32, 32]
    assert json.loads(props["qwt_deploy.labels"]) == LABELS


def test_metadata_from_before_the_json_format_still_reads():
    from qwt_deploy.edge.metadata import parse_metadata

    old = {"qwt_deploy.preprocess": str(dict(resize=256, crop=224, mean=[127.0] * 3, std=[128.0] * 3, layout="NCHW RGB")),
           "qwt_deploy.input_shape": str([3, 224, 224])}
    md = parse_metadata(old)
    assert md.preprocess.crop == 224 and md.preprocess.mean == (127.0, 127.0, 127.0) and md.labels == ()
    assert parse_metadata({"qwt_deploy.input_shape": "[16]"}).preprocess is None


@pytest.mark.parametrize("name,resize,crop", [("chelsea.png", 36, 32), ("rocket.jpg", 256, 224),
                                               ("coffee.png", 300, 299)])
def test_edge_preprocessing_matches_calibration(name, resize, crop):
    """The edge re-implementation (no torch side imports) gives calibration's tensor."""
    from PIL import Image

    from qwt_deploy.data.preprocess import Preprocess
    from qwt_deploy.edge.metadata import ImagePreprocess
    from qwt_deploy.edge.preprocess import preprocess_image_bytes

    mean, std = (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)
    with Image.open(photo(name)) as im:
        ref = Preprocess(resize=resize, crop=crop, mean=mean, std=std).center(im)
    got = preprocess_image_bytes(open(photo(name), "rb").read(), ImagePreprocess(resize, crop, mean, std))
    assert got.shape == ref.shape == (3, crop, crop) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_qwt_run_without_torch_matches_direct_session(edge_model_path, tmp_path):
    from PIL import Image

    from qwt_deploy.data.preprocess import Preprocess

    out = str(tmp_path / "out.npy")
    r = run_blocked_cli("qwt_deploy.cli.run", [edge_model_path, "--input", photo(), "--top-k", "3", "--json",
                                               "--output", out])
    assert r.returncode == 0, r.stderr
    assert_no_blocked_imports(r.stderr)
    with Image.open(photo()) as im:
        x = Preprocess(36, 32, (120.0, 115.0, 100.0), (60.0, 58.0, 57.0)).center(im)[None]
    ref = direct_ort(edge_model_path, x)
    got = np.load(out)
    assert got.shape == ref.shape == (1, 10)
    np.testing.assert_array_equal(got, ref)  # same input, same batch: bit-identical
    top = json.loads(r.stdout)["top_k"][0]
    assert [t["index"] for t in top] == list(np.argsort(-ref[0], kind="stable")[:3])
    assert [t["label"] for t in top] == [LABELS[t["index"]] for t in top]
    assert abs(sum(t["probability"] for t in top) - 1) < 1 and top[0]["probability"] >= top[1]["probability"]


def test_qwt_run_npy_batch_matches_direct_session(edge_model_path, tmp_path):
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = str(tmp_path / "y.npz")
    r = run_blocked_cli("qwt_deploy.cli.run", [edge_model_path, "--input", str(tmp_path / "x.npy"), "--output", out])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("sample ") == 3
    got = next(iter(np.load(out).values()))
    np.testing.assert_array_equal(got, direct_ort(edge_model_path, x))


@pytest.mark.parametrize("case,expect", [("missing", "does not exist"), ("shape", "input shape is [3, 16, 16]"),
                                         ("garbage", "cannot be decoded"), ("dtype", "dtype"),
                                         ("pickle", "not a plain .npy")])
def test_qwt_run_bad_input_is_one_line_exit_2(edge_model_path, tmp_path, capsys, case, expect):
    from qwt_deploy.cli.run import main

    p = tmp_path / {"missing": "nope.jpg", "shape": "s.npy", "garbage": "g.jpg", "dtype": "d.npy", "pickle": "p.npy"}[case]
    if case == "shape":
        np.save(p, np.zeros((3, 16, 16), np.float32))
    elif case == "garbage":
        p.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    elif case == "dtype":
        np.save(p, np.array(["a"] * 3072).reshape(3, 32, 32))
    elif case == "pickle":
        np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    out = tmp_path / "never.npy"
    assert main([edge_model_path, "--input", str(p), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qwt-run: error: ") and "Fix:" in err[0] and expect in err[0], err
    assert not out.exists()


def test_edge_package_source_imports_no_workstation_module():
    """Static guard beside the runtime test: no module of the edge package names torch & co."""
    import ast

    edge = os.path.join(REPO, "qwt_deploy", "edge")
    files = [os.path.join(edge, f) for f in os.listdir(edge) if f.endswith(".py")]
    files += [os.path.join(REPO, "qwt_deploy", "cli", f) for f in ("run.py", "serve.py")]
    allowed_third_party = {"numpy", "PIL", "onnxruntime"}
    for f in files:
        for node in ast.walk(ast.parse(open(f).read())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                assert top in allowed_third_party or top in sys.stdlib_module_names, f"{f} imports {n}"


def test_images_are_refused_when_calibration_used_arrays(edge_model_path):
    """An export from before the "source" key, calibrated on .npy arrays: its recorded
    preprocessing is only qwt-export's old default, so an image request gets a clear 415 that
    says how to re-export, not a silently wrong answer."""
    import dataclasses

    from qwt_deploy.edge.metadata import parse_metadata
    from qwt_deploy.edge.model import BadInput, EdgeModel

    meta = {"qwt_deploy.preprocess": json.dumps(dict(resize=36, crop=32, mean=[1.0] * 3, std=[2.0] * 3,
                                                     layout="NCHW RGB", from_images=False)),
            "qwt_deploy.input_shape": "[3, 32, 32]"}
    m = EdgeModel(edge_model_path)
    assert m.accepts_images
    m.metadata = dataclasses.replace(m.metadata, preprocess=parse_metadata(meta).preprocess)
    assert not m.accepts_images
    with pytest.raises(BadInput) as e:
        m.tensor_from_image(open(photo(), "rb").read())
    assert e.value.status == 415 and "preprocessed arrays" in e.value.message
    assert "--resize 37 --crop 32 --mean R,G,B --std R,G,B" in e.value.message
