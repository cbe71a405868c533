"""``keep_float`` / ``--keep-float``: op kinds, node names and ``re:`` patterns select the nodes
kept float, weighted ones included; a name or pattern that selects nothing is an error.
Hand-built IR graphs: the planners read only names, ops and edges."""

from __future__ import annotations

import onnx
import pytest

from qwt_deploy.errors import QwtError
from qwt_deploy.graph.ir import Graph, Node
from qwt_deploy.graph.ops import Role
from qwt_deploy.quantization.placement import (DEFAULT_KEEP_FLOAT, KeepFloat, effective_role, int8_tables,
                                               plan_for_ort, plan_for_trt, resolve_keep_float)
from qwt_deploy.targets import ORT, TRT

PLANNERS = pytest.mark.parametrize("planner", [plan_for_ort, plan_for_trt], ids=["ort", "trt"])
TARGETS = pytest.mark.parametrize("target", [ORT, TRT], ids=["ort", "trt"])


def _cnn() -> Graph:
    """x -> stem -> s; blocks.0.conv(s) -> a; add(s, a) -> r; head(r) -> h; silu -> y; gap, flatten, fc."""
    nodes = [
        Node("stem", "conv", ["x"], "s"),
        Node("blocks.0.conv", "conv", ["s"], "a"),
        Node("add", "add", ["s", "a"], "r"),
        Node("head", "conv", ["r"], "h"),
        Node("act", "silu", ["h"], "y"),
        Node("gap", "gap", ["y"], "g"),
        Node("flatten", "flatten", ["g"], "f"),
        Node("fc", "linear", ["f"], "out"),
    ]
    return Graph(inputs=["x"], input_shapes={"x": (1, 3, 8, 8)}, nodes=nodes, outputs=["out"])


def test_resolve_kinds_names_and_patterns():
    g = _cnn()
    sel = resolve_keep_float(g, ("silu", "head", r"re:^blocks\.", "re:c$"), strict=True)
    assert sel.kinds == {"silu"}
    # "re:c$" is searched, not full-matched: it selects "fc" (and nothing named exactly "c")
    assert sel.nodes == {"head", "blocks.0.conv", "fc"}
    assert [n.name for n in g.nodes if sel.keeps(n)] == ["blocks.0.conv", "head", "act", "fc"]
    assert sel.entries == ("silu", "head", r"re:^blocks\.", "re:c$")


def test_an_op_kind_wins_over_a_node_of_that_name():
    """fx names the first Add "add": the entry "add" means the kind, re:^add$ the node."""
    g = _cnn()
    assert resolve_keep_float(g, ("add",)).kinds == {"add"}
    assert resolve_keep_float(g, ("re:^add$",)) == KeepFloat(nodes=frozenset({"add"}), entries=("re:^add$",))


def test_onnx_op_types_select_the_float_nodes_an_onnx_source_keeps():
    g = _cnn()
    proto = onnx.helper.make_node("LayerNormalization", ["y"], ["z"], name="ln")
    g.nodes.insert(5, Node("ln", "onnx", ["y"], "z", attrs={"proto": proto}))
    assert resolve_keep_float(g, ("LayerNormalization",), strict=True).nodes == {"ln"}


@PLANNERS
def test_a_weighted_kind_kept_float_gets_no_int8_weight(planner):
    g = _cnn()
    assert planner(g).weighted == ["stem", "blocks.0.conv", "head", "fc"]
    assert planner(g, keep_float=DEFAULT_KEEP_FLOAT + ("conv",)).weighted == ["fc"]
    assert planner(g, keep_float=("linear",)).weighted == ["stem", "blocks.0.conv", "head"]


@PLANNERS
def test_a_node_kept_float_by_name_or_pattern(planner):
    g = _cnn()
    for entries in (("head",), ("re:^he",), resolve_keep_float(g, ("head",))):
        plan = planner(g, keep_float=entries)
        assert plan.weighted == ["stem", "blocks.0.conv", "fc"]
        assert effective_role(g.node("head"), resolve_keep_float(g, entries)) is Role.FLOAT
        assert effective_role(g.node("stem"), resolve_keep_float(g, entries)) is Role.WEIGHTED


def test_ort_a_float_conv_output_is_quantized_only_for_integer_readers():
    g = _cnn()
    assert plan_for_ort(g).is_quantized("h")  # an INT8 conv's output: the Q of QLinearConv
    plan = plan_for_ort(g, keep_float=("head",))
    assert not plan.is_quantized("h")  # read by a float SiLU only
    assert plan.is_quantized("r")  # the Add's own output (an integer op)
    plan = plan_for_ort(g, keep_float=("stem",))
    # s is read by an INT8 conv and the integer Add: quantized for them, the float producer aside
    assert plan.is_quantized("s") and not plan.has_float_readers("s")


def test_trt_a_float_conv_needs_no_input_quantizer_and_fuses_no_add():
    g = _cnn()
    base = plan_for_trt(g)
    assert base.is_quantized("r") and not base.is_quantized("a")  # the Add is fused into blocks.0.conv
    assert not plan_for_trt(g, keep_float=("head",)).is_quantized("r")  # its only reader stays float
    plan = plan_for_trt(g, keep_float=("blocks.0.conv",))
    assert not plan.sees_quantized("s", "blocks.0.conv")
    # no INT8 conv to fuse the Add into: a standalone Add, Q/DQ on both inputs and its output
    assert plan.sees_quantized("a", "add") and plan.sees_quantized("s", "add") and plan.is_quantized("r")


