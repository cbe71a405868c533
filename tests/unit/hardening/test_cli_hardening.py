"""The CLIs against hostile or unlucky input (issue 12): one line on stderr naming the problem
and the fix, exit code 2 (130 for Ctrl-C), never a traceback, and never a destroyed input or a
half-written output. About 25 s, most of it the three qwt-export runs of the atomic-export test."""

from __future__ import annotations

import errno
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_model import write_tiny_model


def _one_line(capfd, prog: str) -> str:
    err = [line for line in capfd.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"{prog}: "), err
    return err[0]


def _export(args):
    from qwt_deploy.cli.export import main

    return main(args + ["--quiet", "--no-latency", "--threads", "1"])


@pytest.fixture()
def files(tmp_path, small_program, mech_data):
    f = dict(program=str(tmp_path / "model.pt2"), calib=str(tmp_path / "calib.npy"), out=str(tmp_path / "out.onnx"))
    torch.export.save(small_program, f["program"])
    np.save(f["calib"], mech_data[:16])
    return f


def _no_temp_files(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.startswith(".tmp-")]


# ---- defect 2: an output that is an input, or not a regular file ----------------------------
@pytest.mark.parametrize("which", ["program", "calib", "hardlink"])
def test_export_refuses_to_overwrite_its_input(capfd, files, tmp_path, which):
    target = files["program"] if which == "program" else files["calib"]
    if which == "hardlink":  # another name, the same inode
        target = str(tmp_path / "alias.bin")
        os.link(files["calib"], target)
    before = open(files["program"], "rb").read(), open(files["calib"], "rb").read()
    code = _export([files["program"], "--calib-data", files["calib"], "-o", target])
    msg = _one_line(capfd, "qwt-export")
    assert code == 2 and "is the input file" in msg and "Fix:" in msg
    assert (open(files["program"], "rb").read(), open(files["calib"], "rb").read()) == before
    assert not os.path.exists(os.path.splitext(target)[0] + ".report.json") and _no_temp_files(tmp_path)


def test_export_refuses_a_non_regular_output(capfd, files, tmp_path):
    fifo = str(tmp_path / "pipe.onnx")
    os.mkfifo(fifo)
    assert _export([files["program"], "--calib-data", files["calib"], "-o", fifo]) == 2
    assert "not a regular file" in _one_line(capfd, "qwt-export")
    assert not os.path.isfile(fifo) and not os.path.exists(str(tmp_path / "pipe.report.json"))


# ---- defect 6: flags and files that gave tracebacks -----------------------------------------
@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--batch-size", "-4"], ["--threads", "0"]])
def test_export_bad_counts(capfd, files, flags):
    from qwt_deploy.cli.export import main

    assert main([files["program"], "--calib-data", files["calib"], "-o", files["out"], "--quiet", *flags]) == 2
    assert f"{flags[0]} {flags[1]} is below 1" in _one_line(capfd, "qwt-export")


def test_damaged_pt2_is_one_line_without_torch_logs(capfd, files, tmp_path):
    bad = str(tmp_path / "damaged.pt2")
    with zipfile.ZipFile(files["program"]) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if "/weights/weight_" in info.filename and not info.filename.endswith(".json") and len(data) > 64:
                data = data[:8]  # a weight's storage cut short: torch logs a traceback, then raises
            zout.writestr(info, data)
    assert _export([bad, "--calib-data", files["calib"], "-o", files["out"]]) == 2
    msg = _one_line(capfd, "qwt-export")
    assert "cannot be loaded" in msg and "storage" in msg  # the cause torch logged, in our one line


def _png(path, w, h):
    Image.new("L", (w, h)).save(path, optimize=True)


@pytest.mark.parametrize("size, words", [((1, 300_000), "aspect ratio"), ((9000, 9000), "more than the limit")])
def test_calibration_folder_with_hostile_images(capfd, files, tmp_path, size, words):
    folder = tmp_path / "photos"
    folder.mkdir()
    _png(str(folder / "a.png"), 40, 40)
    _png(str(folder / "b.png"), *size)  # tall: 28 x 8,400,000 after resizing; 81 MP: a decompression bomb
    code = _export([files["program"], "--calib-data", str(folder), "--resize", "36", "--crop", "32", "-o", files["out"]])
    msg = _one_line(capfd, "qwt-export")
    assert code == 2 and "b.png" in msg and words in msg, msg
    assert not os.path.exists(files["out"])


