"""The FP32-ONNX front end (qwt_deploy.frontend.onnx_source): PyTorch -> ONNX with the dynamo
exporter, and a user's .onnx loaded and validated.

Mechanics use the random-weight SmallCNN and TinyEncoder from tests/conftest.py (never for
accuracy); the ONNX Runtime-vs-PyTorch check on a trained model uses the Fashion-MNIST CNN on
real test images and skips, saying why, where the dataset is absent. The real models (MTCNN,
MiniLM, EfficientNet-Lite0) are in tests/e2e/test_onnx_source_models.py.
"""

import hashlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.export import Dim

from conftest import MAX_LEN, TinyEncoder, make_small_cnn, op_counts, tokens
from qwt_deploy.data import fashion_mnist as fm
from qwt_deploy.errors import QwtError
from qwt_deploy.frontend.onnx_source import (OPSET, drop_needless_allowzero, fp32_onnx_from_module,
                                             load_fp32_onnx)


def dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def cnn():
    return make_small_cnn()


@pytest.fixture(scope="module")
def cnn_onnx(cnn):
    """SmallCNN with a dynamic batch, exported twice (determinism)."""
    x = torch.zeros(2, 3, 32, 32)
    return fp32_onnx_from_module(cnn, x, ({0: Dim.DYNAMIC},)), fp32_onnx_from_module(cnn, x, ({0: Dim.DYNAMIC},))


# ------------------------------------------------------------------------------ fp32_onnx_from_module
def test_export_is_deterministic_and_has_no_paths(cnn_onnx):
    a, b = cnn_onnx
    assert a.SerializeToString() == b.SerializeToString()
    raw = a.SerializeToString()
    # the exporter records each node's stack trace (absolute file paths) and fx repr: stripped
    assert b"conftest.py" not in raw and os.getcwd().encode() not in raw and b"pkg.torch" not in raw
    assert not a.doc_string and not any(n.metadata_props or n.doc_string for n in a.graph.node)


def test_export_inlines_weights_and_keeps_batchnorm(cnn_onnx):
    m = cnn_onnx[0]
    assert [o.version for o in m.opset_import if o.domain == ""] == [OPSET]
    assert m.graph.initializer and all(t.data_location == TensorProto.DEFAULT and t.raw_data for t in m.graph.initializer)
    ops = op_counts(m)
    assert ops["BatchNormalization"] == 1  # left for the pipeline's fold pass
    assert "Pad" not in ops and ops["Conv"] == 4  # the zero pad went into the stem Conv's pads
    onnx.checker.check_model(m)


def test_dynamic_batch_runs_at_1_and_5(cnn, cnn_onnx):
    m = cnn_onnx[0]
    assert [i.name for i in m.graph.input] == ["x"] and [o.name for o in m.graph.output] == ["output"]
    assert dims(m.graph.input[0]) == ["batch", 3, 32, 32] and dims(m.graph.output[0]) == ["batch", 10]
    s = session(m)
    # random inputs: a mechanics check of the batch axis, not an accuracy figure
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    for n in (1, 5):
        with torch.no_grad():
            ref = cnn(torch.from_numpy(x[:n])).numpy()
        got = s.run(None, {"x": x[:n]})[0]
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_static_shapes_when_not_asked(cnn):
    m = fp32_onnx_from_module(cnn, torch.zeros(3, 3, 32, 32), input_names=["image"], output_names=["logits"])
    assert [i.name for i in m.graph.input] == ["image"] and [o.name for o in m.graph.output] == ["logits"]
    assert dims(m.graph.input[0]) == [3, 3, 32, 32] and dims(m.graph.output[0]) == [3, 10]


def test_layout_of_the_example_does_not_change_the_graph(cnn):
    """torch.export traces strides; ONNX has none: a channels-last example gives the same bytes."""
    x = torch.randn(2, 3, 32, 32)
    a = fp32_onnx_from_module(cnn, x, ({0: Dim.DYNAMIC},))
    b = fp32_onnx_from_module(cnn, x.to(memory_format=torch.channels_last), ({0: Dim.DYNAMIC},))
    assert a.SerializeToString() == b.SerializeToString()


