#!/usr/bin/env python
"""Train the built-in Fashion-MNIST examples and write their weights into the package.

    python scripts/train_fashion_mnist.py --model cnn            # ResNet-style CNN, 4 epochs
    python scripts/train_fashion_mnist.py --model vit            # small ViT, 8 epochs
    python scripts/train_fashion_mnist.py --model vit --epochs 2 --out-dir /tmp/w   # quick try

Needs the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
Trains on the 60k training images (the CNN with random 2-pixel shifts and flips), AdamW with a
linear warm-up and cosine decay, then reports accuracy on all 10k test images. Writes
``fashion_<model>.pt`` (a float32 state dict, loaded back with ``torch.load(weights_only=True)``)
and ``fashion_<model>.json`` (accuracy, epochs, wall time, seed, settings, versions) beside it.

Deterministic: the same seed, thread count and torch version give the same weights, because
shuffling and augmentation draw from one seeded generator and torch's CPU kernels are run
with ``torch.use_deterministic_algorithms``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from qwt_deploy.atomic import atomic_write_bytes
from qwt_deploy.data import fashion_mnist as fm
from qwt_deploy.errors import QwtError
from qwt_deploy.examples.fashion_mnist import MODELS, WEIGHTS_DIR

# Settings chosen to fit a few minutes of 2-core CPU training each.
# The ViT gets no augmentation and no label smoothing: in a few epochs it underfits (4 epochs
# with shifts, flips and smoothing 0.1 reached 81.1%, without them 85.1%, 8 epochs 87.7%).
DEFAULTS = {"cnn": dict(epochs=4, lr=3e-3, weight_decay=5e-4, batch_size=128, warmup=0.1, label_smoothing=0.0,
                        augment=True),
            "vit": dict(epochs=8, lr=2e-3, weight_decay=0.05, batch_size=128, warmup=0.1, label_smoothing=0.0,
                        augment=False)}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to 2 pixels (zero padding) and a random horizontal flip, per sample."""
    b = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    oy = torch.randint(0, 5, (b,), generator=gen)
    ox = torch.randint(0, 5, (b,), generator=gen)
    ar = torch.arange(28)
    rows = (oy[:, None] + ar)[:, :, None]
    cols = (ox[:, None] + ar)[:, None, :]
    out = padded[torch.arange(b)[:, None, None], rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.where(flip[:, None, None], out.flip(-1), out)
    return out[:, None]


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--epochs", type=int, help="default: cnn 4, vit 8")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=WEIGHTS_DIR, help=f"default: the package's weights folder ({WEIGHTS_DIR})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    hp = dict(DEFAULTS[a.model])
    for k in ("epochs", "lr", "batch_size"):
        if getattr(a, k) is not None:
            hp[k] = getattr(a, k)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        x_train, y_train = fm.subset("train", None, None)
        x_test, y_test = fm.test_images()
    except QwtError as e:
        print(f"train_fashion_mnist: error: {e}", file=sys.stderr)
        return 2
    xt, yt = torch.from_numpy(x_train[:, 0]), torch.from_numpy(y_train)

    model = MODELS[a.model]()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=hp["lr"])
    steps_per_epoch = math.ceil(len(xt) / hp["batch_size"])
    total = steps_per_epoch * hp["epochs"]
    warm = max(1, int(hp["warmup"] * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    gen = torch.Generator().manual_seed(a.seed)

    print(f"training fashion-{a.model}: {n_params:,} parameters, {hp['epochs']} epochs, {a.threads} threads, "
          f"seed {a.seed}", file=sys.stderr)
    from tqdm import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"train {a.model}", unit="step", file=sys.stderr, disable=a.quiet)
    for epoch in range(hp["epochs"]):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        run_loss, run_acc = 0.0, 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * hp["batch_size"]:(s + 1) * hp["batch_size"]]
            xb, yb = (augment(xt[idx], gen) if hp["augment"] else xt[idx][:, None]), yt[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=hp["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss = 0.98 * run_loss + 0.02 * float(loss) if s else float(loss)
            run_acc = 0.98 * run_acc + 0.02 * float((logits.argmax(1) == yb).float().mean()) if s else 0.0
            bar.update(1)
            bar.set_postfix_str(f"epoch {epoch + 1} loss {run_loss:.3f} acc {run_acc:.3f}")
    bar.close()
    train_s = time.perf_counter() - t0
    acc = evaluate(model, x_test, y_test)
    print(f"fashion-{a.model}: test accuracy {acc * 100:.2f}% on {len(x_test)} images, training {train_s:.0f} s",
          file=sys.stderr)

    os.makedirs(a.out_dir, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, buf)
    data = buf.getvalue()
    wpath = os.path.join(a.out_dir, f"fashion_{a.model}.pt")
    atomic_write_bytes(wpath, data)
    os.chmod(wpath, 0o644)  # the temp file behind the atomic write is private (0600); these ship
    info = dict(model=f"fashion-{a.model}", architecture=type(model).__name__, parameters=n_params,
                test_accuracy=round(acc, 4), test_samples=len(x_test), epochs=hp["epochs"],
                train_seconds=round(train_s, 1), seed=a.seed, threads=a.threads, hyperparameters=hp,
                augmentation="random shift <=2 px (zero pad) + horizontal flip" if hp["augment"] else "none",
                data="Debian dataset-fashion-mnist, 60k train / 10k test, normalised (x - 72.94) / 90.02",
                weights_file=os.path.basename(wpath), weights_bytes=len(data),
                weights_sha256=hashlib.sha256(data).hexdigest(),
                provenance=dict(script="scripts/train_fashion_mnist.py", command=" ".join(sys.argv),
                                torch=torch.__version__, numpy=np.__version__, python=platform.python_version(),
                                machine=platform.machine(), cpu_count=os.cpu_count(),
                                finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
    atomic_write_bytes(os.path.join(a.out_dir, f"fashion_{a.model}.json"),
                       (json.dumps(info, indent=2) + "\n").encode())
    os.chmod(os.path.join(a.out_dir, f"fashion_{a.model}.json"), 0o644)
    print(f"wrote {wpath} ({len(data) / 1e6:.2f} MB) and fashion_{a.model}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