def test_model_path_is_a_folder(capfd, files, tmp_path):
    assert _export([str(tmp_path), "--calib-data", files["calib"], "-o", files["out"]]) == 2
    assert "is a folder" in _one_line(capfd, "qwt-export")


# ---- defect 5: atomic export, Ctrl-C, full disk, --keep-unfolded in a folder named *.onnx ----
def test_export_is_atomic(capfd, files, tmp_path, monkeypatch):
    import qwt_deploy.api
    import qwt_deploy.atomic

    folder = tmp_path / "runs.onnx"  # the old .replace(".onnx", "") rewrote this folder name too
    folder.mkdir()
    out = str(folder / "m.int8.onnx")
    args = [files["program"], "--calib-data", files["calib"], "--num-calib", "16", "--keep-unfolded", "-o", out]
    assert _export(args) == 0, capfd.readouterr().err
    capfd.readouterr()
    written = sorted(os.listdir(folder))
    assert written == ["m.int8.onnx", "m.int8.report.json", "m.int8.unfolded.onnx"], written
    snapshot = {p: open(folder / p, "rb").read() for p in written}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # Ctrl-C during the check: exit 130, one line, the last run's files intact
        m.setattr(qwt_deploy.api, "verify", interrupted)
        assert _export(args) == 130
        assert "interrupted" in _one_line(capfd, "qwt-export")
    assert {p: open(folder / p, "rb").read() for p in os.listdir(folder)} == snapshot

    real_write = qwt_deploy.atomic._write_all

    def disk_full_for_report(f, data):
        if data[:1] == b"{":  # the JSON report; the models are protobuf
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(f, data)

    with monkeypatch.context() as m:  # room for the model, not for its report: nothing is replaced
        m.setattr(qwt_deploy.atomic, "_write_all", disk_full_for_report)
        assert _export(args) == 2
        msg = _one_line(capfd, "qwt-export")
        assert "No space left on device" in msg and "free disk space" in msg
    assert {p: open(folder / p, "rb").read() for p in os.listdir(folder)} == snapshot


def test_atomic_write_full_disk_is_one_error(tmp_path, monkeypatch):
    import qwt_deploy.atomic as atomic
    from qwt_deploy.errors import QwtError

    def full(f, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_write_all", full)
    with pytest.raises(QwtError, match="No space left on device"):
        atomic.atomic_write_bytes(str(tmp_path / "x.bin"), b"data")
    assert os.listdir(tmp_path) == []


# ---- qwt-run and qwt-check ----------------------------------------------------------------
@pytest.fixture()
def tiny(tmp_path):
    return write_tiny_model(str(tmp_path / "tiny.onnx"))


def test_run_tall_image(capfd, tiny, tmp_path):
    from qwt_deploy.cli.run import main

    p = str(tmp_path / "tall.png")
    _png(p, 1, 200_000)
    assert main([tiny, "--input", p]) == 2
    assert "aspect ratio" in _one_line(capfd, "qwt-run")


def test_run_output_is_its_input(capfd, tiny, tmp_path):
    from qwt_deploy.cli.run import main

    x = str(tmp_path / "x.npy")
    np.save(x, np.zeros((1, 1, 28, 28), np.float32))
    before = open(x, "rb").read()
    assert main([tiny, "--input", x, "--output", x]) == 2
    assert "is the input file" in _one_line(capfd, "qwt-run")
    assert open(x, "rb").read() == before


def test_run_model_is_a_folder(capfd, tmp_path):
    from qwt_deploy.cli.run import main

    x = str(tmp_path / "x.npy")
    np.save(x, np.zeros((1, 1, 28, 28), np.float32))
    assert main([str(tmp_path), "--input", x]) == 2
    assert "is a folder" in _one_line(capfd, "qwt-run")


def test_lint_empty_file(capfd, tmp_path):
    from qwt_deploy.cli.check import main

    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    assert main(["--lint", "trt", str(p)]) == 2
    assert "not an ONNX file" in _one_line(capfd, "qwt-check")
