"""Two small Fashion-MNIST classifiers trained in this repo (``scripts/train_fashion_mnist.py``)
whose weights ship with the package (``weights/fashion_{cnn,vit}.pt``), so that quantization
accuracy can be measured against real labels on the 10,000 test images.

Both take ``N x 1 x 28 x 28`` float32 normalised as ``(pixel - 72.94) / 90.02`` on 0..255
(:mod:`qwt_deploy.data.fashion_mnist`) and return 10 logits.

- :class:`FashionCNN`: a ResNet-style CNN (conv-BN-ReLU, residual blocks of two 3x3 convs,
  stride-2 blocks with a 1x1 projection shortcut, global average pooling, Linear). It has the
  residual-block structure that QwT (v1) compensates block by block.
- :class:`FashionViT`: a small pre-norm Vision Transformer written with plain ops on purpose,
  so that ``torch.export`` shows every matmul and a converter can map each one: Conv2d patch
  embedding, flatten+transpose, a learnable position embedding added as a parameter,
  LayerNorm, separate Linear q/k/v, reshape/transpose into heads, ``q @ k^T * scale``,
  softmax, ``@ v``, Linear projection, residual adds, a GELU MLP, a final LayerNorm, mean
  pooling over tokens and a Linear head. No ``nn.MultiheadAttention``: its fused kernel
  hides the two activation x activation matmuls that INT8 attention has to quantize. Mean
  pooling instead of a class token avoids a cat with an expanded parameter. Shapes are taken
  from the input (``x.shape``), so batch and token count can be dynamic in an export.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


# ---------------------------------------------------------------------------- ResNet-style CNN
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN, ReLU between and after the residual add. A block that changes stride
    or width gets a 1x1 conv-BN projection shortcut with the block's stride."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x if self.shortcut is None else self.shortcut(x)
        return F.relu(y + s)


class FashionCNN(nn.Module):
    """stem 1->16 @28x28, blocks 16 @28, 16->32 /2 @14, 32->64 /2 @7, 64->128 /2 @4, GAP, Linear(128, 10).

    Narrow at full resolution and wide at low resolution, so that a training epoch costs about
    13 M multiply-adds per image: the weights are retrained on 2 shared CPU cores."""

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 64, 128), num_classes: int = 10):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(w1, w1), BasicBlock(w1, w2, 2), BasicBlock(w2, w3, 2),
                                    BasicBlock(w3, w4, 2))
        self.fc = nn.Linear(w4, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


# ---------------------------------------------------------------------------- small ViT
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, t):  # B x N x D -> B x H x N x d
        b, n = t.shape[0], t.shape[1]
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self._split_heads(self.q(x)), self._split_heads(self.k(x)), self._split_heads(self.v(x))
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(y)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FashionViT(nn.Module):
    """Patch 4 (7x7 = 49 tokens), dim 64, depth 4, 4 heads, MLP ratio 2, mean pooling."""

    def __init__(self, patch: int = 4, dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2,
                 num_classes: int = 10, image: int = 28):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # B x N x D
        x = x + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


MODELS = {"cnn": FashionCNN, "vit": FashionViT}


def weights_path(kind: str) -> str:
    return os.path.join(WEIGHTS_DIR, f"fashion_{kind}.pt")


def _build(kind: str) -> nn.Module:
    from ..errors import QwtError

    model = MODELS[kind]()
    path = weights_path(kind)
    if not os.path.isfile(path):
        raise QwtError(f"the Fashion-MNIST {kind} weights {path} are missing",
                       f"train them: python scripts/train_fashion_mnist.py --model {kind}")
    # weights_only=True: a state dict of tensors, never unpickled code.
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def build_cnn() -> nn.Module:
    """The trained ResNet-style CNN (factory for ``--model-factory`` and ``--example fashion-cnn``)."""
    return _build("cnn")


def build_vit() -> nn.Module:
    """The trained small ViT (factory for ``--model-factory`` and ``--example fashion-vit``)."""
    return _build("vit")
