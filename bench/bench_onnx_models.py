"""Figures for "any model that exports to ONNX": third-party FP32 ONNX models through the public
API (``qd.quantize`` -> ``qd.export``, --target ort), against FP32 and against ONNX Runtime's own
``quantize_static`` on the same FP32 file and the same calibration samples.

    python bench/bench_onnx_models.py [--models mtcnn-pnet,mtcnn-rnet,mtcnn-onet,ppocr-det,nudenet]
                                      [--quick] [--out bench/results]

Models (real pretrained weights from installed packages, real images only):

- MTCNN PNet/RNet/ONet (facenet-pytorch 2.6.0 state dicts, loaded without its torchvision
  import), exported to FP32 ONNX with ``frontend.onnx_source.fp32_onnx_from_module``.
  Calibration: LFW faces and non-faces (``skimage.data.lfw_subset``, 25x25 grey, first part),
  crops of ``skimage.data.astronaut`` and of the other skimage/sklearn photos. Held out: the other
  LFW faces and non-faces, crops of matplotlib's Grace Hopper portrait and foolbox's ImageNet
  photos. Normalised as facenet-pytorch's detect_face: (x - 127.5) / 128, RGB.
- PP-OCRv4 text detector (rapidocr_onnxruntime's ``ch_PP-OCRv4_det_infer.onnx``), 320x320 BGR,
  (x/255 - 0.5)/0.5 as rapidocr's DetPreProcess. Calibration: crops of ``skimage.data.text``
  plus skimage/sklearn photos WITH RENDERED TEXT (pydoc_data topic sentences drawn with PIL
  ImageDraw). Held out: crops of ``skimage.data.page`` (a scanned page, never calibrated on)
  and foolbox/Grace Hopper photos with other pydoc sentences rendered on them.
- nudenet 3.4.2 ``320n.onnx`` (YOLOv8n-style), letterboxed to 320 as nudenet's _read_image
  (pad bottom/right, resize, /255, RGB). Calibration: skimage/sklearn photos; held out: foolbox's
  20 ImageNet photos and Grace Hopper (whole and cropped).

Per model and method (none, bias-correction, qwt2; and quantize_static MinMax / Percentile):
quantize+export wall time; integer kernels (op counts in ORT's optimized graph, and the share of
Conv/ConvTranspose/Gemm/MatMul FLOPs, ``runtime.coverage.integer_flop_share``); ORT vs the
PyTorch simulation per output (ours only); against FP32 on the held-out inputs: every output's
cosine and max abs error, the task figure (MTCNN face decision recall/precision at facenet-
pytorch's thresholds; PP-OCR F1 of the map binarised at 0.3; nudenet detection recall/precision
at IoU 0.5, same class, decoded as nudenet does), mean KL where the output is a probability;
batch-1 latency FP32 vs quantize_static vs qwt2, interleaved in one process (2 threads,
allow_spinning=0). Writes onnx_models.json and onnx_models.md in --out. Not part of pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import onnx
import torch
from PIL import Image

import qwt_deploy as qd
from qwt_deploy.api import check_session
from qwt_deploy.comparison.agreement import compare, row_cosines
from qwt_deploy.runtime.coverage import int8_coverage, integer_flop_share
from qwt_deploy.runtime.onnxruntime import SessionFromOnnx, interleaved_latency_ms

METHODS = ["none", "bias-correction", "qwt2"]
MODELS = ["mtcnn-pnet", "mtcnn-rnet", "mtcnn-onet", "ppocr-det", "nudenet"]
THREADS = 2


# ------------------------------------------------------------------------------ real images
def _pkg_dir(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise RuntimeError(f"{module} is not installed")
    return spec.submodule_search_locations[0] if spec.submodule_search_locations else os.path.dirname(spec.origin)


def _rgb(path_or_array) -> Image.Image:
    if isinstance(path_or_array, np.ndarray):
        a = path_or_array
        if a.dtype != np.uint8:
            a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    im = Image.open(path_or_array)
    im.load()
    return im.convert("RGB")


def calibration_photo_paths(exclude=("page.png", "text.png")) -> list[str]:
    """skimage/sklearn sample photos (qwt_deploy.data.photos' calibration pool)."""
    from qwt_deploy.data.photos import calibration_photos

    return [p.path for p in calibration_photos() if os.path.basename(p.path) not in exclude]


def heldout_photo_paths() -> list[str]:
    """foolbox's 20 ImageNet validation photos and matplotlib's Grace Hopper portrait."""
    from qwt_deploy.data.photos import evaluation_photos

    return [p.path for p in evaluation_photos()]


def square_crop(img: Image.Image, rng, lo: float = 0.25, hi: float = 1.0) -> Image.Image:
    w, h = img.size
    s = int(rng.integers(max(8, int(min(w, h) * lo)), int(min(w, h) * hi) + 1))
    x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    return img.crop((x0, y0, x0 + s, y0 + s))


def to_chw(img: Image.Image, size) -> np.ndarray:
    size = (size, size) if isinstance(size, int) else size
    return np.asarray(img.resize(size, Image.BILINEAR), np.float32).transpose(2, 0, 1)


# ----------------------------------------------------------------------------------- MTCNN
MTCNN_THRESHOLDS = {"pnet": 0.6, "rnet": 0.7, "onet": 0.7}  # facenet-pytorch MTCNN defaults
MTCNN_SIZES = {"pnet": 48, "rnet": 24, "onet": 48}


def mtcnn_nets() -> dict:
    """PNet, RNet, ONet with facenet-pytorch's weights (qwt_deploy.examples.mtcnn)."""
    from qwt_deploy.examples.mtcnn import build_nets

    return build_nets()


def mtcnn_data(size: int, n_cal: int, n_held: int, seed: int = 0):
    """(calibration, held-out, description): N x 3 x size x size, normalised as detect_face."""
    from skimage import data

    lfw = data.lfw_subset()  # 200 x 25 x 25 grey in [0, 1]: 100 faces, then 100 non-faces
    rng = np.random.default_rng(seed)

    def lfw_img(i):
        return to_chw(_rgb(np.repeat(lfw[i][:, :, None], 3, 2)), size)

    n_lfw_cal = min(60, n_cal // 4)  # faces 0.. and non-faces 100.. for calibration
    n_lfw_held = min(40, n_held * 2 // 5)  # faces 60.. and non-faces 160.. held out
    cal = [lfw_img(i) for i in range(n_lfw_cal)] + [lfw_img(100 + i) for i in range(n_lfw_cal)]
    astro = _rgb(data.astronaut())
    others = [_rgb(p) for p in calibration_photo_paths(exclude=("page.png", "text.png", "astronaut.png"))]
    rest = n_cal - len(cal)
    cal += [to_chw(square_crop(astro, rng), size) for _ in range(rest // 2)]
    cal += [to_chw(square_crop(others[i % len(others)], rng), size) for i in range(rest - rest // 2)]
    held = [lfw_img(60 + i) for i in range(n_lfw_held)] + [lfw_img(160 + i) for i in range(n_lfw_held)]
    paths = heldout_photo_paths()
    hopper = _rgb(next(p for p in paths if "grace_hopper" in p))
    imagenet = [_rgb(p) for p in paths if "grace_hopper" not in p]
    rest = n_held - len(held)
    held += [to_chw(square_crop(hopper, rng, 0.3, 0.9), size) for _ in range(rest // 2)]
    held += [to_chw(square_crop(imagenet[i % len(imagenet)], rng), size) for i in range(rest - rest // 2)]
    norm = lambda xs: ((np.stack(xs) - 127.5) * 0.0078125).astype(np.float32)  # noqa: E731
    desc = (f"calibration: {2 * n_lfw_cal} LFW 25x25 (skimage lfw_subset: faces 0-{n_lfw_cal - 1}, non-faces "
            f"100-{99 + n_lfw_cal}), {(n_cal - 2 * n_lfw_cal) // 2} astronaut crops, "
            f"{n_cal - 2 * n_lfw_cal - (n_cal - 2 * n_lfw_cal) // 2} crops of other skimage/sklearn photos; "
            f"held out: {2 * n_lfw_held} other LFW (faces 60-, non-faces 160-), {(n_held - 2 * n_lfw_held) // 2} "
            f"Grace Hopper crops, {n_held - 2 * n_lfw_held - (n_held - 2 * n_lfw_held) // 2} foolbox ImageNet crops; "
            f"all resized to {size}x{size}")
    return norm(cal), norm(held), desc


def _kl_bernoulli(p, q, eps=1e-6):
    p, q = np.clip(p.astype(np.float64), eps, 1 - eps), np.clip(q.astype(np.float64), eps, 1 - eps)
    return float(np.mean(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))))


def _pr(ref: np.ndarray, got: np.ndarray) -> dict:
    tp = int(np.sum(ref & got))
    return dict(recall=tp / max(int(ref.sum()), 1), precision=tp / max(int(got.sum()), 1),
                ref_positives=int(ref.sum()), positives=int(got.sum()),
                f1=2 * tp / max(int(ref.sum()) + int(got.sum()), 1))


def mtcnn_task(name: str):
    thr = MTCNN_THRESHOLDS[name]

    def task(ref: list, got: list) -> dict:
        # facenet-pytorch: PNet/RNet return (box offsets, prob); ONet (box offsets, landmarks, prob)
        pr, pg = ref[-1][:, 1], got[-1][:, 1]  # face probability (softmax over [non-face, face])
        out = dict(threshold=thr, face_prob_cosine=float(row_cosines(pr, pg).mean()),
                   face_prob_max_abs=float(np.abs(pr - pg).max()),
                   box_cosine=float(row_cosines(ref[0], got[0]).mean()), box_max_abs=float(np.abs(ref[0] - got[0]).max()),
                   kl=_kl_bernoulli(pr, pg), **_pr(pr > thr, pg > thr))
        if len(ref) == 3:
            out.update(landmark_cosine=float(row_cosines(ref[1], got[1]).mean()),
                       landmark_max_abs=float(np.abs(ref[1] - got[1]).max()))
        out["figure"] = f"R {out['recall']:.3f} P {out['precision']:.3f} (n+={out['ref_positives']})"
        return out
    return task


# ---------------------------------------------------------------------------------- PP-OCR
OCR_SIZE = 320
OCR_THRESH = 0.3  # DBNet postprocessing binarisation (rapidocr config Det.thresh)


def _sentences() -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for s in topics[key].replace("\n", " ").split(". "):
            s = " ".join(s.split())
            if 20 <= len(s) <= 70 and s.isascii() and "*" not in s:
                out.append(s)
    return out


def _draw_text(img: Image.Image, rng, sentences: list[str]) -> Image.Image:
    """2-5 lines of real sentences drawn on a real photo (PIL ImageDraw, the Pillow default
    FreeType font at 14-34 px), each dark or light against the local mean, at random places."""
    from PIL import ImageDraw, ImageFont

    img = img.copy()
    d = ImageDraw.Draw(img)
    w, h = img.size
    arr = np.asarray(img, np.float32)
    for _ in range(int(rng.integers(2, 6))):
        font = ImageFont.load_default(size=int(rng.integers(14, 35)))
        s = sentences[int(rng.integers(len(sentences)))]
        s = s[: int(rng.integers(12, len(s) + 1))]
        x, y = int(rng.integers(0, max(1, w // 3))), int(rng.integers(0, max(1, h - 30)))
        local = arr[y:y + 30, x:x + 200].mean() if arr[y:y + 30, x:x + 200].size else 128
        base = 20 if local > 110 else 235
        color = tuple(int(np.clip(base + rng.integers(-20, 21), 0, 255)) for _ in range(3))
        d.text((x, y), s, fill=color, font=font)
    return img


def ppocr_data(n_cal: int, n_held: int, seed: int = 0):
    from skimage import data

    rng = np.random.default_rng(seed)
    sents = _sentences()
    cal_s, held_s = sents[: len(sents) // 2], sents[len(sents) // 2:]  # disjoint sentences
    text = _rgb(np.repeat(data.text()[:, :, None], 3, 2))
    page = _rgb(np.repeat(data.page()[:, :, None], 3, 2))
    photos = [_rgb(p) for p in calibration_photo_paths()]  # page.png and text.png excluded
    n_text = n_cal // 4
    cal = [to_chw(square_crop(text, rng, 0.6, 1.0), OCR_SIZE) for _ in range(n_text)]
    cal += [to_chw(_draw_text(square_crop(photos[i % len(photos)], rng, 0.4, 1.0).resize((OCR_SIZE, OCR_SIZE)),
                              rng, cal_s), OCR_SIZE) for i in range(n_cal - n_text)]
    held_photos = [_rgb(p) for p in heldout_photo_paths()]
    n_page = n_held // 3
    held = [to_chw(square_crop(page, rng, 0.6, 1.0), OCR_SIZE) for _ in range(n_page)]
    held += [to_chw(_draw_text(square_crop(held_photos[i % len(held_photos)], rng, 0.4, 1.0).resize(
        (OCR_SIZE, OCR_SIZE)), rng, held_s), OCR_SIZE) for i in range(n_held - n_page)]

    def norm(xs):  # rapidocr: BGR (cv2), (x / 255 - 0.5) / 0.5
        x = np.stack(xs)[:, ::-1]
        return np.ascontiguousarray((x / 255.0 - 0.5) / 0.5, dtype=np.float32)

    desc = (f"calibration: {n_text} crops of skimage.data.text() + {n_cal - n_text} skimage/sklearn photos WITH "
            f"RENDERED TEXT (pydoc_data topic sentences drawn with PIL ImageDraw); held out: {n_page} crops of "
            f"skimage.data.page() (scanned text) + {n_held - n_page} foolbox ImageNet / Grace Hopper photos with "
            f"other rendered pydoc sentences; {OCR_SIZE}x{OCR_SIZE} BGR")
    return norm(cal), norm(held), desc


def ppocr_task(ref: list, got: list) -> dict:
    pr, pg = ref[0], got[0]
    b = _pr(pr > OCR_THRESH, pg > OCR_THRESH)
    out = dict(threshold=OCR_THRESH, map_cosine=float(row_cosines(pr, pg).mean()),
               map_max_abs=float(np.abs(pr - pg).max()), kl=_kl_bernoulli(pr, pg), **b)
    out["figure"] = f"F1 {out['f1']:.3f} (R {out['recall']:.3f} P {out['precision']:.3f})"
    return out


# ---------------------------------------------------------------------------------- nudenet
NUDE_SIZE = 320


def letterbox(img: Image.Image) -> np.ndarray:
    """nudenet's _read_image: pad bottom/right to a square with black, resize, /255, RGB."""
    w, h = img.size
    s = max(w, h)
    sq = Image.new("RGB", (s, s))
    sq.paste(img, (0, 0))
    return to_chw(sq, NUDE_SIZE) / 255.0


def nudenet_data(n_cal: int, n_held: int, seed: int = 0):
    rng = np.random.default_rng(seed)

    def take(paths, n):
        imgs = [_rgb(p) for p in paths]
        out = [letterbox(im) for im in imgs[:n]]
        while len(out) < n:
            im = imgs[len(out) % len(imgs)]
            w, h = im.size  # a random rectangle of 30-100% of each side
            cw, ch = int(w * rng.uniform(0.3, 1.0)), int(h * rng.uniform(0.3, 1.0))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out.append(letterbox(im.crop((x0, y0, x0 + cw, y0 + ch))))
        return np.stack(out).astype(np.float32)

    cal_paths = calibration_photo_paths(exclude=())
    desc = (f"calibration: {n_cal} letterboxed skimage/sklearn photos (whole, then random crops); held out: "
            f"{n_held} foolbox ImageNet photos + Grace Hopper (whole, then random crops); {NUDE_SIZE}x{NUDE_SIZE} RGB /255")
    return take(cal_paths, n_cal), take(heldout_photo_paths(), n_held), desc


def nudenet_decode(output: np.ndarray) -> list[tuple]:
    """nudenet 3.4.2 _postprocess in input coordinates: rows of [cx, cy, w, h, 18 class scores];
    keep max score >= 0.2, corner boxes clipped to the image, cv2.dnn.NMSBoxes(score 0.25,
    NMS 0.45). Returns (class, score, x, y, w, h)."""
    import cv2

    rows = np.transpose(np.squeeze(output, 0))
    boxes, scores, classes = [], [], []
    for r in rows:
        cs = r[4:]
        m = float(np.amax(cs))
        if m >= 0.2:
            x, y, w, h = (float(v) for v in r[:4])
            x, y = x - w / 2, y - h / 2
            x, y = max(0.0, min(x, NUDE_SIZE)), max(0.0, min(y, NUDE_SIZE))
            w, h = min(w, NUDE_SIZE - x), min(h, NUDE_SIZE - y)
            boxes.append([x, y, w, h])
            scores.append(m)
            classes.append(int(np.argmax(cs)))
    keep = cv2.dnn.NMSBoxes(boxes, scores, 0.25, 0.45) if boxes else []
    return [(classes[i], scores[i], *boxes[i]) for i in np.array(keep).reshape(-1)]


def _iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def nudenet_task(ref: list, got: list) -> dict:
    tp = n_ref = n_got = 0
    for i in range(len(ref[0])):
        dr, dg = nudenet_decode(ref[0][i:i + 1]), nudenet_decode(got[0][i:i + 1])
        n_ref, n_got = n_ref + len(dr), n_got + len(dg)
        used = set()
        for c, _, *bg in sorted(dg, key=lambda d: -d[1]):
            best, bj = 0.5, None
            for j, (cr, _, *br) in enumerate(dr):
                if j not in used and cr == c and _iou(bg, br) >= best:
                    best, bj = _iou(bg, br), j
            if bj is not None:
                used.add(bj)
                tp += 1
    a, b = ref[0], got[0]
    out = dict(recall=tp / max(n_ref, 1), precision=tp / max(n_got, 1), ref_detections=n_ref, detections=n_got,
               class_score_cosine=float(row_cosines(a[:, 4:], b[:, 4:]).mean()),
               kl=_kl_bernoulli(a[:, 4:], b[:, 4:]),  # 18 independent sigmoid class scores per anchor
               box_max_abs=float(np.abs(a[:, :4] - b[:, :4]).max()))
    out["figure"] = f"R {out['recall']:.3f} P {out['precision']:.3f} (n={n_ref})"
    return out


# ---------------------------------------------------------------------------------- models
@dataclass
class Model:
    name: str
    fp32_path: str
    input_name: str
    cal: np.ndarray
    held: np.ndarray
    data_description: str
    task: Callable
    closeness: str  # "kl" (lower is better) or "cosine" (higher is better): the goal-check figure
    notes: dict = field(default_factory=dict)


def build_model(name: str, workdir: str, quick: bool) -> Model:
    if name.startswith("mtcnn-"):
        from torch.export import Dim

        from qwt_deploy.frontend.onnx_source import fp32_onnx_from_module

        net_name = name.split("-")[1]
        n_cal, n_held = (48, 24) if quick else (256, 100)
        cal, held, desc = mtcnn_data(MTCNN_SIZES[net_name], n_cal, n_held)
        net = mtcnn_nets()[net_name]
        t = time.perf_counter()
        m = fp32_onnx_from_module(net, (torch.from_numpy(cal[:2]),), dynamic_shapes=({0: Dim("batch")},))
        path = os.path.join(workdir, f"{name}.fp32.onnx")
        onnx.save(m, path)
        return Model(name, path, m.graph.input[0].name, cal, held, desc, mtcnn_task(net_name), "kl",
                     notes=dict(fp32_onnx_export_s=time.perf_counter() - t, source="facenet-pytorch 2.6.0 "
                                f"{net_name}.pt -> fp32_onnx_from_module (dynamic batch)"))
    if name == "ppocr-det":
        path = os.path.join(_pkg_dir("rapidocr_onnxruntime"), "models", "ch_PP-OCRv4_det_infer.onnx")
        n_cal, n_held = (24, 12) if quick else (128, 48)
        cal, held, desc = ppocr_data(n_cal, n_held)
        return Model(name, path, "x", cal, held, desc, ppocr_task, "kl",
                     notes=dict(source="rapidocr_onnxruntime 1.4.4 models/ch_PP-OCRv4_det_infer.onnx"))
    if name == "nudenet":
        path = os.path.join(_pkg_dir("nudenet"), "320n.onnx")
        n_cal, n_held = (24, 12) if quick else (128, 96)
        cal, held, desc = nudenet_data(n_cal, n_held)
        return Model(name, path, "images", cal, held, desc, nudenet_task, "kl",
                     notes=dict(source="nudenet 3.4.2 320n.onnx"))
    raise SystemExit(f"unknown model {name}; choose from {', '.join(MODELS)}")


# ------------------------------------------------------------------------------ measuring
def ort_outputs(session, name: str, x: np.ndarray, chunk: int = 16) -> list[np.ndarray]:
    parts = [session.run(None, {name: x[i:i + chunk]}) for i in range(0, len(x), chunk)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def sim_outputs(qm, x: np.ndarray, chunk: int = 16) -> list[np.ndarray]:
    sim = qm.simulation()
    parts = []
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            y = sim(torch.from_numpy(np.ascontiguousarray(x[i:i + chunk])))
            parts.append([t.numpy() for t in (y if isinstance(y, tuple) else (y,))])
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def vs_fp32(model: Model, ref: list, got: list, out_names: list[str]) -> dict:
    def pooled(r, g):  # one cosine over all samples: not dragged down by near-empty outputs
        r, g = r.reshape(-1).astype(np.float64), g.reshape(-1).astype(np.float64)
        return float(r @ g / (np.linalg.norm(r) * np.linalg.norm(g) + 1e-30))

    per_output = {n: dict(cosine=float(row_cosines(r, g).mean()), median_cosine=float(np.median(row_cosines(r, g))),
                          min_cosine=float(row_cosines(r, g).min()), pooled_cosine=pooled(r, g),
                          max_abs=float(np.abs(r - g).max())) for n, r, g in zip(out_names, ref, got)}
    return dict(per_output=per_output, task=model.task(ref, got),
                mean_cosine=float(np.mean([v["cosine"] for v in per_output.values()])))


def coverage_of(path: str) -> tuple[dict, onnx.ModelProto]:
    with tempfile.TemporaryDirectory() as td:
        opt = os.path.join(td, "opt.onnx")
        SessionFromOnnx(path, THREADS, optimized_model_path=opt, allow_spinning=False)()
        optimized = onnx.load(opt)
    return int8_coverage(optimized), optimized


def flop_share(fp32: onnx.ModelProto, int8_path: str, optimized: onnx.ModelProto, input_name: str, shape) -> dict:
    r = integer_flop_share(fp32, int8_path, {input_name: shape}, optimized=optimized)
    r.pop("nodes")
    return r


def quantized_outputs(path: str) -> list[str]:
    """Graph outputs that the file itself quantizes (produced by a DequantizeLinear)."""
    g = onnx.load(path).graph
    prod = {o: n.op_type for n in g.node for o in n.output}
    return [o.name for o in g.output if prod.get(o.name) == "DequantizeLinear"]


def why_float(fp32: onnx.ModelProto, names: list[str]) -> dict:
    """Why each conv/matmul of the source stayed float in our file, as far as the graph says."""
    from qwt_deploy.frontend.onnx_names import node_names

    nodes = dict(zip(node_names(fp32.graph), fp32.graph.node))
    outputs = {o.name for o in fp32.graph.output}
    out = {}
    for k in names:
        n = nodes.get(k)
        if n is None:
            out[k] = "not found in the source graph"
        elif n.op_type == "ConvTranspose":
            out[k] = ("ConvTranspose: the ONNX frontend translates Conv/Gemm/MatMul only, so it is a float node "
                      "(FP32 weights); ONNX Runtime 1.32's CPU provider has no integer ConvTranspose either "
                      "(quantize_static's DQ -> ConvTranspose -> Q runs as a float ConvTranspose)")
        elif n.output[0] in outputs:
            out[k] = f"{n.op_type} whose output is a graph output: the ort placement keeps it float"
        else:
            out[k] = f"{n.op_type}: not quantized (see the float_nodes of the method)"
    return out


def run_ours(model: Model, method: str, workdir: str, ref: list, out_names: list[str], batch_size: int) -> dict:
    cfg = qd.QuantizeConfig(target="ort", settings=qd.CalibrationSettings(method=method),
                            num_calib=len(model.cal), batch_size=batch_size, threads=THREADS)
    path = os.path.join(workdir, f"{model.name}.{method}.int8.onnx")
    t = time.perf_counter()
    qm = qd.quantize(model.fp32_path, model.cal, cfg, evaluation=model.held)  # calibrate on every cal sample
    ex = qd.export(qm, path)
    seconds = time.perf_counter() - t
    cov, optimized = coverage_of(path)
    shape = (1,) + model.held.shape[1:]
    flops = flop_share(qm.loaded.onnx, path, optimized, model.input_name, shape)
    sess = check_session(ex, THREADS)
    got = ort_outputs(sess, model.input_name, model.held)
    sim = sim_outputs(qm, model.held)
    sim_names = list(qm.graph.outputs)
    got_by_name = dict(zip([o.name for o in sess.get_outputs()], got))
    agreement = {}
    for n, s in zip(sim_names, sim):
        a = compare(s, got_by_name[n])
        agreement[n] = dict(within_1_step=a.within_1_step, max_steps=a.max_steps, mean_steps=a.mean_steps,
                            cosine=a.cosine, step=a.step)
    got_ordered = [got_by_name[n] for n in out_names]
    flops["why_float"] = why_float(qm.loaded.onnx, flops["float_ops"])
    return dict(path=path, export_s=seconds, timing=qm.timing, coverage=cov, flops=flops,
                quantized_outputs=quantized_outputs(path),
                ort_vs_sim=agreement, vs_fp32=vs_fp32(model, ref, got_ordered, out_names),
                float_nodes=[n.name for n in qm.graph.nodes if n.op == "onnx"
                             and n.attrs["proto"].op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")])


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over the same calibration samples."""

    # equal batches: the histogram calibrators (Percentile, Entropy) stack each tensor's batches
    # with np.asarray and fail on a shorter last batch (ValueError: inhomogeneous shape)
    def __init__(self, name: str, x: np.ndarray, batch: int = 8):
        assert len(x) % batch == 0, (len(x), batch)
        self.batches = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)

    def __iter__(self):  # some onnxruntime versions iterate the reader
        return self

    def __next__(self):
        b = self.get_next()
        if b is None:
            raise StopIteration
        return b


class _Chunk:
    def __init__(self, batch):
        self.batch = [batch]

    def get_next(self):
        return self.batch.pop() if self.batch else None


@contextlib.contextmanager
def _streamed_histograms():
    """ONNX Runtime 1.32's histogram calibrators (Percentile, Entropy) keep every intermediate
    tensor of every calibration sample in memory before histogramming (PP-OCR, 128 samples at
    320x320: killed at 24 GB), and ignore ``CalibMaxIntermediateOutputs``. Their histogram
    collector merges calls (it widens the bins as new maxima arrive), so here collect_data is
    fed one reader batch at a time: the same samples, one batch of tensors in memory (and a
    zero-size tensor, which its merge step cannot take, is skipped after the first batch).

    (``CalibMaxIntermediateOutputs`` is not used for MinMax either: in 1.32 the MinMax
    calibrator *clears* the collected outputs when the cap is reached without computing their
    ranges, so all but the last partial chunk of batches would be dropped silently, and a batch
    count that is a multiple of the cap raises "No data is collected". MinMax needs no cap: its
    augmented graph returns only per-tensor ReduceMin/ReduceMax values.)"""
    from onnxruntime.quantization import calibrate

    original, original_collect = calibrate.HistogramCalibrater.collect_data, calibrate.HistogramCollector.collect

    def streamed(self, reader):
        while True:
            batch = reader.get_next()
            if not batch:
                break
            original(self, _Chunk(batch))

    def collect(self, name_to_arr):
        # the merge branch of 1.32's collector calls nanmax on an empty tensor (PP-OCR has
        # zero-size float tensors) and raises; an empty tensor adds nothing to a histogram
        return original_collect(self, {k: v for k, v in name_to_arr.items() if not (
            k in getattr(self, "histogram_dict", {}) and all(np.asarray(a).size == 0 for a in v))})

    calibrate.HistogramCalibrater.collect_data = streamed
    calibrate.HistogramCollector.collect = collect
    try:
        yield
    finally:
        calibrate.HistogramCalibrater.collect_data = original
        calibrate.HistogramCollector.collect = original_collect


def run_quantize_static(model: Model, calib: str, workdir: str, ref: list, out_names: list[str]) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader_cls = type("Reader", (_Reader, CalibrationDataReader), {})
    path = os.path.join(workdir, f"{model.name}.ort-{calib}.int8.onnx")
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calib]
    t = time.perf_counter()
    with _streamed_histograms():
        quantize_static(model.fp32_path, path, reader_cls(model.input_name, model.cal), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=method)
    seconds = time.perf_counter() - t
    cov, optimized = coverage_of(path)
    fp32 = onnx.load(model.fp32_path)
    flops = flop_share(fp32, path, optimized, model.input_name, (1,) + model.held.shape[1:])
    sess = SessionFromOnnx(path, THREADS, allow_spinning=False)()
    got = ort_outputs(sess, model.input_name, model.held)
    got_by_name = dict(zip([o.name for o in sess.get_outputs()], got))
    return dict(path=path, export_s=seconds, coverage=cov, flops=flops, quantized_outputs=quantized_outputs(path),
                vs_fp32=vs_fp32(model, ref, [got_by_name[n] for n in out_names], out_names))


def closeness(model: Model, r: dict) -> float:
    return r["vs_fp32"]["task"]["kl"] if model.closeness == "kl" else r["vs_fp32"]["mean_cosine"]


def better(model: Model, a: float, b: float) -> bool:
    """a at least as close to FP32 as b."""
    return a <= b if model.closeness == "kl" else a >= b


def bench_model(name: str, workdir: str, quick: bool, failures: list) -> dict:
    model = build_model(name, workdir, quick)
    res = dict(source=model.notes.pop("source"), data=model.data_description, n_calibration=len(model.cal),
               n_heldout=len(model.held), input_shape=list(model.held.shape[1:]), closeness=model.closeness,
               notes=model.notes, methods={}, quantize_static={})
    fp32_sess = SessionFromOnnx(model.fp32_path, THREADS, allow_spinning=False)()
    out_names = [o.name for o in fp32_sess.get_outputs()]
    ref = ort_outputs(fp32_sess, model.input_name, model.held)
    del fp32_sess
    shape = (1,) + model.held.shape[1:]
    fp32_flops = integer_flop_share(onnx.load(model.fp32_path), model.fp32_path, {model.input_name: shape})
    res["fp32"] = dict(outputs=out_names, gflops_batch1=fp32_flops["flops_total"] / 1e9,
                       compute_ops=fp32_flops["ops_total"])
    batch = 16 if name in ("ppocr-det", "nudenet") else 32
    for method in METHODS:
        print(f"[{name}] {method} ...", flush=True)
        try:
            res["methods"][method] = run_ours(model, method, workdir, ref, out_names, batch)
            r = res["methods"][method]
            print(f"[{name}] {method}: {r['export_s']:.1f}s, FLOP share {r['flops']['share']:.3f}, "
                  f"{r['vs_fp32']['task']['figure']}", flush=True)
        except Exception as e:  # noqa: BLE001 - the bench reports and goes on
            traceback.print_exc()
            failures.append(f"{name} {method}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            res["methods"][method] = dict(error=failures[-1])
    for calib in ("minmax", "percentile"):
        print(f"[{name}] quantize_static {calib} ...", flush=True)
        try:
            res["quantize_static"][calib] = run_quantize_static(model, calib, workdir, ref, out_names)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            failures.append(f"{name} quantize_static {calib}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            res["quantize_static"][calib] = dict(error=failures[-1])
    ok_qs = {k: v for k, v in res["quantize_static"].items() if "error" not in v}
    best_qs = None
    if ok_qs:
        best_qs = max(ok_qs, key=lambda k: -closeness(model, ok_qs[k]) if model.closeness == "kl" else closeness(model, ok_qs[k]))
        res["quantize_static_best"] = best_qs
    # batch-1 latency: FP32 vs quantize_static (best) vs qwt2, interleaved in one process
    q2 = res["methods"].get("qwt2", {})
    if "error" not in q2 and q2:
        try:
            sessions = {"fp32": SessionFromOnnx(model.fp32_path, THREADS, allow_spinning=False)(),
                        "qwt2": SessionFromOnnx(q2["path"], THREADS, allow_spinning=False)()}
            if best_qs:
                sessions[f"ort-{best_qs}"] = SessionFromOnnx(ok_qs[best_qs]["path"], THREADS, allow_spinning=False)()
            ms = interleaved_latency_ms(sessions, model.held[:1], rounds=5 if quick else 9, per_round=5)
            res["latency_ms"] = dict(ms, batch=1, threads=THREADS,
                                     **{f"{k}_vs_fp32": v / ms["fp32"] for k, v in ms.items() if k != "fp32"})
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            failures.append(f"{name} latency: {type(e).__name__}: {e}")
    # goal check
    goal = {}
    for method, r in res["methods"].items():
        if "error" not in r:
            goal[f"{method}_flop_share_ge_0.9"] = r["flops"]["share"] is not None and r["flops"]["share"] >= 0.9
    if "error" not in q2 and q2 and best_qs:
        a, b = closeness(model, q2), closeness(model, ok_qs[best_qs])
        goal["qwt2_closeness"] = a
        goal["quantize_static_closeness"] = b
        goal["qwt2_at_least_as_close_as_quantize_static"] = better(model, a, b)
        goal["qwt2_cosine"] = q2["vs_fp32"]["mean_cosine"]
        goal["quantize_static_cosine"] = ok_qs[best_qs]["vs_fp32"]["mean_cosine"]
        goal["qwt2_at_least_as_close_by_cosine"] = goal["qwt2_cosine"] >= goal["quantize_static_cosine"]
    res["goal"] = goal
    return res


# ---------------------------------------------------------------------------------- report
def machine() -> dict:
    cpu = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), cpu)
    except OSError:
        pass
    flags = open("/proc/cpuinfo").read().split("flags", 1)[-1].split("\n", 1)[0].split() if os.path.exists("/proc/cpuinfo") else []
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    import importlib.metadata as md

    versions = {}
    for p in ("onnxruntime", "onnx", "torch", "numpy", "facenet-pytorch", "rapidocr-onnxruntime", "nudenet",
              "scikit-image", "scikit-learn", "foolbox", "pillow", "opencv-python-headless"):
        try:
            versions[p] = md.version(p)
        except md.PackageNotFoundError:
            versions[p] = None
    return dict(cpu=cpu, isa=isa, cores=os.cpu_count(), threads=THREADS, uptime=up, python=platform.python_version(),
                qwt_deploy=qd.__version__, packages=versions)


def _f(v, fmt="{:.4f}"):
    return "-" if v is None else fmt.format(v)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Third-party FP32 ONNX models: qwt-deploy (--target ort) vs FP32 vs onnxruntime quantize_static", "",
             f"Machine: {m['cpu']} (lscpu; {', '.join(m.get('isa', []))}; {m['cores']} cores, {m['threads']} threads per session), shared with other "
             f"workers. Load at start: `{report['uptime_start']}`; at end: `{m['uptime']}`.", "",
             "Packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + f", python {m['python']}, "
             f"qwt-deploy {m['qwt_deploy']}.", "",
             f"Run: {'--quick (smoke run, small sample counts)' if report['quick'] else 'full'}, "
             f"{report['total_s']:.0f} s in all.", "",
             "Columns: **export s** quantize+export wall time (ours: capture, calibrate+compensate, QDQ export, fold; "
             "quantize_static: its calibration and QDQ rewrite); **int ops** integer kernels / compute ops in ORT's "
             "optimized graph (runtime.coverage.int8_coverage); **FLOP share** Conv/ConvTranspose/Gemm/MatMul FLOPs "
             "in integer kernels (runtime.coverage.integer_flop_share, batch 1); **ORT~sim** ORT vs the PyTorch "
             "simulation, share of elements within 1 output step, lowest over outputs (ours only); **task** against "
             "FP32's own decisions on the held-out inputs; **KL** mean KL vs FP32 of the probability output "
             "(Bernoulli per element: MTCNN face probability, PP-OCR map, nudenet's 18 sigmoid class scores per anchor); "
             "**cos** mean per-sample cosine vs FP32 (in brackets: one cosine pooled over all samples), per output in "
             "output order. A PP-OCR map without text is ~1e-5 everywhere, so its per-sample cosine is noise (0.03 "
             "seen): read the pooled figure and F1 there.", "",
             "ORT quantize_static: the same FP32 file and calibration samples (batches of 8), QuantFormat.QDQ, "
             "per_channel=True, activations QUInt8, weights QInt8, MinMax and Percentile (ORT's defaults otherwise); "
             "'(best)' is the lower KL. Percentile is fed to ORT's histogram collector one batch at a time (ORT 1.32 "
             "keeps every intermediate tensor of every sample in memory: PP-OCR was killed at 24 GB; see "
             "_streamed_histograms). CalibMaxIntermediateOutputs is not used: in ORT 1.32 the MinMax calibrator "
             "clears the collected batches at the cap without computing their ranges.", ""]
    for name, r in report["models"].items():
        if "error" in r:
            lines += [f"## {name}", "", f"FAILED: {r['error']}", ""]
            continue
        lines += [f"## {name}", "", f"Source: {r['source']}. FP32: {r['fp32']['gflops_batch1']:.3f} GFLOPs at batch 1 "
                  f"(input {r['input_shape']}), {r['fp32']['compute_ops']} conv/matmul ops, outputs "
                  f"{', '.join(r['fp32']['outputs'])}.", "", f"Data ({r['n_calibration']} calibration, {r['n_heldout']} "
                  f"held out): {r['data']}.", ""]
        lines += ["| method | export s | int ops | FLOP share | ORT~sim | task vs FP32 | KL | cos per output |",
                  "|---|---|---|---|---|---|---|---|"]
        rows = [(k, v) for k, v in r["methods"].items()] + \
               [(f"ORT quantize_static {k}" + (" (best)" if k == r.get("quantize_static_best") else ""), v)
                for k, v in r["quantize_static"].items()]
        for k, v in rows:
            if "error" in v:
                lines.append(f"| {k} | FAILED: {v['error']} | | | | | | |")
                continue
            c = v["coverage"]
            sim = "-" if "ort_vs_sim" not in v else f"{min(a['within_1_step'] for a in v['ort_vs_sim'].values()):.4f}"
            t = v["vs_fp32"]["task"]
            cos = " / ".join(f"{o['cosine']:.4f} ({o['pooled_cosine']:.4f})" for o in v["vs_fp32"]["per_output"].values())
            lines.append(f"| {k} | {v['export_s']:.1f} | {c['integer_ops']}/{c['compute_ops']} | "
                         f"{_f(v['flops']['share'], '{:.3f}')} | {sim} | {t['figure']} | {_f(t.get('kl'), '{:.2e}')} | {cos} |")
        lat = r.get("latency_ms")
        if lat:
            lines += ["", "Batch-1 latency (interleaved, one process, ms): " + ", ".join(
                f"{k} {v:.2f}" for k, v in lat.items() if isinstance(v, float) and not k.endswith("_vs_fp32")) +
                "; vs FP32: " + ", ".join(f"{k[:-8]} {v:.2f}x" for k, v in lat.items() if k.endswith("_vs_fp32")) + "."]
        q2 = r["methods"].get("qwt2", {})
        if "flops" in q2 and q2["flops"]["float_flops"]:
            ff = q2["flops"]["float_flops"]
            tot = q2["flops"]["flops_total"]
            why = q2["flops"].get("why_float", {})
            lines += ["", "qwt2 conv/matmul left float (share of FLOPs): " + "; ".join(
                f"{k} ({v / tot:.1%}: {why.get(k, '?')})" for k, v in list(ff.items())[:8]) + (" ..." if len(ff) > 8 else "")]
        qs = r["quantize_static"].get(r.get("quantize_static_best") or "", {})
        if "quantized_outputs" in q2 and "quantized_outputs" in qs and q2["quantized_outputs"] != qs["quantized_outputs"]:
            lines += ["", f"Graph outputs behind Q/DQ: qwt2 {q2['quantized_outputs'] or 'none'}; quantize_static "
                      f"{qs['quantized_outputs'] or 'none'} (one per-tensor uint8 scale over the whole output)."]
        lines.append("")
    lines += ["## Goal check", "", "| model | FLOP share >= 0.9 (none / bias-corr / qwt2) | qwt2 vs quantize_static "
              "(closeness figure) | qwt2 cos vs qs cos |", "|---|---|---|---|"]
    for name, r in report["models"].items():
        g = r.get("goal", {})
        if not g:
            lines.append(f"| {name} | - | - | - |")
            continue
        flops = " / ".join(str(g.get(f"{m}_flop_share_ge_0.9", "-")) for m in METHODS)
        kind = r["closeness"]
        cmp = (f"{kind} {g['qwt2_closeness']:.3g} vs {g['quantize_static_closeness']:.3g} ({r.get('quantize_static_best')}):"
               f" {'yes' if g['qwt2_at_least_as_close_as_quantize_static'] else 'NO'}") if "qwt2_closeness" in g else "-"
        cos = (f"{g['qwt2_cosine']:.4f} vs {g['quantize_static_cosine']:.4f}: "
               f"{'yes' if g['qwt2_at_least_as_close_by_cosine'] else 'NO'}") if "qwt2_cosine" in g else "-"
        lines.append(f"| {name} | {flops} | {cmp} | {cos} |")
    if report["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="smoke run: few samples")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--keep", default=None, help="folder to keep the ONNX files in (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    uptime_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    t0 = time.perf_counter()
    failures: list[str] = []
    models = {}
    with tempfile.TemporaryDirectory() as td:
        workdir = args.keep or td
        os.makedirs(workdir, exist_ok=True)
        for name in names:
            t = time.perf_counter()
            try:
                models[name] = bench_model(name, workdir, args.quick, failures)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                failures.append(f"{name}: {type(e).__name__}: {e}")
                models[name] = dict(error=failures[-1])
            models[name]["seconds"] = time.perf_counter() - t
            print(f"[{name}] done in {models[name]['seconds']:.0f} s", flush=True)
        for r in models.values():  # file paths of a temporary folder mean nothing afterwards
            for v in list(r.get("methods", {}).values()) + list(r.get("quantize_static", {}).values()):
                if "path" in v:
                    v["path"] = os.path.basename(v["path"])
    report = dict(machine=machine(), uptime_start=uptime_start, quick=args.quick, models=models, failures=failures,
                  total_s=time.perf_counter() - t0)
    os.makedirs(args.out, exist_ok=True)
    suffix = ".quick" if args.quick else ""
    with open(os.path.join(args.out, f"onnx_models{suffix}.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    md_text = markdown(report)
    with open(os.path.join(args.out, f"onnx_models{suffix}.md"), "w") as f:
        f.write(md_text)
    print(md_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
