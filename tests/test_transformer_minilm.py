"""all-MiniLM-L6-v2 end to end on real English text (slow: ~1-2 min on 2 cores).

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

import numpy as np
import onnx
import pytest
import torch

from calibration.text import split_sentences, tokenize
from qwt_deploy.check.agreement import compare
from qwt_deploy.examples import minilm
from qwt_deploy.quantize.simulate import SimulatedModel
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx

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

    run = minilm.quantize(model, ci, cm, method="qwt2")
    onnx.checker.check_model(run.folded, full_check=True)
    assert run.n_folded == 36  # 6 layers x (q, k, v, attention out, fc1, fc2)
    opt = str(tmp_path / "opt.onnx")
    sess = SessionFromOnnx(run.folded.SerializeToString(), threads=2, optimized_model_path=opt, allow_spinning=False)()
    ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    assert ops["MatMulIntegerToFloat"] + ops["QGemm"] + ops["QLinearMatMul"] == 48, ops  # 36 linears + 12 attention
    assert ops["QLinearMatMul"] >= 6 and ops.get("MatMul", 0) == ops.get("FusedMatMul", 0) == 0, ops

    got = minilm.embed_ort(sess, ei, em)
    cos = _cos(got, fp)

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from qwt_deploy.export.qdq import export_onnx

    src, dst = str(tmp_path / "fp32.onnx"), str(tmp_path / "dyn.onnx")
    onnx.save(export_onnx(run.graph), src)
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
    ref = SimulatedModel(run.graph, run.plan, run.result.params)((ids, mask)).numpy()
    ort_out = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    agr = compare(ref, ort_out)
    assert agr.cosine >= 0.999 and agr.mean_steps <= 0.5, agr
