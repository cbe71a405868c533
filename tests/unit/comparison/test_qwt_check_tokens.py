"""qwt-check on models with token inputs (ids + attention mask): mechanics on the tiny
random-weight encoder of conftest (never accuracy); the MiniLM run is in tests/e2e."""

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qwt_deploy.comparison.agreement import output_kind
from qwt_deploy.cli.check import main as check_main
from qwt_deploy.cli.export import main as export_main
from conftest import MAX_LEN, VOCAB, TinyEncoder

PAIR = "ort-cpu[ort] vs pytorch-fake-quant[ort]"
FAST = ["--num-calib", "32", "--num-inputs", "24", "--check-batch", "8", "--threads", "1", "--quiet", "--no-gpu"]


class TokenEncoder(TinyEncoder):
    """TinyEncoder that says how to trace it (what qwt_deploy.frontend.onnx_source.fp32_onnx_from_module asks)."""

    def example_inputs(self):
        from torch.export import Dim

        batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=2, max=MAX_LEN)
        ids = torch.ones(2, 8, dtype=torch.int64)
        return (ids, torch.ones_like(ids)), ({0: batch, 1: seq}, {0: batch, 1: seq})


def _tokens(rng, n, s):
    """Right-padded random sentences of length 2..s (mask 0 on padding), int64 as tokenizers give."""
    ids = rng.integers(1, VOCAB, (n, s)).astype(np.int64)
    mask = np.ones((n, s), np.int64)
    for i, length in enumerate(rng.integers(2, s + 1, n)):
        ids[i, length:], mask[i, length:] = 0, 0
    return ids, mask


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from conftest import export_program

    d = tmp_path_factory.mktemp("check_tokens")
    torch.export.save(export_program(TokenEncoder(), None), str(d / "enc.pt2"))
    rng = np.random.default_rng(0)
    ids, mask = _tokens(rng, 32, 20)
    np.savez(d / "tokens.npz", input_ids=ids, attention_mask=mask)
    ids, mask = _tokens(rng, 24, 24)  # other sentences, longer padding than any calibration batch
    np.savez(d / "heldout.npz", input_ids=ids, attention_mask=mask)
    return d


def _args(files, out, *extra, inputs="heldout.npz"):
    return [str(files / "enc.pt2"), "--calib-data", str(files / "tokens.npz"), "--inputs", str(files / inputs),
            "-o", str(out), *FAST, *extra]


def _report(out):
    with open(os.path.join(out, "check.json")) as f:
        return json.load(f)


