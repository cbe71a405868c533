"""Model inputs for calibration and checking: one array per graph input, N samples each.

Image models take one float tensor; token models (BERT, MiniLM) take ``input_ids`` and
``attention_mask``. Every pipeline step downstream of data loading (batching for the
calibration, the PyTorch simulation, ONNX Runtime feeds, the latency probe) goes through an
:class:`InputSet`, so neither the pipeline nor ``qwt-check`` has to branch on the model kind.

Why batches of token inputs are sorted and trimmed: sentences have different lengths and are
right-padded to the longest in the set. Sorted by length, each batch is cut to its own longest
sentence, so activation ranges and the CWAC fit are dominated by real tokens, not by padding
positions (which the attention mask hides from every output, but not from per-tensor ranges),
and calibration does not run attention over hundreds of padding tokens.

A user's calibration file for a multi-input model is an ``.npz`` with one array per model
input, named as the inputs are (the names the ONNX file and ``torch.export`` show; e.g.
``numpy.savez("calib.npz", input_ids=ids, attention_mask=mask)``).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from qwt_deploy.errors import QwtError

MASK_NAME = "attention_mask"  # Hugging Face's name; the axis it covers is the one trimmed


@dataclass(frozen=True)
class InputSet:
    """``names[k]`` -> ``arrays[k]`` (N first), in the graph's input order."""

    names: tuple[str, ...]
    arrays: tuple[np.ndarray, ...]

    @classmethod
    def single(cls, name: str, x: np.ndarray) -> "InputSet":
        return cls((name,), (x,))

    def __len__(self) -> int:
        return int(self.arrays[0].shape[0])

    @property
    def is_single(self) -> bool:
        return len(self.arrays) == 1

    @property
    def first(self) -> np.ndarray:
        return self.arrays[0]

    def _mask(self) -> Optional[np.ndarray]:
        return self.arrays[self.names.index(MASK_NAME)] if MASK_NAME in self.names else None

    def take(self, index) -> "InputSet":
        """Rows ``index`` (a slice or index array), trimmed to their longest sentence."""
        arrays = tuple(a[index] for a in self.arrays)
        mask = arrays[self.names.index(MASK_NAME)] if MASK_NAME in self.names else None
        if mask is not None and mask.ndim == 2 and len(mask):
            s = max(int(mask.sum(1).max()), 1)
            arrays = tuple(np.ascontiguousarray(a[:, :s]) if a.ndim >= 2 and a.shape[1] == mask.shape[1] else a
                           for a in arrays)
        return InputSet(self.names, arrays)

    def head(self, n: int) -> "InputSet":
        return self.take(slice(0, n))

    def tail(self, n: int) -> "InputSet":
        return self.take(slice(max(len(self) - n, 0), len(self)))

    def order(self) -> np.ndarray:
        """Longest sentence first when there is an attention mask; else the stored order."""
        mask = self._mask()
        if mask is None or mask.ndim != 2:
            return np.arange(len(self))
        return np.argsort(-mask.sum(1), kind="stable")

    def batches(self, batch_size: int) -> list["InputSet"]:
        if self._mask() is None:  # slices: views, no copy of a large image set
            return [self.take(slice(i, i + batch_size)) for i in range(0, len(self), batch_size)]
        idx = self.order()
        return [self.take(idx[i:i + batch_size]) for i in range(0, len(idx), batch_size)]

    def calibration_batches(self, batch_size: int) -> list:
        """Batches as ``calibrate`` takes them: a tensor (one input) or a tuple of tensors each."""
        return [b.torch() for b in self.batches(batch_size)]

    def torch(self):
        """A tensor (one input) or a tuple of tensors, as ``SimulatedModel``/``calibrate`` take them."""
        import torch

        ts = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in self.arrays)  # copies only if strided
        return ts[0] if self.is_single else ts

    def feed(self, session) -> dict:
        """ONNX Runtime feed: the exported graph keeps the inputs in this order."""
        return {i.name: a for i, a in zip(session.get_inputs(), self.arrays)}


