"""qwt-export on a model with token inputs (input_ids + attention_mask), as a user runs it.

Mechanics only: a tiny random-weight BERT-like encoder (conftest.TinyEncoder)
saved as a torch.export program with dynamic batch and sequence axes, and random token ids.
The real model (all-MiniLM-L6-v2 on real sentences) is in tests/e2e/test_minilm_end_to_end.py.
"""

import json
import os

import numpy as np
import onnx
import pytest
import torch

from qwt_deploy.data.inputs import InputSet
from qwt_deploy.cli.export import main
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx

from conftest import MAX_LEN, VOCAB, TinyEncoder
from conftest import tokens as _tokens


class TracedTinyEncoder(TinyEncoder):
    """The encoder with the tracing hook qwt-export uses for a factory model with token inputs."""

    def example_inputs(self):
        from torch.export import Dim

        batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=2, max=MAX_LEN)
        ids, mask = _tokens(np.random.default_rng(0), 2, 8)
        return (ids, mask), ({0: batch, 1: seq}, {0: batch, 1: seq})


def build_tiny_encoder():
    return TracedTinyEncoder().eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    model = build_tiny_encoder()
    args, dynamic = model.example_inputs()
    program = str(d / "encoder.pt2")
    torch.export.save(torch.export.export(model, args, dynamic_shapes=dynamic), program)
    ids, mask = _tokens(np.random.default_rng(1), 48, 16)
    calib = str(d / "tokens.npz")
    np.savez(calib, input_ids=ids.numpy(), attention_mask=mask.numpy())
    return dict(dir=d, program=program, calib=calib, ids=ids.numpy(), mask=mask.numpy())


def _export(files, name, *extra):
    out = str(files["dir"] / name)
    code = main([files["program"], "--calib-data", files["calib"], "--quiet", "--no-latency", "--num-calib", "48",
                 "--keep-float", "layer_norm,softmax,gelu,add", "-o", out, "--threads", "1", *extra])
    return code, out


@pytest.fixture(scope="module")
def exported(files):
    code, out = _export(files, "enc.int8.onnx")
    assert code == 0
    return out


def test_token_model_exports_with_dynamic_batch_and_sequence(exported, files):
    m = onnx.load(exported)
    onnx.checker.check_model(m, full_check=True)
    ins = {i.name: i.type.tensor_type for i in m.graph.input}
    assert list(ins) == ["input_ids", "attention_mask"]
    for t in ins.values():
        assert t.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in t.shape.dim] == ["batch", "seq"]
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["qwt_deploy.inputs"])[1] == dict(name="attention_mask", dtype="int64", shape=["batch", "seq"])
    assert "qwt_deploy.preprocess" not in meta  # no image keys: they would be false for a token model

    sess = SessionFromOnnx(exported, threads=1)()
    a = InputSet(("input_ids", "attention_mask"), (files["ids"][:3, :5], files["mask"][:3, :5]))
    for s in (5, 16):  # two sequence lengths, one file
        ids, mask = files["ids"][:3, :s].copy(), files["mask"][:3, :s].copy()
        mask[:, 0] = 1
        out = sess.run(None, InputSet(a.names, (ids, mask)).feed(sess))[0]
        assert out.shape == (3, 32) and np.isfinite(out).all()


def test_report_checks_ort_against_the_simulation_on_token_inputs(exported):
    r = json.load(open(exported.replace(".onnx", ".report.json")))
    assert r["folded_layers"] == 6 and r["node_count"]["unfolded"] > r["node_count"]["folded"]
    agr = r["ort_vs_pytorch"]
    assert agr["samples"] == 48 and agr["cosine"] >= 0.999 and agr["mean_steps"] <= 1.0, agr
    assert r["int8_coverage"]["by_type"].get("QLinearMatMul", 0) + r["int8_coverage"]["by_type"].get(
        "MatMulIntegerToFloat", 0) >= 6, r["int8_coverage"]
    # every linear and both attention matmuls (named "<module>" and "<module>/MatMul") in integer kernels
    assert r["int8_coverage"]["flops"]["share"] == 1.0 and r["int8_coverage"]["flops"]["float_ops"] == [], r["int8_coverage"]


