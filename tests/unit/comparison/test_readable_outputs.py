"""Issue 13 section 4: what a first day reads. qwt-check --lint grouped by rule with every
finding available (text and JSON, node names whole); the sqnr.png answers "where is the damage,
and do the backends agree"; --help says what the flags mean; the trtexec command file travels."""

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwt_deploy.cli.check import build_parser as check_parser
from qwt_deploy.cli.check import main as check_main
from qwt_deploy.cli.export import build_parser as export_parser
from qwt_deploy.comparison.plot import model_label, sqnr_figure, sqnr_plot_png
from qwt_deploy.graph_passes.check_trt_rules import check_trt_rules, format_findings, group_findings
from qwt_deploy.runtime.tensorrt import shape_profile

LONG = "encoder.layer.{i}.attention.output.dense_with_a_long_module_path"  # > 40 characters: never cut


def _asymmetric_chain(n: int) -> onnx.ModelProto:
    """n times x -> Q(uint8, zp 128) -> DQ -> Relu: per link 2 zero-point + 2 quantized-type
    errors and one q-feeds-float warning (the DQ only reaches a Relu)."""
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        base = LONG.format(i=i)
        inits += [numpy_helper.from_array(np.array(0.1, np.float32), f"s{i}"),
                  numpy_helper.from_array(np.array(128, np.uint8), f"z{i}")]
        nodes += [helper.make_node("QuantizeLinear", [prev, f"s{i}", f"z{i}"], [f"q{i}"], name=f"{base}/QuantizeLinear"),
                  helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"d{i}"],
                                   name=f"{base}/DequantizeLinear"),
                  helper.make_node("Relu", [f"d{i}"], [f"r{i}"], name=f"{base}/Relu")]
        prev = f"r{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["batch", 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    path = tmp_path_factory.mktemp("lint") / "chain.onnx"
    onnx.save(_asymmetric_chain(12), str(path))
    return path


