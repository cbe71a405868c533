"""The Target objects: what each backend decides (placement layout, observer, branch precision),
asked in one place; and no module outside qwt_deploy/targets/ compares a target's name."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

from qwt_deploy.errors import QwtError
from conftest import capture
from qwt_deploy.quantization.placement import Kernels, plan_for_ort, plan_for_trt
from qwt_deploy.targets import ORT, TARGETS, TRT, Target, get_target

ROOT = pathlib.Path(__file__).resolve().parents[3]
SCANNED = ("qwt_deploy", "calibration", "graph_passes")  # every source folder of the package
ALLOWED = ROOT / "qwt_deploy" / "targets"


@pytest.fixture(scope="module")
def graph(small_program):
    return capture(small_program)


@pytest.mark.parametrize("target,kernels,signed,int32_bias,planner", [
    (ORT, Kernels.REQUANTIZING, False, True, plan_for_ort),
    (TRT, Kernels.ACCUMULATING, True, False, plan_for_trt),
])
def test_plan_takes_the_layout_fields_from_the_target(graph, target, kernels, signed, int32_bias, planner):
    assert (target.kernels, target.signed_activations, target.int32_bias) == (kernels, signed, int32_bias)
    plan = target.plan(graph)
    assert plan.kernels is target.kernels
    assert plan.signed_activations is target.signed_activations
    assert plan.int32_bias is target.int32_bias
    # the placement itself is the target's planner's, with keep_float passed through
    assert target.planner is planner
    want = planner(graph)
    assert dataclasses.replace(plan, kernels=want.kernels, signed_activations=want.signed_activations,
                               int32_bias=want.int32_bias) == want
    seen = []

    def spy(g, keep_float):
        seen.append(keep_float)
        return planner(g, keep_float=keep_float)

    dataclasses.replace(target, planner=spy).plan(graph, keep_float=["layer_norm", "add"])
    assert seen == [("layer_norm", "add")]


def test_the_two_targets_really_differ(graph):
    """The fields above are not all defaults: the ort and trt plans of one graph disagree on each."""
    a, b = ORT.plan(graph), TRT.plan(graph)
    assert a.kernels != b.kernels and a.signed_activations != b.signed_activations and a.int32_bias != b.int32_bias


@pytest.mark.parametrize("target,auto", [(ORT, "minmax"), (TRT, "mse")])
def test_observer_resolves_auto_for_the_target(target, auto):
    assert target.observer("auto") == auto
    for explicit in ("minmax", "percentile", "mse"):
        assert target.observer(explicit) == explicit  # an explicit choice is kept


def test_branch_precision_per_target():
    assert ORT.branch_precision == "fp32" and TRT.branch_precision == "fp16"


def test_get_target():
    assert get_target("ort") is ORT and get_target("trt") is TRT and get_target(TRT) is TRT
    assert set(TARGETS) == {"ort", "trt"} and all(isinstance(t, Target) for t in TARGETS.values())
    with pytest.raises(QwtError, match="target 'bogus' is not available") as e:
        get_target("bogus")
    assert "\n" not in str(e.value) and "Fix: use one of ort, trt" in str(e.value)


def test_quantize_config_resolves_its_target():
    from qwt_deploy.config import QuantizeConfig

    assert QuantizeConfig(target="trt").target is TRT and QuantizeConfig().target is ORT
    with pytest.raises(QwtError, match="bogus"):
        QuantizeConfig(target="bogus")


# ------------------------------------------------- nobody outside targets/ compares target names
TARGET_NAMES = {"ort", "trt"}


def _is_target_name(node: ast.AST) -> bool:
    """A literal "ort"/"trt", or a tuple/list/set holding one (``x in ("ort", "trt")``)."""
    if isinstance(node, ast.Constant):
        return node.value in TARGET_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_target_name(e) for e in node.elts)
    return False


def _is_target_variable(node: ast.AST) -> bool:
    """``target``, ``cfg.target``, ``target.name``, ``cfg.target.name``."""
    if isinstance(node, ast.Attribute) and node.attr == "name":
        node = node.value
    return (isinstance(node, ast.Name) and node.id == "target") or (
        isinstance(node, ast.Attribute) and node.attr == "target")


def target_name_comparisons(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: code`` for every ==, !=, in, not in with a target name literal on either side,
    and every ``target ==`` / ``target !=``. Docstrings and comments are not code: not matched."""
    found = []
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        names = any(_is_target_name(o) for o in operands) and any(
            isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops)
        # ``target == x`` (a lookup such as ``f.name == p.target``, matching two names, is not
        # a branch on the backend: only a target on the left of == / != is)
        variable = _is_target_variable(node.left) and isinstance(node.ops[0], (ast.Eq, ast.NotEq))
        if names or variable:
            found.append(f"{filename}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


def test_the_scan_catches_target_name_comparisons():
    """The scan can fail: each way of branching on a target's name below is reported."""
    bad = '''
def f(target, cfg, t):
    if target == "trt":
        pass
    if cfg.target != 'ort':
        pass
    if "trt" == t.name:
        pass
    if t.name in ("ort", "trt"):
        pass
    if target.name != other:
        pass
    return cfg.target == backend
'''
    found = target_name_comparisons(bad)
    assert [int(f.split(":")[1]) for f in found] == [3, 5, 7, 9, 11, 13], found
    clean = '''
"""Docs may say target == "trt" and compare != "ort"."""
# a comment: if target == "trt"
def g(target, names):
    label = {"ort": 1, "trt": 2}  # a mapping is not a comparison
    return target.observer("auto"), "ort" + "x", names == ["a"], [f for f in names if f.name == target.name]
'''
    assert target_name_comparisons(clean) == []


def test_no_module_outside_targets_compares_a_target_name():
    found = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if ALLOWED in path.parents:
                continue
            found += target_name_comparisons(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "ask the Target instead of comparing its name:\n" + "\n".join(found)