def test_token_model_checks_end_to_end_with_cosine_and_layers(files, tmp_path, capsys):
    out = tmp_path / "rep"
    assert check_main(_args(files, out)) == 0
    text = capsys.readouterr().out
    r = _report(out)
    assert r["settings"]["input_names"] == ["input_ids", "attention_mask"] and r["settings"]["num_inputs"] == 24
    assert r["output_kinds"] == {"output": "embedding"} and r["notes"]  # unit-norm rows: an embedding
    ran = {p["name"] for p in r["paths"] if p["ran"]}
    assert {"pytorch-fp32", "pytorch-fake-quant[ort]", "ort-cpu[ort]"} <= ran
    assert r["fp32_capture_vs_module_max_abs"] is not None and r["fp32_capture_vs_module_max_abs"] < 1e-4

    gated = [c for c in r["outputs"] if c["gated"]]
    assert len(gated) == 1 and gated[0]["passed"] and gated[0]["top1_agreement"] is None
    assert gated[0]["cosine"] >= r["settings"]["min_cosine"] and gated[0]["within_atol"] >= 0.99
    vs_fp32 = next(c for c in r["outputs"] if c["path"] == "ort-cpu[ort]" and c["reference"] == "pytorch-fp32")
    assert 0.9 < vs_fp32["cosine"] < 1.0  # quantization costs something, but not everything
    assert "n/a (embedding)" in text and "embedding cosine ort-cpu[ort] vs pytorch-fake-quant[ort]" in text
    assert "RESULT: PASS" in text

    # layers: integer inputs (no quantizer) are skipped; every linear is mapped, with an SQNR
    values = [l["value"] for l in r["layers"]]
    assert "input_ids" not in values and "attention_mask" not in values
    linears = [l for l in r["layers"] if l["op"] == "linear"]
    assert len(linears) == 6
    for rec in linears:
        assert rec["tensors"]["ort-cpu[ort]"], rec["value"]
        for path in ("pytorch-fake-quant[ort]", "ort-cpu[ort]"):
            assert np.isfinite(rec["sqnr_db"][path]) and rec["sqnr_db"][path] > 0, (path, rec)
        assert rec["vs_fake_quant"][PAIR]["within_atol"] >= 0.999, rec
    assert r["first_divergence"][PAIR] is None and r["first_large_error"][PAIR] is None
    m = r["marking_check"]["ort"]  # marking intermediates must not change ORT's integer kernels
    assert m["same_integer_kernels"] and m["marked"]["integer_ops"] > 0 and m["final_output_max_diff_steps"] == 0.0
    with open(out / "sqnr.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_explicit_step_gates_apply_to_embeddings(files, tmp_path, capsys):
    out = tmp_path / "rep"
    assert check_main(_args(files, out, "--min-agreement", "1.01", "--no-layers")) == 1
    r = _report(out)
    assert r["settings"]["step_gate_embeddings"] and any("elements within" in f for f in r["failures"])
    assert check_main(_args(files, tmp_path / "cos", "--min-cosine", "1.5", "--no-layers")) == 1
    assert any("mean cosine" in f for f in _report(tmp_path / "cos")["failures"])
    assert "RESULT: FAIL" in capsys.readouterr().out


def test_perturbed_token_onnx_fails_the_default_gate_and_names_the_layer(files, tmp_path):
    model = tmp_path / "enc.int8.onnx"
    assert export_main([str(files / "enc.pt2"), "--calib-data", str(files / "tokens.npz"), "-o", str(model),
                        "--num-calib", "32", "--threads", "1", "--quiet", "--no-latency"]) == 0
    m = onnx.load(str(model))
    producers = {o: n for n in m.graph.node for o in n.output}
    mm = next(n for n in m.graph.node if n.op_type == "MatMul" and n.name.startswith("fc1"))
    w = producers[mm.input[1]]  # the weight DequantizeLinear
    init = next(i for i in m.graph.initializer if i.name == w.input[0])
    codes = numpy_helper.to_array(init).copy()
    codes[:, ::2] = -codes[:, ::2]  # flip half of fc1's output channels
    init.CopyFrom(numpy_helper.from_array(codes, init.name))
    bad = tmp_path / "perturbed.onnx"
    onnx.save(m, str(bad))

    out = tmp_path / "bad"
    assert check_main(_args(files, out, "--onnx", f"ort={bad}")) == 1  # default gates: the cosine gate fails
    r = _report(out)
    assert any("mean cosine" in f for f in r["failures"]), r["failures"]
    d = r["first_divergence"][PAIR]
    assert d is not None and d["node"] == "fc1", d
    big = r["first_large_error"][PAIR]  # the locator that ignores scattered rounding flips
    assert big is not None and big["node"] == "fc1" and big["mean_steps"] >= 2.0, big


def test_trt_layout_of_a_token_model_checked_in_float_simulation(files, tmp_path):
    out = tmp_path / "rep"
    rc = check_main(_args(files, out, "--targets", "trt", "--no-layers"))
    r = _report(out)
    names = {p["name"]: p for p in r["paths"]}
    assert names["ort-cpu[trt]"]["ran"] and names["tensorrt[trt]"]["skipped"]
    gated = [c for c in r["outputs"] if c["gated"] and c["path"] == "ort-cpu[trt]"]
    assert gated and gated[0]["min_cosine"] >= 0.999, gated
    assert rc == 0


@pytest.mark.parametrize("case", ["missing-array", "float-ids", "npy", "vocab"])
def test_bad_check_inputs_exit_2_with_one_line_naming_check_inputs(files, tmp_path, capsys, case):
    ids, mask = _tokens(np.random.default_rng(1), 8, 12)
    path = tmp_path / "held.npz"
    if case == "missing-array":
        np.savez(path, input_ids=ids)
    elif case == "float-ids":
        np.savez(path, input_ids=ids.astype(np.float32), attention_mask=mask)
    elif case == "vocab":
        np.savez(path, input_ids=ids + VOCAB, attention_mask=mask)
    else:
        path = tmp_path / "held.npy"
        np.save(path, ids)
    out = tmp_path / "rep"
    args = _args(files, out)
    args[args.index("--inputs") + 1] = str(path)
    assert check_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qwt-check: error:") and "check inputs" in err[0] and "Fix:" in err[0], err
    assert not os.path.exists(out / "check.json")


def test_simulation_runner_takes_every_input_with_its_dtype_and_dynamic_axes(files):
    from polygraphy.exception import PolygraphyException

    from qwt_deploy.comparison.cross_backend import feed_dicts
    from qwt_deploy.comparison.runners import SimulationRunner, input_specs, profile_shapes
    from conftest import capture
    from qwt_deploy.quantization.simulate import SimulatedModel
    from qwt_deploy.data.inputs import InputSet

    graph = capture(torch.export.load(str(files / "enc.pt2")))
    specs = input_specs(graph, ["input_ids", "attention_mask"])
    assert [(s.name, s.dtype, s.shape) for s in specs] == [("input_ids", np.int64, (None, None)),
                                                           ("attention_mask", np.int64, (None, None))]
    with np.load(files / "heldout.npz") as z:
        x = InputSet(("input_ids", "attention_mask"), (z["input_ids"], z["attention_mask"]))
    feeds = feed_dicts(x, ["input_ids", "attention_mask"], 8)
    lengths = [f["input_ids"].shape[1] for f in feeds]
    assert lengths == sorted(lengths, reverse=True) and lengths[-1] < x.arrays[0].shape[1]  # sorted, trimmed
    # the TensorRT optimization profile covers every batch the check feeds (no TensorRT needed to test it)
    shapes = profile_shapes(specs, x, 8)
    assert shapes["input_ids"] == ((1, lengths[-1]), (8, lengths[0]), (8, lengths[0])) == shapes["attention_mask"]
    runner = SimulationRunner(SimulatedModel(graph), specs, {graph.outputs[0]: "output"}, intermediates=False)
    with runner:
        out = runner.infer(feeds[-1])["output"]
        ref = SimulatedModel(graph)(tuple(torch.from_numpy(feeds[-1][n]) for n in ("input_ids", "attention_mask")))
        np.testing.assert_array_equal(out, ref.numpy())
        with pytest.raises(PolygraphyException):  # float ids are refused, not silently cast
            runner.infer({k: v.astype(np.float32) for k, v in feeds[0].items()})


def test_output_kind_tells_embeddings_from_class_scores():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 10)).astype(np.float32)
    emb = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    assert output_kind(logits) == "classes" and output_kind(emb) == "embedding"
    assert output_kind(logits, "embedding") == "embedding" and output_kind(logits[:, :1]) == "tensor"
