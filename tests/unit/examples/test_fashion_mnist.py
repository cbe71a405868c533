"""Fashion-MNIST examples: the dataset reader, the shipped weights and the example registry
(``qwt-export --example fashion-cnn`` end to end with real labels is in
tests/e2e/test_fashion_mnist_end_to_end.py).

Tests that need the full dataset (Debian package ``dataset-fashion-mnist``) skip, saying so,
where it is absent; the 20 Fashion-MNIST test images inside the foolbox wheel still check the
shipped weights there.
"""

import gzip
import json
import os

import numpy as np
import pytest
import torch

from qwt_deploy.data import fashion_mnist as fm
from qwt_deploy.errors import QwtError
from qwt_deploy.examples import EXAMPLES
from qwt_deploy.examples.fashion_mnist import MODELS, weights_path

needs_dataset = pytest.mark.skipif(not fm.available(), reason=fm.missing_reason())


def recorded(kind: str) -> dict:
    with open(weights_path(kind).replace(".pt", ".json")) as f:
        return json.load(f)


@pytest.fixture
def dataset_dir(tmp_path, monkeypatch):
    """Point the reader at a scratch folder (and forget what it cached)."""
    monkeypatch.setenv("QWT_FASHION_MNIST_DIR", str(tmp_path))
    fm.load_split.cache_clear()
    yield tmp_path
    fm.load_split.cache_clear()


def _write_idx(path, arr: np.ndarray, rank: int, truncate: int = 0):
    head = bytes([0, 0, 8, rank]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data[:len(data) - truncate])


def _one_line(e: QwtError) -> str:
    msg = str(e)
    assert "\n" not in msg and ". Fix: " in msg
    return msg


# ------------------------------------------------------------------------------------ reader
def test_reader_names_the_package_when_missing(dataset_dir):
    with pytest.raises(QwtError) as e:
        fm.load_split("test")
    assert "apt-get install dataset-fashion-mnist" in _one_line(e.value)


@pytest.mark.parametrize("damage", ["not-gzip", "truncated", "bad-magic"])
def test_reader_rejects_corrupt_files(dataset_dir, damage):
    img = dataset_dir / "t10k-images-idx3-ubyte.gz"
    lab = dataset_dir / "t10k-labels-idx1-ubyte.gz"
    rng = np.random.default_rng(0)
    _write_idx(lab, rng.integers(0, 10, 10000), 1)
    images = rng.integers(0, 256, (10000, 28, 28))
    if damage == "not-gzip":
        img.write_bytes(b"\x1f\x8b\x08" + b"garbage" * 10)
    elif damage == "truncated":
        _write_idx(img, images, 3, truncate=1000)
    else:
        _write_idx(img, images, 1)  # rank 1 header on the image file
    with pytest.raises(QwtError) as e:
        fm.load_split("test")
    msg = _one_line(e.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "reinstall" in msg


def test_reader_reads_a_valid_file(dataset_dir):
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (10000, 28, 28)), rng.integers(0, 10, 10000)
    _write_idx(dataset_dir / "t10k-images-idx3-ubyte.gz", images, 3)
    _write_idx(dataset_dir / "t10k-labels-idx1-ubyte.gz", labels, 1)
    x, y = fm.load_split("test")
    assert np.array_equal(x, images) and np.array_equal(y, labels)
    xn = fm.normalize(x[:3])
    assert xn.shape == (3, 1, 28, 28) and xn.dtype == np.float32
    np.testing.assert_allclose(xn[:, 0] * fm.STD + fm.MEAN, images[:3], atol=1e-3)


# ------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_shipped_weights_are_small_and_load_without_pickle(kind):
    path = weights_path(kind)
    assert os.path.getsize(path) < 2_000_000
    sd = torch.load(path, map_location="cpu", weights_only=True)  # raises on anything but tensors
    model = MODELS[kind]()
    model.load_state_dict(sd)  # strict: every key present, every shape right
    assert recorded(kind)["parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_weights_classify_the_foolbox_fashion_images(kind):
    """Works without the Debian package: 20 real test images ship in the foolbox wheel."""
    x, y = fm.foolbox_samples()
    model = EXAMPLES[f"fashion-{kind}"].build()
    with torch.no_grad():
        hits = int((model(torch.from_numpy(x)).argmax(1).numpy() == y).sum())
    # 20 images: allow a ~2-sigma shortfall from the recorded test accuracy
    assert hits >= int(20 * recorded(kind)["test_accuracy"] - 4), f"{hits}/20"


@needs_dataset
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_weights_reach_recorded_accuracy(kind):
    from qwt_deploy.examples.evaluate import torch_accuracy

    rec = recorded(kind)
    r = torch_accuracy(EXAMPLES[f"fashion-{kind}"].build(), f"fashion-{kind}", n=2000)
    assert r.samples == 2000
    assert r.accuracy >= rec["test_accuracy"] - 0.015, (r.accuracy, rec["test_accuracy"])


@needs_dataset
def test_foolbox_images_are_the_first_test_images():
    x, y = fm.foolbox_samples()
    xt, yt = fm.test_images(20)
    assert np.array_equal(y, yt) and np.array_equal(x, xt)


# ------------------------------------------------------------------------------ registry
def test_registry_keeps_lite0_as_before():
    ex = EXAMPLES["efficientnet-lite0"]
    assert ex.factory == "qwt_deploy.examples.efficientnet_lite0:build"
    assert ex.calib_source == "bundled" and ex.input_shape == (3, 224, 224) and ex.preprocess is None


@needs_dataset
@pytest.mark.parametrize("name", ["fashion-cnn", "fashion-vit"])
def test_fashion_calibration_is_training_images_evaluation_is_test(name):
    ex = EXAMPLES[name]
    calib = ex.calibration(512, 0)
    assert calib.shape == (512,) + ex.input_shape and calib.dtype == np.float32
    assert np.array_equal(calib, ex.calibration(512, 0)) and not np.array_equal(calib, ex.calibration(512, 1))
    train_rows = {r.tobytes() for r in fm.load_split("train")[0]}
    test_rows = {r.tobytes() for r in fm.load_split("test")[0]}
    pixels = np.rint(calib[:, 0] * fm.STD + fm.MEAN).astype(np.uint8)
    assert all(p.tobytes() in train_rows for p in pixels)
    assert not any(p.tobytes() in test_rows for p in pixels)
    x, y = ex.evaluation(None, 0)
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,) and len(ex.class_names) == 10
    assert abs(float(calib.mean())) < 0.2 and 0.8 < float(calib.std()) < 1.2  # normalised as in training


def test_unknown_example_source_is_one_line(tmp_path, capsys):
    from qwt_deploy.cli.export import main

    rc = main(["--model-factory", "qwt_deploy.examples.fashion_mnist:build_cnn", "--input-shape", "1,28,28",
               "--calib-data", "example:nope", "-o", str(tmp_path / "m.onnx"), "--quiet", "--no-latency"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "example:fashion-cnn" in err
    assert os.listdir(tmp_path) == []


def test_example_without_dataset_exits_2_naming_the_package(dataset_dir, tmp_path, capsys):
    from qwt_deploy.cli.export import main

    out = tmp_path / "out"
    out.mkdir()
    rc = main(["--example", "fashion-cnn", "-o", str(out / "m.onnx"), "--quiet", "--no-latency"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "apt-get install dataset-fashion-mnist" in err
    assert os.listdir(out) == []
