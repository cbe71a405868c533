"""The README's Python API example, run as written (a user copies it verbatim)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "..", "..", "README.md")
FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def readme_api_example() -> str:
    text = open(README).read()
    section = text[text.index("## Python API"):text.index("## How it is built")]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(not os.path.exists(FASHION), reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_api_example(), "README.md:Python API", "exec"), {})
    out = capsys.readouterr().out
    within = float(re.search(r"within 1 step of the simulation: ([0-9.]+)", out).group(1))
    ints, total = map(int, re.search(r"(\d+)/(\d+) ops integer", out).groups())
    fp32, int8 = map(float, re.search(r"FP32 ([0-9.]+), INT8 ([0-9.]+)", out).groups())
    assert within >= 0.999 and ints == total > 0
    assert fp32 > 0.85 and abs(fp32 - int8) < 0.01  # the shipped CNN: 91.35% FP32 on all 10k
    assert (tmp_path / "fashion-cnn.int8.onnx").stat().st_size > 100_000
