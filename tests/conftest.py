"""Shared fixtures and helpers, for every folder under tests/ (``from conftest import ...``).

The small CNN and the tiny encoder have random weights: they test mechanics only, never
accuracy. :func:`quantized` is the one way a test quantizes a model: through the public API
(:func:`qwt_deploy.api.quantize`), as qwt-export does. The torch-free edge CLIs are run with
torch unimportable by :func:`blocked_python` (unit/edge and the e2e serve test share it).
"""

import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping

import numpy as np
import pytest
import torch
import torch.nn as nn

torch.set_num_threads(2)


# ------------------------------------------------ one FP32 ONNX export per distinct PyTorch program
# Every PyTorch model reaches the pipeline through torch.onnx.export (dynamo), 1-3 s even for the
# small CNN, and most tests quantize the same few programs again and again. The session cache
# below keys each export on the bytes of the torch.export program it is made from (plus the
# names, dynamic axes and opset), so a program that is exported again gets the same ONNX graph
# it got the first time, without the exporter. Only successful exports are cached (a test of
# an exporter error still sees the error), each caller gets its own copy, and tests that call
# onnx_source.fp32_onnx_from_module by name (tests/unit/frontend) bypass it. QWT_TEST_NO_ONNX_CACHE=1
# turns it off, e.g. to time or debug the exporter itself.
_ONNX_CACHE: dict = {}
ONNX_CACHE_STATS = {"hits": 0, "misses": 0}


def _program_key(onnx_source, module_or_program, example_inputs, dynamic_shapes, rest) -> "str | None":
    import hashlib
    import io

    try:
        program, spec_names = onnx_source._export_program(module_or_program, example_inputs, dynamic_shapes)
        buf = io.BytesIO()
        torch.export.save(program, buf)
    except Exception:  # not exportable or not serializable: no key, the real export decides
        return None
    return hashlib.sha256(buf.getvalue() + repr((sorted(spec_names.items()) if isinstance(spec_names, dict)
                                                 else spec_names, rest)).encode()).hexdigest()


@pytest.fixture(scope="session", autouse=True)
def cached_fp32_onnx_export():
    import onnx

    from qwt_deploy.frontend import onnx_source

    if os.environ.get("QWT_TEST_NO_ONNX_CACHE"):
        yield
        return
    original = onnx_source.fp32_onnx_from_module

    def cached(module_or_program, example_inputs=None, dynamic_shapes=None, input_names=None, output_names=None,
               *, opset=onnx_source.OPSET):
        args = (module_or_program, example_inputs, dynamic_shapes, input_names, output_names)
        key = _program_key(onnx_source, module_or_program, example_inputs, dynamic_shapes,
                           (input_names, output_names, opset))
        if key is None:
            return original(*args, opset=opset)
        if key not in _ONNX_CACHE:
            ONNX_CACHE_STATS["misses"] += 1
            _ONNX_CACHE[key] = original(*args, opset=opset).SerializeToString()
        else:
            ONNX_CACHE_STATS["hits"] += 1
        model = onnx.ModelProto()
        model.ParseFromString(_ONNX_CACHE[key])
        return model

    onnx_source.fp32_onnx_from_module = cached
    yield
    onnx_source.fp32_onnx_from_module = original