def test_ort_kind_selection_of_an_integer_op():
    g = _cnn()
    assert plan_for_ort(g).is_quantized("y")  # read by the integer GAP
    plan = plan_for_ort(g, keep_float=("gap",))
    assert not plan.is_quantized("y") and not plan.is_quantized("g")


def test_embedding_tables_kept_float_by_kind_or_name():
    nodes = [Node("tok", "embedding", ["ids"], "e"), Node("pos", "embedding", ["ids"], "p"),
             Node("sum", "add_float", ["e", "p"], "out")]
    g = Graph(inputs=["ids"], input_shapes={"ids": (1, 4)}, nodes=nodes, outputs=["out"])
    assert int8_tables(g, DEFAULT_KEEP_FLOAT) == ["tok", "pos"]
    assert int8_tables(g, ("embedding",)) == []
    assert int8_tables(g, ("pos",)) == ["tok"]


@TARGETS
@pytest.mark.parametrize("entry", ["nosuchlayer", "re:^encoder\\.", "Stem", "layernorm", "LayerNormalization"])
def test_an_entry_that_matches_nothing_is_an_error(target, entry):
    with pytest.raises(QwtError) as e:
        target.plan(_cnn(), keep_float=("conv", entry))
    msg = str(e.value)
    assert repr(entry) in msg and "\n" not in msg and "Fix:" in msg
    assert "stem" in msg  # names a few of the model's nodes (or the close match)


def test_the_error_suggests_a_close_name_or_kind():
    with pytest.raises(QwtError, match="did you mean 'blocks.0.conv'"):
        resolve_keep_float(_cnn(), ("blocks.0.cnv",), strict=True)
    with pytest.raises(QwtError, match="did you mean 'layer_norm'"):
        resolve_keep_float(_cnn(), ("layernorm",), strict=True)
    assert resolve_keep_float(_cnn(), ("nosuchlayer",)).nodes == frozenset()  # not strict: the planners


def test_a_bad_pattern_is_an_error():
    with pytest.raises(QwtError, match=r"'re:\[' is not a valid regular expression"):
        resolve_keep_float(_cnn(), ("re:[",))


@TARGETS
def test_an_op_kind_the_graph_lacks_is_no_error(target):
    """One list serves a CNN and a transformer: the defaults, or the minilm list, on this CNN."""
    g = _cnn()
    for keep in (DEFAULT_KEEP_FLOAT, ("layer_norm", "softmax", "gelu", "add", "embedding")):
        assert target.plan(g, keep_float=keep).weighted == ["stem", "blocks.0.conv", "head", "fc"]
    assert target.plan(g, keep_float=("layer_norm", "head")).weighted == ["stem", "blocks.0.conv", "fc"]


def test_cli_keep_float_that_matches_nothing_exits_2(capsys, tmp_path):
    from qwt_deploy.cli.export import main

    out = str(tmp_path / "x.onnx")
    code = main(["--example", "fashion-cnn", "--keep-float", "nosuchlayer", "--quiet", "--no-latency", "-o", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("qwt-export: error: keep-float entry 'nosuchlayer' is no op kind") and "Fix:" in err[0]


def test_cli_passes_entries_through_and_checks_patterns_early():
    from qwt_deploy.cli.export import _keep_float

    assert _keep_float(" softmax, _blocks.15._project_conv ,re:^_blocks\\.1[45]\\.,") == (
        "softmax", "_blocks.15._project_conv", "re:^_blocks\\.1[45]\\.")
    with pytest.raises(QwtError, match="regular expression"):
        _keep_float("re:(")


@pytest.mark.parametrize("kept", ["expand", "fc"])
def test_ort_runs_a_kept_float_layer_in_float(kept, small_program, mech_data, tmp_path):
    """A Conv/Gemm kept float on the ort layout reads a DequantizeLinear output, and ONNX Runtime's
    WeightBiasQuantization would quantize a float initializer weight behind our back (the file then
    computes something else than was measured). The exporter writes its weight and bias as
    DequantizeLinear of INT32 codes, which ORT leaves alone: ORT's optimized graph keeps a float
    Conv/Gemm there, and ORT matches the simulation within one output step."""
    import numpy as np
    import onnxruntime as ort

    from conftest import op_counts, quantized
    from qwt_deploy import api

    qm = quantized(small_program, mech_data, keep_float=(kept,))
    path = str(tmp_path / "m.int8.onnx")
    ex = api.export(qm, path)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    counts = op_counts(onnx.load(str(tmp_path / "opt.onnx")))
    float_op = {"expand": ("Conv", "FusedConv"), "fc": ("Gemm",)}[kept]
    assert sum(counts.get(op, 0) for op in float_op) == 1, counts  # the kept layer, in float
    v = api.verify(ex, mech_data[:16], measure_latency=False)
    assert v.agreement.within_1_step >= 0.999, v.agreement