@pytest.mark.skipif(not fm.available(), reason=fm.missing_reason())
def test_fashion_cnn_onnx_matches_pytorch_on_real_images():
    from qwt_deploy.examples.fashion_mnist import build_cnn

    model = build_cnn()
    x, _ = fm.test_images(256)
    m = fp32_onnx_from_module(model, torch.from_numpy(x[:2]), ({0: Dim.DYNAMIC},))
    assert op_counts(m)["BatchNormalization"] == 12 and op_counts(m)["Conv"] == 12
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = session(m).run(None, {"x": x})[0]
    # measured: 2.5e-5 on logits up to 12.6 (float32 summation order, BN not folded in ORT)
    assert np.abs(got - ref).max() < 1e-4
    assert (got.argmax(1) == ref.argmax(1)).all()


class ThreeOutputs(torch.nn.Module):
    """A tuple of outputs, one of them the input itself and one repeated (the exporter must add
    Identity nodes for those) -- the shape of MTCNN's (boxes, landmarks, probabilities)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.fc(x))
        return y, y.softmax(-1), x


def test_several_outputs_are_kept_and_named():
    model = ThreeOutputs().eval()
    x = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.5, 0.0, -0.5, 3.0]])
    m = fp32_onnx_from_module(model, x, ({0: Dim.DYNAMIC},))
    assert [i.name for i in m.graph.input] == ["x"]
    assert [o.name for o in m.graph.output] == ["output_0", "output_1", "output_2"]
    assert [dims(o) for o in m.graph.output] == [["batch", 3], ["batch", 3], ["batch", 4]]
    got = session(m).run(None, {"x": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r.numpy(), atol=1e-6)
    named = fp32_onnx_from_module(model, x, output_names=["boxes", "probs", "echo"])
    assert [o.name for o in named.graph.output] == ["boxes", "probs", "echo"]
    with pytest.raises(QwtError, match="2 output names .* 3 outputs. Fix: give one distinct name per output"):
        fp32_onnx_from_module(model, x, output_names=["a", "b"])


class SeparateInputs(torch.nn.Module):
    """Two batch-first inputs that never meet: torch gives each its own batch symbol."""

    def forward(self, a, b):
        return a * 2, b + 1


def test_batch_symbols_of_inputs_are_unified():
    a, b = torch.ones(2, 4), torch.ones(2, 3)
    m = fp32_onnx_from_module(SeparateInputs(), (a, b), ({0: Dim.DYNAMIC}, {0: Dim.DYNAMIC}))
    assert [dims(v) for v in list(m.graph.input) + list(m.graph.output)] == [["batch", 4], ["batch", 3]] * 2
    out = session(m).run(None, {"a": np.ones((3, 4), np.float32), "b": np.ones((3, 3), np.float32)})
    assert [o.shape for o in out] == [(3, 4), (3, 3)]
    # names the user gave are kept, and then the axes stay separate
    named = fp32_onnx_from_module(SeparateInputs(), (a, b), ({0: Dim("n")}, {0: Dim("m")}))
    assert [dims(v)[0] for v in named.graph.input] == ["n", "m"]


class TokenEncoder(TinyEncoder):
    """The model traces itself: example_inputs() -> (args, dynamic_shapes), as minilm.py does."""

    def example_inputs(self):
        batch, seq = Dim("batch", min=1, max=64), Dim("seq", min=2, max=MAX_LEN)
        ids = torch.ones(2, 8, dtype=torch.int64)
        return (ids, torch.ones_like(ids)), ({0: batch, 1: seq}, {0: batch, 1: seq})


def test_token_model_traces_itself_with_dynamic_batch_and_sequence():
    model = TokenEncoder().eval()
    m = fp32_onnx_from_module(model, None)  # example_inputs() supplies args and axes
    assert [(i.name, dims(i), i.type.tensor_type.elem_type) for i in m.graph.input] == [
        ("input_ids", ["batch", "seq"], TensorProto.INT64), ("attention_mask", ["batch", "seq"], TensorProto.INT64)]
    assert dims(m.graph.output[0]) == ["batch", 32]
    s = session(m)
    rng = np.random.default_rng(0)
    for n, length in ((1, 5), (5, 17)):
        ids, mask = tokens(rng, n, length)  # random ids: a mechanics check
        got = s.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.no_grad():
            ref = model(ids, mask).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_saved_program_gives_the_same_graph(cnn, tmp_path):
    program = torch.export.export(cnn, (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: Dim("batch")},))
    torch.export.save(program, str(tmp_path / "cnn.pt2"))
    from_file = fp32_onnx_from_module(torch.export.load(str(tmp_path / "cnn.pt2")))
    from_module = fp32_onnx_from_module(cnn, torch.zeros(2, 3, 32, 32), ({0: Dim("batch")},))
    assert from_file.SerializeToString() == from_module.SerializeToString()


@torch.library.custom_op("qwt_onnx_source_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class UsesMystery(torch.nn.Module):
    def forward(self, x):
        return mystery(x) + 1


class DataDependent(torch.nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_export_errors_are_one_line_and_name_the_op(capfd):
    with pytest.raises(QwtError) as e:
        fp32_onnx_from_module(UsesMystery(), torch.zeros(2, 3))
    msg = str(e.value)
    assert "no ONNX translation for the operator qwt_onnx_source_test.mystery.default" in msg
    assert "Fix: replace it with standard torch ops" in msg and "\n" not in msg
    with pytest.raises(QwtError, match="torch.export could not trace the model .*data-dependent") as e:
        fp32_onnx_from_module(DataDependent(), torch.zeros(2, 3))
    assert "\n" not in str(e.value)
    assert "def forward" not in capfd.readouterr().err  # torch's graph dump is swallowed
    with pytest.raises(QwtError, match="no example inputs"):
        fp32_onnx_from_module(make_small_cnn(), None)


def test_allowzero_goes_only_where_the_shape_has_no_zero():
    def reshape_model(shape):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        node = helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)
        g = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(np.array(shape, np.int64), "s")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])

    plain, zero = reshape_model([2, -1]), reshape_model([2, 0, 4])
    assert drop_needless_allowzero(plain) == 1 and not plain.graph.node[0].attribute
    assert drop_needless_allowzero(zero) == 0 and zero.graph.node[0].attribute[0].i == 1


def test_exported_reshapes_have_no_needless_allowzero(cnn_onnx):
    reshapes = [n for n in cnn_onnx[0].graph.node if n.op_type == "Reshape"]
    assert reshapes and not any(a.name == "allowzero" and a.i for n in reshapes for a in n.attribute)


# ------------------------------------------------------------------------------ load_fp32_onnx
def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def save(model, path, external=False):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save with external data moves the weights out of the proto it gets
    onnx.save(copy, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=os.path.basename(str(path)) + ".data", size_threshold=0)
    return str(path)


def tiny(nodes, inputs, outputs, inits=(), opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def vi(name, elem=TensorProto.FLOAT, shape=("batch", 4)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def relu_model(opset=18, elem=TensorProto.FLOAT):
    return tiny([helper.make_node("Relu", ["x"], ["y"])], [vi("x", elem)], [vi("y", elem)], opset=opset)


def test_load_round_trip_with_external_data_leaves_files_alone(cnn_onnx, tmp_path):
    path = save(cnn_onnx[0], tmp_path / "cnn.onnx", external=True)
    data = path + ".data"
    before = digest(path), digest(data)
    m = load_fp32_onnx(path)
    assert (digest(path), digest(data)) == before and sorted(os.listdir(tmp_path)) == ["cnn.onnx", "cnn.onnx.data"]
    assert all(t.data_location == TensorProto.DEFAULT for t in m.graph.initializer)
    assert {t.name: t.raw_data for t in m.graph.initializer} == {t.name: t.raw_data for t in cnn_onnx[0].graph.initializer}
    assert m.graph.value_info  # shapes inferred
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(session(m).run(None, {"x": x})[0], session(cnn_onnx[0]).run(None, {"x": x})[0])


def test_load_accepts_token_model_without_float_inputs(tmp_path):
    """Integer ids into a float embedding table: no float input, but float activations."""
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    m = tiny([helper.make_node("Gather", ["table", "ids"], ["emb"]), helper.make_node("Relu", ["emb"], ["y"])],
             [vi("ids", TensorProto.INT64, ("batch", "seq"))], [vi("y", shape=("batch", "seq", 4))], [table])
    path = save(m, tmp_path / "tokens.onnx")
    before = digest(path)
    assert load_fp32_onnx(path).graph.node[0].op_type == "Gather"
    assert digest(path) == before


def refused(path, *words):
    before = digest(path) if os.path.isfile(path) and os.path.getsize(path) else None
    with pytest.raises(QwtError) as e:
        load_fp32_onnx(path)
    msg = str(e.value)
    assert "\n" not in msg and ". Fix: " in msg and e.value.problem and e.value.fix, msg
    for w in words:
        assert w in msg, msg
    if before is not None:
        assert digest(path) == before
    return msg


def test_refuses_what_is_not_onnx(tmp_path, cnn):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 10)
    refused(str(text), "is not an ONNX model", "Fix: pass an .onnx file")
    torch.save(cnn.state_dict(), str(tmp_path / "weights.onnx"))
    refused(str(tmp_path / "weights.onnx"), "a zip archive", "not an ONNX model", "Fix:")
    (tmp_path / "empty.onnx").write_bytes(b"")
    refused(str(tmp_path / "empty.onnx"), "is empty", "Fix: export the model to ONNX again")
    refused(str(tmp_path / "missing.onnx"), "does not exist", "Fix: check the path")


def test_an_opset_12_graph_is_converted_up_to_17_and_checked_on_the_data(tmp_path):
    """Paddle2ONNX writes opset 12 (PP-OCRv4 det); the converted graph must compute the same."""
    from qwt_deploy.frontend.onnx_source import check_conversion

    path = save(relu_model(opset=12), tmp_path / "old12.onnx")
    m = load_fp32_onnx(path)
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [17]
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    assert check_conversion(path, m, {"x": x}) == 0.0
    broken = onnx.ModelProto()
    broken.CopyFrom(m)
    broken.graph.node[0].op_type = "Neg"  # a conversion that changed the computation is caught
    with pytest.raises(QwtError, match="changed its outputs"):
        check_conversion(path, broken, {"x": x})


def test_refuses_an_old_opset_and_names_it(tmp_path):
    msg = refused(save(relu_model(opset=6), tmp_path / "old.onnx"), "opset 6, below 7",
                  f"Fix: re-export the model with a newer opset (e.g. torch.onnx.export(..., opset_version={OPSET}))")
    assert "oldest that can be converted" in msg


def test_refuses_an_already_quantized_model(tmp_path):
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.int8), "z")
    m = tiny([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
              helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], [vi("x")], [vi("y")], [s, z])
    refused(save(m, tmp_path / "int8.onnx"), "already quantized", "DequantizeLinear, QuantizeLinear",
            "Fix: pass the FP32 model it was made from")


def test_refuses_a_model_with_no_float_computation(tmp_path):
    one = numpy_helper.from_array(np.array(1, np.int64), "one")
    m = tiny([helper.make_node("Add", ["ids", "one"], ["y"])], [vi("ids", TensorProto.INT64)],
             [vi("y", TensorProto.INT64)], [one])
    refused(save(m, tmp_path / "ints.onnx"), "computes no float tensor from its inputs (ids: int64)",
            "nothing to quantize", "Fix: pass an FP32 model")


def test_refuses_a_half_precision_input(tmp_path):
    refused(save(relu_model(elem=TensorProto.FLOAT16), tmp_path / "fp16.onnx"), "input 'x'", "float16, not float32",
            "Fix: export the FP32 model")


def test_refuses_a_model_without_inputs(tmp_path):
    c = helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.ones((1, 4), np.float32)))
    refused(save(tiny([c], [], [vi("y", shape=(1, 4))]), tmp_path / "const.onnx"), "has no inputs", "Fix:")


def test_refuses_missing_external_data(cnn_onnx, tmp_path):
    path = save(cnn_onnx[0], tmp_path / "cnn.onnx", external=True)
    os.rename(path + ".data", str(tmp_path / "elsewhere.data"))
    refused(path, "keeps weights in 'cnn.onnx.data', which is not beside it", "Fix: put cnn.onnx.data in")


def test_refuses_an_invalid_graph(tmp_path):
    m = tiny([helper.make_node("Relu", ["nowhere"], ["y"])], [vi("x")], [vi("y")])
    refused(save(m, tmp_path / "broken.onnx"), "is not a valid ONNX model", "nowhere", "Fix: re-export the model")


def test_refuses_inconsistent_shapes(tmp_path):
    w = numpy_helper.from_array(np.ones((5, 2), np.float32), "w")
    m = tiny([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", shape=(2, 4))], [vi("y", shape=(2, 2))], [w])
    refused(save(m, tmp_path / "shapes.onnx"), "shape inference fails", "Fix: re-export the model")


def test_an_opset_the_exporter_cannot_write_is_refused(cnn):
    """Opset 17: the down-converter leaves a graph with ReduceMean (SmallCNN's pooling) at 18."""
    with pytest.raises(QwtError, match="torch.onnx wrote opset 18 where opset 17 was asked for. Fix: export with opset 20"):
        fp32_onnx_from_module(cnn, torch.zeros(2, 3, 32, 32), opset=17)
    m = fp32_onnx_from_module(cnn, torch.zeros(2, 3, 32, 32), opset=18)
    assert [o.version for o in m.opset_import if o.domain == ""] == [18]


# ---------------------------------------------------------------- a program traced at a fixed batch
def test_a_fixed_batch_program_is_made_batch_free_and_proven(small_program, mech_data):
    """torch.export at batch 2 writes Reshape(mean, [2, 16]): freed to [0, 16], inputs and
    outputs get a "batch" axis, and the result equals the program at any batch."""
    from qwt_deploy.frontend.onnx_source import fixed_batch, fp32_onnx_from_module, free_batch_axis

    m = fp32_onnx_from_module(small_program)
    assert fixed_batch(m) == 2
    assert free_batch_axis(m) == 2 and fixed_batch(m) is None
    assert [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim[:1]] == ["batch"]
    x = mech_data[:5]
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        want = np.concatenate([small_program.module()(torch.from_numpy(x[i:i + 2].copy())).numpy()
                               for i in range(0, 4, 2)])
    np.testing.assert_allclose(got[:4], want, rtol=1e-4, atol=1e-5)
    assert free_batch_axis(m) is None  # already free: nothing to do


def test_a_program_whose_samples_depend_on_each_other_is_refused():
    from qwt_deploy.frontend.onnx_source import fp32_onnx_from_module, free_batch_axis

    class BatchCentred(torch.nn.Module):  # y - y.mean(0): each output depends on the whole batch
        def forward(self, x):
            y = x.flatten(1)
            return y - y.mean(0)

    m = fp32_onnx_from_module(torch.export.export(BatchCentred(), (torch.zeros(2, 3, 4),)))
    with pytest.raises(QwtError, match="fixed batch of 2"):
        free_batch_axis(m)


def test_nodes_are_named_after_their_modules():
    """Module paths, not the exporter's node_Conv_12: a module's layer op takes the bare path
    (the BatchNorm its own), an op in a module's own forward ``<module>/<op type>``."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return x + torch.relu(self.bn(self.conv(x)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(Block(), Block())

        def forward(self, x):
            return self.blocks(x).mean((2, 3))

    m = fp32_onnx_from_module(Net().eval(), torch.zeros(2, 4, 8, 8), ({0: Dim.DYNAMIC},))
    names = [n.name for n in m.graph.node]
    assert names[:4] == ["blocks.0.conv", "blocks.0.bn", "blocks.0/Relu", "blocks.0/Add"], names
    assert "blocks.1.conv" in names and len(set(names)) == len(names)
