"""The packages import only downward: the pipeline's layers, bottom to top, as the README's
"How it is built" table lists them. A small AST scan over the source folders (grimp and
import-linter build their graph from one directory tree, and two of our packages live in
mapped top-level folders, calibration/ and graph_passes/), so an upward import anywhere,
lazy ones inside functions included, fails here with the file, line and both layers named."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# folder on disk -> the package it installs as (pyproject.toml [tool.setuptools.package-dir])
SOURCES = {"qwt_deploy": "qwt_deploy", "calibration": "qwt_deploy.calibration",
           "graph_passes": "qwt_deploy.graph_passes"}

# bottom to top; a module may import its own layer and any layer below it
LAYERS = [
    ("base", ["qwt_deploy._version", "qwt_deploy.errors", "qwt_deploy.log", "qwt_deploy.atomic"]),
    ("data", ["qwt_deploy.data"]),
    ("ir", ["qwt_deploy.graph"]),
    ("frontend", ["qwt_deploy.frontend"]),
    ("quantization", ["qwt_deploy.quantization"]),
    ("compensate", ["qwt_deploy.calibration"]),
    ("exporter", ["qwt_deploy.exporter"]),
    ("passes", ["qwt_deploy.graph_passes"]),
    ("runtime", ["qwt_deploy.runtime", "qwt_deploy.edge"]),
    ("targets", ["qwt_deploy.targets"]),
    ("config", ["qwt_deploy.config"]),
    ("comparison", ["qwt_deploy.comparison", "qwt_deploy.report"]),
    ("examples", ["qwt_deploy.examples"]),
    ("api", ["qwt_deploy.api", "qwt_deploy.pipeline", "qwt_deploy"]),
    ("cli", ["qwt_deploy.cli"]),
]


def layer_of(module: str) -> int:
    best, level = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, level = p, i
    assert level is not None, f"{module} is in no layer: add it to LAYERS"
    return level


def modules():
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([package, *parts]), path, path.name == "__init__.py"


def imports(module: str, path: pathlib.Path, is_package: bool):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not node.module and node.level:  # from . import x: x may be a submodule
                for a in node.names:
                    yield f"{target}.{a.name}", node.lineno
            else:
                yield target, node.lineno


def upward_imports():
    bad = []
    for module, path, is_package in modules():
        mine = layer_of(module)
        for target, line in imports(module, path, is_package):
            if not (target == "qwt_deploy" or target.startswith("qwt_deploy.")):
                continue
            theirs = layer_of(target)
            if theirs > mine:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module} ({LAYERS[mine][0]}) imports "
                           f"{target} ({LAYERS[theirs][0]})")
    return bad


def test_no_upward_imports():
    bad = upward_imports()
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_layering_scan_catches_an_upward_import(tmp_path, monkeypatch):
    """The scan itself can fail: a quantization module importing the CLI is reported."""
    pkg = tmp_path / "qwt_deploy" / "quantization"
    pkg.mkdir(parents=True)
    (tmp_path / "qwt_deploy" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("def f():\n    from ..cli import export\n")
    import sys

    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "SOURCES", {"qwt_deploy": "qwt_deploy"})
    assert any("qwt_deploy.quantization.bad (quantization) imports qwt_deploy.cli (cli)" in b
               for b in upward_imports())


@pytest.mark.parametrize("module", ["qwt_deploy.edge.server", "qwt_deploy.edge.preprocess",
                                    "qwt_deploy.data.preprocess", "qwt_deploy.cli.run", "qwt_deploy.cli.serve"])
def test_edge_side_does_not_import_torch(module):
    """The edge image installs no torch: these modules must import without it."""
    import subprocess
    import sys

    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch'); print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{module} imports torch: {r.stdout.strip()} {r.stderr.strip()[-500:]}"