def load_named_arrays(path: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` that a multi-input model needs, by input name."""
    fix = "save one array per model input: numpy.savez(path, " + ", ".join(f"{n}=..." for n in names) + ")"
    try:
        if not zipfile.is_zipfile(path):
            raise QwtError(f"{path} is not an .npz archive, but the model takes {len(names)} inputs "
                           f"({', '.join(names)})", fix)
        with np.load(path, allow_pickle=False) as z:
            missing = [n for n in names if n not in z]
            if missing:
                raise QwtError(f"{path} holds {', '.join(z.keys()) or 'no arrays'} but the model also needs "
                               f"{', '.join(missing)}", fix)
            return {n: z[n] for n in names}
    except QwtError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise QwtError(f"{path} is not a readable .npz ({type(e).__name__})", fix) from None


def validate_inputs(arrays: dict[str, np.ndarray], graph, source: str) -> InputSet:
    """Check N, dtypes, fixed axes, finiteness, and the attention mask; one-line errors."""
    import torch

    names = tuple(graph.inputs)
    ns = {n: arrays[n].shape[0] if arrays[n].ndim else 0 for n in names}
    if len(set(ns.values())) != 1:
        raise QwtError(f"calibration data {source}: the inputs hold different sample counts "
                       f"({', '.join(f'{k} {v}' for k, v in ns.items())})", "store N samples of every input")
    if ns[names[0]] == 0:
        raise QwtError(f"calibration data {source} is empty", "provide at least one sample (512 recommended)")
    seq_len = {}
    out = []
    for n in names:
        a = arrays[n]
        dims = graph.dims(n)
        if a.ndim != len(dims):
            raise QwtError(f"calibration data {source}: {n} has shape {a.shape} but the model takes "
                           f"{' x '.join(str(d) for d in dims)}", f"store {n} with {len(dims)} axes, N first")
        for axis, d in enumerate(dims[1:], 1):
            if isinstance(d, int) and a.shape[axis] != d:
                raise QwtError(f"calibration data {source}: {n} has {a.shape[axis]} on axis {axis}, the model takes {d}",
                               f"preprocess {n} to the model's input shape")
            if isinstance(d, str) and seq_len.setdefault(d, a.shape[axis]) != a.shape[axis]:
                raise QwtError(f"calibration data {source}: inputs disagree on axis '{d}' "
                               f"({seq_len[d]} vs {a.shape[axis]} in {n})", "pad every input to the same length")
        if graph.is_float_input(n):
            if not np.issubdtype(a.dtype, np.number):
                raise QwtError(f"calibration data {source}: {n} has dtype {a.dtype}", "store float32 numbers")
            a = a.astype(np.float32, copy=False)
            if not np.isfinite(a).all():
                raise QwtError(f"calibration data {source}: {n} contains NaN/Inf", "clean or re-preprocess the data")
        else:
            if not np.issubdtype(a.dtype, np.integer):
                raise QwtError(f"calibration data {source}: {n} has dtype {a.dtype}, the model takes integers",
                               f"store {n} as int64 token ids / mask values")
            a = a.astype(np.dtype(str(graph.input_dtypes.get(n, torch.int64)).replace("torch.", "")), copy=False)
        out.append(a)
    if MASK_NAME in names:
        mask = out[names.index(MASK_NAME)]
        if not np.isin(mask, (0, 1)).all() or (mask.ndim == 2 and (mask.sum(1) == 0).any()):
            raise QwtError(f"calibration data {source}: {MASK_NAME} must be 0/1 with at least one 1 per row",
                           "re-tokenize the text (padding=True)")
    vocab = _vocabulary_sizes(graph)
    for n, size in vocab.items():
        a = out[names.index(n)]
        if a.min() < 0 or a.max() >= size:
            raise QwtError(f"calibration data {source}: {n} holds ids in [{int(a.min())}, {int(a.max())}] but the "
                           f"model's embedding table has {size} rows", "tokenize with the model's own tokenizer")
    return InputSet(names, tuple(out))


def _vocabulary_sizes(graph) -> dict[str, int]:
    """Rows of the embedding table that reads each integer graph input directly."""
    sizes = {}
    for node in graph.nodes:
        if node.op == "embedding" and node.inputs and node.inputs[0] in graph.inputs and node.weight is not None:
            sizes[node.inputs[0]] = int(node.weight.shape[0])
    return sizes
