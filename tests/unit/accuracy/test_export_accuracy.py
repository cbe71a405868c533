"""Accuracy against FP32 in every export, the gates, --save-fp32, per-layer sensitivity and
--auto-fallback, as a user runs them: qwt-export / qwt-check --sensitivity and the Python API on
the small Fashion-MNIST CNN (weights ship with the package; images from the Debian package)."""

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qwt_deploy as qd
from qwt_deploy.cli.check import main as check_main
from qwt_deploy.cli.export import main as export_main
from qwt_deploy.data import fashion_mnist as fm
from qwt_deploy.examples import EXAMPLES

pytestmark = pytest.mark.skipif(not fm.available(), reason=fm.missing_reason())
FACTORY = ["--model-factory", "qwt_deploy.examples.fashion_mnist:build_cnn", "--input-shape", "1,28,28"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fashion")
    ex = EXAMPLES["fashion-cnn"]
    np.save(d / "calib.npy", ex.calibration(128, 0))
    x, y = ex.evaluation(96, 0)
    np.save(d / "eval.npy", x)
    np.save(d / "labels.npy", y)
    (d / "labels.txt").write_text("\n".join(str(v) for v in y[:10]) + "\n")  # too few: 10 for 96 samples
    return d


def _export(d, out, *extra, capsys=None):
    rc = export_main(FACTORY + ["--calib-data", str(d / "calib.npy"), "-o", str(out), "--quiet", "--no-latency",
                                *extra])
    cap = capsys.readouterr() if capsys else None
    return rc, cap


def test_export_holds_out_ten_percent_reports_fp32_figures_and_saves_fp32(data, tmp_path, capsys):
    out = tmp_path / "m.int8.onnx"
    rc, cap = _export(data, out, "--save-fp32", capsys=capsys)
    assert rc == 0, cap.err
    rep = json.loads((tmp_path / "m.int8.report.json").read_text())
    # 128 samples: 32 held out (10% = 13 < 32), 96 calibrated on
    assert rep["calibration"]["samples"] == 96 and "32 of 128 calibration samples held out" in rep["calibration"]["held_out"]
    acc = rep["accuracy"]
    assert acc["samples"] == 32 and acc["kind"] == "classes" and 0.9 <= acc["top1_agreement"] <= 1.0
    assert 0 < acc["kl"] < 0.05 and 0.99 < acc["cosine"] < 1.0 and 20 < acc["sqnr_db"] < 80
    assert rep["config"]["quant"]["calib_method"] == "minmax"  # what ran, not "auto"
    assert rep["config"]["quant"]["calib_method_requested"] == "auto" and rep["quantization"]["calib_method"] == "minmax"
    assert "INT8 vs FP32" in cap.out and "top-1 agree" in cap.out and "SQNR" in cap.out
    # --save-fp32: m.fp32.onnx beside it, a float graph that ONNX Runtime runs, named in the report
    fp32 = tmp_path / "m.fp32.onnx"
    assert rep["fp32_path"] == str(fp32) and fp32.is_file()
    g = onnx.load(str(fp32))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.graph.node)
    x = np.load(data / "eval.npy")[:4]
    y = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {g.graph.input[0].name: x})[0]
    ref = EXAMPLES["fashion-cnn"].build()(__import__("torch").from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, ref, atol=1e-3)


def test_eval_data_with_labels_gives_accuracy_side_by_side(data, tmp_path, capsys):
    rc, cap = _export(data, tmp_path / "m.onnx", "--eval-data", str(data / "eval.npy"), "--eval-labels",
                      str(data / "labels.npy"), "--min-cosine", "0.9", capsys=capsys)
    assert rc == 0, cap.err
    rep = json.loads((tmp_path / "m.report.json").read_text())
    assert rep["calibration"]["samples"] == 128  # own evaluation data: nothing held out of the calibration
    acc, y = rep["accuracy"], np.load(data / "labels.npy")
    assert acc["samples"] == 96 and acc["source"].endswith("eval.npy")
    fp32 = EXAMPLES["fashion-cnn"].build()(__import__("torch").from_numpy(np.load(data / "eval.npy"))).detach().numpy()
    assert acc["fp32_top1"] == pytest.approx(float(np.mean(fp32.argmax(1) == y)))
    assert 0.8 < acc["int8_top1"] <= 1.0
    assert rep["accuracy_gates"] == dict(min_agreement=None, max_kl=None, min_cosine=0.9, failures=[], passed=True,
                                         measured_on="simulation")  # ORT = simulation here: no second figure
    assert rep["accuracy_onnxruntime"] is None
    assert re.search(r"top-1 accuracy +\| FP32 \d+\.\d\d% vs INT8 \d+\.\d\d% \(96 labelled samples\)", cap.out), cap.out
    assert re.search(r"accuracy gate +\| PASS \(min-cosine 0.9\)", cap.out), cap.out


