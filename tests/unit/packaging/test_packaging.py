"""One import root: every package on disk is installed, under qwt_deploy, and nothing else is.

pyproject.toml lists the packages by hand (setuptools' find cannot map the top-level folders
calibration/ and graph_passes/ under qwt_deploy), so a new subpackage that is not listed would
be missing from a wheel (the edge Docker image installs one) while tests in the checkout pass."""

import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[3]


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, mapped = set(cfg["packages"]), cfg["package-dir"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "qwt_deploy").rglob("__init__.py")}
    on_disk |= {pkg for pkg, folder in mapped.items() if (ROOT / folder / "__init__.py").is_file()}
    assert on_disk == listed, f"missing from pyproject: {sorted(on_disk - listed)}; listed but absent: {sorted(listed - on_disk)}"
    assert mapped == {"qwt_deploy.calibration": "calibration", "qwt_deploy.graph_passes": "graph_passes"}


def test_only_qwt_deploy_is_importable_from_outside_the_checkout(tmp_path):
    """From another folder, `import calibration` / `import graph_passes` find nothing: a user's
    own calibration.py can neither shadow ours nor be shadowed."""
    code = ("import importlib.util as u, qwt_deploy.calibration.cwac, qwt_deploy.graph_passes; "
            "print(u.find_spec('calibration'), u.find_spec('graph_passes'), "
            "qwt_deploy.calibration.__file__.endswith('calibration/__init__.py'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.split() == ["None", "None", "True"], r.stdout