def test_embedding_table_ships_as_int8_rows(exported, files):
    """The token table is stored as INT8 codes with one float scale per row (4x smaller) and
    gathered before it is scaled; ``--keep-float ...,embedding`` keeps it float."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(exported).graph.initializer}
    tables = [a for a in inits.values() if a.shape[:1] == (VOCAB,) and a.ndim == 2 and a.shape[1] > 1]
    assert len(tables) == 1 and tables[0].dtype == np.int8 and np.abs(tables[0]).max() == 127
    code, floating = _export(files, "enc.float-table.onnx", "--keep-float", "layer_norm,softmax,gelu,add,embedding")
    assert code == 0
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(floating).graph.initializer}
    assert [a.dtype for a in inits.values() if a.shape == (VOCAB, 32)] == [np.float32]
    assert os.path.getsize(floating) - os.path.getsize(exported) > 0.7 * VOCAB * 32 * 3


def test_token_model_exports_for_tensorrt(files):
    code, out = _export(files, "enc.trt.onnx", "--target", "trt")
    assert code == 0  # the TensorRT rule checker runs inside the export: an error fails it
    r = json.load(open(out.replace(".onnx", ".report.json")))
    assert r["trt_rules"]["errors"] == 0 and r["ort_vs_pytorch"]["cosine"] >= 0.999, r["ort_vs_pytorch"]


def test_token_export_is_deterministic(exported, files):
    code, again = _export(files, "enc.again.int8.onnx")
    assert code == 0
    with open(exported, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()


def test_factory_with_example_inputs_traces_token_models(files, tmp_path):
    out = str(tmp_path / "factory.int8.onnx")
    code = main(["--model-factory", "test_export_tokens:build_tiny_encoder", "--calib-data", files["calib"],
                 "--quiet", "--no-latency", "--num-calib", "16", "--threads", "1", "-o", out])
    assert code == 0
    assert [i.name for i in onnx.load(out).graph.input] == ["input_ids", "attention_mask"]


def _bad(capsys, files, tmp_path, **arrays):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **arrays)
    out = str(tmp_path / "bad.int8.onnx")
    code = main([files["program"], "--calib-data", path, "--quiet", "--no-latency", "-o", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Fix:" in err[0], err
    assert not os.path.exists(out)
    return err[0]


def test_bad_token_data_gets_one_line_errors(capsys, files, tmp_path):
    ids, mask = files["ids"], files["mask"]
    assert "also needs attention_mask" in _bad(capsys, files, tmp_path, input_ids=ids)
    assert "model takes integers" in _bad(capsys, files, tmp_path, input_ids=ids.astype(np.float32), attention_mask=mask)
    assert "must be 0/1" in _bad(capsys, files, tmp_path, input_ids=ids, attention_mask=mask * 2)
    assert f"embedding table has {VOCAB} rows" in _bad(capsys, files, tmp_path, input_ids=ids + VOCAB, attention_mask=mask)
    assert "different sample counts" in _bad(capsys, files, tmp_path, input_ids=ids, attention_mask=mask[:5])
    assert "disagree on axis 'seq'" in _bad(capsys, files, tmp_path, input_ids=ids, attention_mask=mask[:, :8])


def test_image_sources_are_refused_for_token_models(capsys, files, tmp_path):
    out = str(tmp_path / "x.int8.onnx")
    for source in ("synthetic", str(tmp_path)):
        assert main([files["program"], "--calib-data", source, "--quiet", "-o", out]) == 2
        err = capsys.readouterr().err.strip()
        assert "model takes 2 inputs (input_ids, attention_mask)" in err and "numpy.savez" in err, err
        assert not os.path.exists(out)