def test_a_missed_gate_exits_1_naming_it(data, tmp_path, capsys):
    # any quantized model has KL > 0; agreement 1.0 is possible, so the KL bar is the sure miss
    rc, cap = _export(data, tmp_path / "m.onnx", "--max-kl", "0", "--min-cosine", "0.5", capsys=capsys)
    assert rc == 1
    assert "accuracy gate FAILED" in cap.err and "--max-kl 0" in cap.err and "min-cosine" not in cap.err
    rep = json.loads((tmp_path / "m.report.json").read_text())
    assert rep["accuracy_gates"]["passed"] is False and len(rep["accuracy_gates"]["failures"]) == 1
    assert (tmp_path / "m.onnx").is_file()  # written for inspection; the exit code carries the verdict


@pytest.mark.parametrize("args, words", [
    (["--eval-labels", "labels.npy"], "--eval-labels needs --eval-data"),
    (["--auto-fallback"], "--auto-fallback needs a target"),
    (["--min-agreement", "1.5"], "--min-agreement 1.5 is out of range"),
    (["--holdout", "0"], "--holdout 0.0 is not a fraction"),
    (["--eval-data", "eval.npy", "--eval-labels", "labels.txt"], "10 evaluation labels for 96 evaluation samples"),
    (["--eval-data", "nothere.npy"], "nothere.npy"),
])
def test_bad_accuracy_flags_are_one_line_exit_2(data, tmp_path, capsys, args, words):
    args = [str(data / a) if a.endswith((".npy", ".txt")) else a for a in args]
    rc, cap = _export(data, tmp_path / "m.onnx", *args, capsys=capsys)
    assert rc == 2, cap
    assert words in cap.err and len(cap.err.strip().splitlines()) == 1 and "Traceback" not in cap.err


