"""The seeded fuzz corpus of scripts/fuzz_serve.py (2,400 requests) against a real qwt-serve
process on 127.0.0.1 (issue 12): no 5xx, every answer JSON with a status line, the server still
answers a valid request correctly afterwards, nothing on its stderr, and its RSS grows by less
than RSS_GROWTH_KB (measured: 69 -> 93 MB, peak 110 MB, on the 2-core test machine)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tiny_model import write_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RSS_GROWTH_KB = 64 * 1024  # after the corpus, over the RSS before it
RSS_PEAK_GROWTH_KB = 256 * 1024  # peak (VmHWM) during the corpus, over the RSS before it


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_serve", os.path.join(REPO, "scripts", "fuzz_serve.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_fuzz_corpus_against_qwt_serve(tmp_path, capsys):
    model = write_tiny_model(str(tmp_path / "tiny.onnx"))
    proc = subprocess.Popen([sys.executable, "-m", "qwt_deploy.cli.serve", model, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        code = _fuzz_module().main(["--port", m.group(1), "--pid", str(proc.pid), "--count", "2400", "--seed", "12"])
        report = json.loads(capsys.readouterr().out)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert report["count"] >= 2000 and report["5xx"] == 0 and report["bad_count"] == 0, report["bad"][:10]
    assert code == 0 and report["answers_after"]
    assert report["rss_kb_after"] - report["rss_kb_before"] < RSS_GROWTH_KB, report
    assert report["rss_kb_peak"] - report["rss_kb_before"] < RSS_PEAK_GROWTH_KB, report
    # no libtiff, numpy or traceback lines from client input: only the server's own shutdown lines
    assert [line for line in err.splitlines() if not line.startswith("qwt-serve: ")] == [], err[-2000:]