class SmallCNN(nn.Module):
    """Conv-BN-ReLU6 stem with "same" padding, a depthwise block with a residual add, GAP, Linear."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = nn.Conv2d(3, 16, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.project = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.clamp(self.bn(self.stem(self.pad(x))), 0, 6)
        y = torch.relu(self.expand(x))
        y = nn.functional.relu6(self.dw(y))
        x = x + self.project(y)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def make_small_cnn(seed=0):
    torch.manual_seed(seed)
    m = SmallCNN()
    with torch.no_grad():  # non-trivial BN statistics so folding is exercised
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture(scope="session")
def small_cnn():
    return make_small_cnn()


def export_program(model, example):
    """``torch.export`` of a module in eval mode, as a user saves a ``.pt2`` (a fixed batch); a
    token model traces itself with its ``example_inputs()`` (dynamic batch and sequence)."""
    dynamic = None
    if callable(getattr(model, "example_inputs", None)):
        example, dynamic = model.example_inputs()
    args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    with torch.no_grad():
        return torch.export.export(model.eval(), args, dynamic_shapes=dynamic)


def capture(model, example_shape=(3, 224, 224)):
    """The IR the pipeline quantizes for a module or program: through its FP32 ONNX graph
    (qwt_deploy.api.capture_graph, the one front end)."""
    from qwt_deploy import api

    return api.capture_graph(api.load(model), example_shape)


@pytest.fixture(scope="session")
def small_program(small_cnn):
    return export_program(small_cnn, torch.zeros(2, 3, 32, 32))


@pytest.fixture(scope="session")
def mech_data():
    """Random inputs: for mechanics tests only."""
    return np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)


def op_counts(model):
    import collections

    return collections.Counter(n.op_type for n in model.graph.node)


# ------------------------------------------------------------------------ the public API, once
def quantized(model, data, target="ort", method="qwt2", batch_size=16, keep_float=None, **settings):
    """``api.quantize`` of ``model`` (an nn.Module, an ExportedProgram or a file path) on all of
    ``data`` (an array, a dict of arrays, an InputSet or batches), in batches of ``batch_size``;
    ``settings`` are CalibrationSettings fields (w_bits, a_bits, calib_method, ...)."""
    from qwt_deploy import api
    from qwt_deploy.calibration.sequential import CalibrationSettings
    from qwt_deploy.config import QuantizeConfig

    n = len(next(iter(data.values()))) if isinstance(data, Mapping) else len(data)
    extra = {} if keep_float is None else dict(keep_float=tuple(keep_float))
    if isinstance(data, np.ndarray):  # an nn.Module is traced with the data's shape
        extra["example_shape"] = tuple(data.shape[1:])
    cfg = QuantizeConfig(target=target, settings=CalibrationSettings(method=method, **settings), num_calib=n,
                         batch_size=batch_size, **extra)
    return api.quantize(model, data, cfg)


# ---------------------------------------------------------- a tiny BERT-like encoder (tokens)
VOCAB, MAX_LEN = 60, 32


class TinyEncoder(nn.Module):
    """What all-MiniLM-L6-v2 has: token + position embeddings, LayerNorm, one attention block
    with an additive padding mask, a GELU MLP, residual adds, mean-pooling over the mask with L2
    normalisation; two int64 inputs with dynamic batch and sequence axes."""

    def __init__(self, d=32, heads=4, ff=64, seed=0, sdpa=False, q_bias=True):
        super().__init__()
        self.sdpa = sdpa  # F.scaled_dot_product_attention (Hugging Face's default) instead of eager matmuls
        g = torch.Generator().manual_seed(seed)
        self.emb, self.pos, self.ln0 = nn.Embedding(VOCAB, d), nn.Embedding(MAX_LEN, d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=q_bias or i > 0) for i in range(4))
        self.ln1, self.fc1, self.fc2, self.ln2 = nn.LayerNorm(d), nn.Linear(d, ff), nn.Linear(ff, d), nn.LayerNorm(d)
        self.h, self.dh = heads, d // heads
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1))
            for ln in (self.ln0, self.ln1, self.ln2):
                ln.weight.add_(1.0)

    def forward(self, input_ids, attention_mask):
        F = nn.functional
        b, s = input_ids.shape
        x = self.ln0(self.emb(input_ids) + self.pos.weight[:s])
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        q = self.q(x).view(b, s, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(b, s, self.h, self.dh).transpose(1, 2)
        v = self.v(x).view(b, s, self.h, self.dh).transpose(1, 2)
        if self.sdpa:
            c = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            c = torch.matmul((torch.matmul(q, k.transpose(-1, -2)) * self.dh ** -0.5 + bias).softmax(-1), v)
        c = c.transpose(1, 2).reshape(b, s, -1)
        x = self.ln1(x + self.o(c))
        x = self.ln2(x + self.fc2(F.gelu(self.fc1(x))))
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        e = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return e / e.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def tokens(rng, n, s):
    """Random ids with right padding (mask 0) of random length >= 2, as int64 tensors."""
    ids = rng.integers(1, VOCAB, (n, s))
    mask = np.ones((n, s), np.int64)
    for i in range(n):
        length = int(rng.integers(2, s + 1))
        ids[i, length:], mask[i, length:] = 0, 0
    return torch.from_numpy(ids), torch.from_numpy(mask)


# ------------------------------------------- the edge CLIs with torch (and the pipeline) blocked
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs a CLI with torch (and everything else that belongs to the workstation side) unimportable,
# and reports any attempt to import them, so that a swallowed ImportError cannot hide one.
BLOCKER = r"""
import sys
BLOCKED = ("torch", "torchvision", "onnx", "onnx_graphsurgeon", "polygraphy", "qwt_deploy.calibration",
           "qwt_deploy.graph_passes", "qwt_deploy.api", "qwt_deploy.pipeline", "qwt_deploy.targets",
           "qwt_deploy.frontend", "qwt_deploy.quantization", "qwt_deploy.exporter")
attempts = []
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            attempts.append(name)
            raise ImportError("blocked: the edge runtime must not import " + name)
sys.meta_path.insert(0, Blocker())
import atexit
atexit.register(lambda: sys.stderr.write("BLOCKED-IMPORTS=%s\n" % ",".join(attempts)))
"""


def blocked_python(code: str) -> list[str]:
    """argv for a Python that cannot import torch and then runs ``code``."""
    return [sys.executable, "-c", BLOCKER + code]


def run_blocked_cli(module: str, args: list[str]) -> subprocess.CompletedProcess:
    code = f"from {module} import main\nsys.exit(main({args!r}))\n"
    return subprocess.run(blocked_python(code), capture_output=True, text=True, cwd=REPO, timeout=120)


def assert_no_blocked_imports(stderr: str) -> None:
    line = [l for l in stderr.splitlines() if l.startswith("BLOCKED-IMPORTS=")]
    assert line == ["BLOCKED-IMPORTS="], stderr[-2000:]


class Server:
    """``qwt-serve`` in a subprocess where torch cannot be imported; port 0 = any free port."""

    def __init__(self, model, *flags):
        code = f"from qwt_deploy.cli.serve import main\nsys.exit(main({[model, '--port', '0', *flags]!r}))\n"
        self.proc = subprocess.Popen(blocked_python(code), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.proc.kill()
            raise AssertionError(f"server did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.port = int(m.group(1))

    def request(self, method, path, body=None, headers=None):
        import http.client
        import json

        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            data = r.read()
        finally:
            c.close()
        ctype = r.getheader("Content-Type", "")
        return r.status, (json.loads(data) if ctype.startswith("application/json") else data.decode())

    def predict_tensor(self, x, **extra):
        import json

        body = json.dumps({"shape": list(x.shape), "data": x.tolist(), **extra})
        return self.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=20)
        assert self.proc.returncode == 0, err[-2000:]
        return err