def test_lint_groups_by_rule_with_counts_and_keeps_node_names_whole(chain, capsys):
    findings = check_trt_rules(onnx.load(str(chain)))
    assert len(findings) == 12 * 5
    assert check_main(["--lint", "trt", str(chain)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("TensorRT rule check: 48 error(s), 12 warning(s) in 3 rule(s)")
    rows = {line.split()[1]: int(line.split()[2]) for line in out.splitlines() if line.startswith(("error ", "warning "))}
    assert rows == {"zero-point": 24, "quantized-type": 24, "q-feeds-float": 12}
    assert f"    {LONG.format(i=0)}/QuantizeLinear: " in out  # whole, not "...ng_module_path/QuantizeLinear"
    assert "... 21 more zero-point finding(s)" in out and "--all-findings" in out
    assert len(out.splitlines()) < 30  # 60 findings, a screen of text


def test_lint_all_findings_and_json_list_every_one(chain, capsys):
    assert check_main(["--lint", "trt", str(chain), "--all-findings"]) == 1
    out = capsys.readouterr().out
    for i in range(12):
        assert f"    {LONG.format(i=i)}/DequantizeLinear: zero point [128] is not 0" in out
    assert "more zero-point" not in out
    assert check_main(["--lint", "trt", str(chain), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["errors"], report["warnings"]) == (48, 12)
    assert sum(r["count"] for r in report["rules"]) == 60
    assert [(r["rule"], r["count"]) for r in report["rules"]] == [("zero-point", 24), ("quantized-type", 24),
                                                                   ("q-feeds-float", 12)]
    assert all(len(r["findings"]) == r["count"] for r in report["rules"])


def test_one_rule_with_two_causes_is_two_groups_each_with_its_fix():
    m = _asymmetric_chain(2)
    bias = numpy_helper.from_array(np.zeros(8, np.int32), "bias_q")
    m.graph.initializer.extend([bias, numpy_helper.from_array(np.array(0.1, np.float32), "bias_s")])
    m.graph.node.append(helper.make_node("DequantizeLinear", ["bias_q", "bias_s"], ["bias"], name="fc.bias/DQ"))
    groups = [(g.rule, g.count) for g in group_findings(check_trt_rules(m))]
    assert ("quantized-type", 4) in groups and ("quantized-type", 1) in groups
    text = format_findings(check_trt_rules(m))
    assert "keep the bias as a float initializer" in text and "instead of uint8" in text


# ---------------------------------------------------------------------------------- sqnr.png
def _report(n=40, diverge_at=25):
    """A check report of two targets whose backends track their fake-quant, except that
    ort-cpu[trt] leaves it from layer ``diverge_at`` on."""
    layers = []
    for i in range(n):
        fq = 30.0 - 10.0 * math.sin(i / 5.0)
        off = 0.2 if i >= diverge_at else 0.0
        layers.append(dict(value=f"v{i}", node=f"_blocks.{i}.a_rather_long_module_name._project_conv", op="conv",
                           sqnr_db={"pytorch-fake-quant[ort]": fq, "ort-cpu[ort]": fq,
                                    "pytorch-fake-quant[trt]": fq - 1, "ort-cpu[trt]": fq - 1 - 20 * off},
                           vs_fake_quant={"ort-cpu[ort] vs pytorch-fake-quant[ort]": dict(within_atol=1.0),
                                          "ort-cpu[trt] vs pytorch-fake-quant[trt]": dict(within_atol=1.0 - off)}))
    paths = [dict(name="pytorch-fp32", kind="fp32", target=None, ran=True, layerwise=True)]
    for t in ("ort", "trt"):
        paths += [dict(name=f"pytorch-fake-quant[{t}]", kind="fake-quant", target=t, ran=True, layerwise=True),
                  dict(name=f"ort-cpu[{t}]", kind="backend", target=t, ran=True, layerwise=True)]
    d = layers[diverge_at]
    return dict(model="factory qwt_deploy.examples.efficientnet_lite0:build", paths=paths, layers=layers,
                settings=dict(bits="W8A8", method="qwt2", num_inputs=64, inputs="bundled held-out photos",
                              min_agreement=0.999, atol_steps=1.0),
                first_divergence={"ort-cpu[ort] vs pytorch-fake-quant[ort]": None,
                                  "ort-cpu[trt] vs pytorch-fake-quant[trt]": dict(
                                      value=d["value"], node=d["node"], op="conv", within_atol=0.8)})


def test_sqnr_plot_shows_where_the_damage_is_and_whether_backends_agree():
    import matplotlib.pyplot as plt

    r = _report()
    fig = sqnr_figure(r)
    try:
        ax, ag = fig.axes
        title = fig._suptitle.get_text()
        assert title.startswith("efficientnet_lite0: W8A8 qwt2, 64 held-out inputs") and "factory" not in title
        assert "ort-cpu[trt] diverges at _blocks.25." in title and "ort-cpu[ort] agrees at every layer" in title
        # every layer labelled, in full
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == [f"{l['node']}  (conv)" for l in r["layers"]]
        # a backend on its fake-quant stays distinguishable: pale wide band vs thin line
        width = {h.get_label().split(" ")[0]: h.get_linewidth() for h in ax.get_legend().legend_handles}
        assert width["pytorch-fake-quant[ort]"] >= 5 * width["ort-cpu[ort]"]
        # the gate (1 - min_agreement on the log "share off" axis) and the first divergence (row 25)
        assert any(list(l.get_xdata()) == [pytest.approx(1e-3)] * 2 for l in ag.get_lines())
        for a in (ax, ag):
            assert any(list(l.get_ydata()) == [25, 25] and l.get_color() == "red" for l in a.get_lines())
        assert any("first divergence of ort-cpu[trt]: _blocks.25." in t.get_text() for t in ax.texts)
    finally:
        plt.close(fig)
    assert sqnr_plot_png(r)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("description,label", [
    ("factory qwt_deploy.examples.efficientnet_lite0:build", "efficientnet_lite0"),
    ("factory mymodels.nets:resnet_tiny", "nets:resnet_tiny"),
    ("torch.export program /tmp/x/cnn.pt2", "cnn.pt2"),
    ("FP32 ONNX (in memory)", "FP32 ONNX (in memory)"),
])
def test_plot_title_names_the_model_not_an_internal_path(description, label):
    assert model_label(description) == label


# ---------------------------------------------------------------------------------- --help
def test_help_says_what_the_flags_mean():
    p = export_parser()
    helps = {a.dest: a.help for a in p._actions}
    assert helps["batch_size"] and helps["seed"]
    text = p.format_help()
    assert "{none,bias-correction,qwt,qwt2,qwt,qwt2" not in text and "--method METHOD" in text
    assert "none | bias-correction | qwt | qwt2 | qwt,qwt2 | qwt,bias-correction" in " ".join(text.split())
    assert "batch axis is dynamic" in " ".join(text.split())


def test_target_and_targets_are_one_flag_in_both_commands(capsys):
    assert export_parser().parse_args(["--targets", "trt"]).target == "trt"
    assert check_parser().parse_args(["--target", "trt"]).targets == "trt"
    with pytest.raises(SystemExit) as e:
        export_parser().parse_args(["--targets", "ort,trt"])
    assert e.value.code == 2 and "run it once per target" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- trtexec
def test_shape_flags_cover_every_dynamic_axis_and_a_static_model_needs_none():
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", "seq"])
    m = helper.make_model(helper.make_graph([helper.make_node("Add", ["input_ids", "attention_mask"], ["y"])], "g",
                                            [ids, mask], [out]))
    assert shape_profile(m).flags() == ("--minShapes=input_ids:1x1,attention_mask:1x1 "
                                        "--optShapes=input_ids:8x128,attention_mask:8x128 "
                                        "--maxShapes=input_ids:32x512,attention_mask:32x512")
    static = _asymmetric_chain(1)
    for d in (static.graph.input[0].type.tensor_type.shape.dim[0],):
        d.dim_value = 4
    assert shape_profile(static) is None