def test_too_little_calibration_data_says_accuracy_is_unmeasured_and_refuses_gates(data, tmp_path, capsys):
    np.save(tmp_path / "small.npy", np.load(data / "calib.npy")[:40])
    rc = export_main(FACTORY + ["--calib-data", str(tmp_path / "small.npy"), "-o", str(tmp_path / "m.onnx"),
                                "--quiet", "--no-latency"])
    out = capsys.readouterr().out
    assert rc == 0 and "not measured" in out and "at least 64" in out
    rc = export_main(FACTORY + ["--calib-data", str(tmp_path / "small.npy"), "-o", str(tmp_path / "m.onnx"),
                                "--quiet", "--no-latency", "--min-agreement", "0.9"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs held-out data" in err


def test_api_holds_out_disjoint_rows_and_reports_accuracy(data):
    calib = np.load(data / "calib.npy")
    cfg = qd.QuantizeConfig(target="ort", example_shape=(1, 28, 28))
    qm = qd.quantize(EXAMPLES["fashion-cnn"].build(), calib, cfg)
    assert len(qm.inputs) + len(qm.heldout) == len(calib) and len(qm.heldout) == 32
    rows = {r.tobytes() for r in calib}
    cal = {r.tobytes() for r in qm.inputs.first}
    held = {r.tobytes() for r in qm.heldout.first}
    assert not cal & held and cal | held == rows  # disjoint, and nothing lost
    acc = qm.accuracy
    assert isinstance(acc, qd.Accuracy) and acc.samples == 32 and acc is qm.accuracy  # computed once
    again = qd.evaluate(qm, np.load(data / "eval.npy"), np.load(data / "labels.npy"))
    assert again.samples == 96 and again.fp32_top1 is not None and again.int8_top1 is not None


def test_sensitivity_and_auto_fallback_through_the_api(data):
    calib = np.load(data / "calib.npy")
    cfg = qd.QuantizeConfig(target="ort", example_shape=(1, 28, 28),
                            settings=qd.CalibrationSettings(w_bits=3, a_bits=4))
    qm = qd.quantize(EXAMPLES["fashion-cnn"].build(), calib, cfg, evaluation=np.load(data / "eval.npy"))
    rep = qd.sensitivity(qm, samples=32)
    assert rep.samples == 32 and rep.metric == "kl" and sorted(l.node for l in rep.layers) == sorted(qm.plan.weighted)
    scores = [l.score for l in rep.layers]
    assert scores == sorted(scores, reverse=True)  # most sensitive first
    assert all(l.only_quantized >= 0 and l.only_float >= 0 for l in rep.layers)  # KL
    assert all(l.gain == pytest.approx(rep.all_quantized - l.only_float) for l in rep.layers)
    assert max(l.gain for l in rep.layers) > 0  # keeping some layer float helps at W3A4
    fb = qd.auto_fallback(qm, qd.AccuracyGates(min_agreement=0.99), max_float_layers=2, samples=32, ranking=rep)
    assert 1 <= len(fb.chosen) <= 2 and set(fb.chosen) <= set(qm.plan.weighted)
    assert all(n not in fb.quantized.plan.weighted for n in fb.chosen)  # re-calibrated with them float
    assert fb.after.kl < fb.before.kl and fb.after.samples == fb.before.samples == 96


def test_auto_fallback_from_the_cli_reports_layers_and_cost(data, tmp_path, capsys):
    rc, cap = _export(data, tmp_path / "m.onnx", "--w-bits", "3", "--a-bits", "4", "--eval-data",
                      str(data / "eval.npy"), "--auto-fallback", "--min-agreement", "0.999", "--max-float-layers", "2",
                      "--sensitivity-samples", "32", capsys=capsys)
    rep = json.loads((tmp_path / "m.report.json").read_text())
    fb = rep["fallback"]
    assert 1 <= len(fb["chosen"]) <= 2 and fb["max_float_layers"] == 2
    assert fb["size_bytes"]["fallback"] > fb["size_bytes"]["all_int8"]  # float weights are 4x larger
    assert fb["after"]["kl"] < fb["before"]["kl"]
    assert "auto-fallback" in cap.out and fb["chosen"][0] in cap.out and "fallback cost" in cap.out
    assert rc == (0 if not rep["accuracy_gates"]["failures"] else 1)
    if rep["ort_vs_pytorch"]["within_1_step"] < 0.999:  # ORT leaves the simulation: the file's own figures gate
        assert rep["accuracy_onnxruntime"]["samples"] == 96 and rep["accuracy_gates"]["measured_on"] == "onnxruntime"
    # the chosen layers are float in the file: no weight DequantizeLinear feeds them
    g = onnx.load(str(tmp_path / "m.onnx")).graph
    producers = {o: n for n in g.node for o in n.output}
    for name in fb["chosen"]:
        conv = next(n for n in g.node if n.name == name or n.name.startswith(name + "/"))
        assert producers.get(conv.input[1]) is None or producers[conv.input[1]].op_type != "DequantizeLinear"


def test_qwt_check_sensitivity_writes_table_json_and_png(data, tmp_path, capsys):
    out = tmp_path / "sens"
    rc = check_main(FACTORY + ["--calib-data", str(data / "calib.npy"), "--sensitivity", "--sensitivity-samples",
                               "32", "-o", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    rep = json.loads((out / "sensitivity.json").read_text())
    assert rep["samples"] == 32 and rep["metric"] == "kl" and len(rep["layers"]) == 13  # 12 convs + fc
    assert "32 of 128 calibration samples held out" in rep["source"]
    scores = [l["score"] for l in rep["layers"]]
    assert scores == sorted(scores, reverse=True)
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sensitivity.txt").read_text().strip() in text
    assert rep["layers"][0]["node"] in text and "only this float" in text
