"""Text calibration data: real English sentences and token-id batches for transformer models.

Sentences come from Python's own bundled documentation (``pydoc_data.topics``: the language
reference topics that ``help()`` shows), so every install has them, offline. Prose only:
code, grammar productions and tables are filtered out. Calibration and evaluation sentences
are disjoint by construction (one fixed permutation, split once), so accuracy is measured on
sentences the calibration never saw.

Token batches are ``(input_ids, attention_mask)`` int64 pairs, each batch padded to its own
longest sentence. Sentences are sorted by length before batching: less padding means the
ranges and the CWAC fit are dominated by real tokens, not by padding positions.

A user's own text calibration set is an ``.npz`` with the named arrays ``input_ids`` and
``attention_mask`` (N x S int64, right-padded); ``qwt_deploy.data.inputs`` loads and validates it.
"""

from __future__ import annotations

import re

import numpy as np


EVAL_SENTENCES = 256  # held out for accuracy; never used for calibration
_SPLIT_SEED = 12345  # fixed: the calibration/evaluation split never depends on --seed


def _is_prose(s: str) -> bool:
    words = s.split()
    if not 6 <= len(words) <= 60:
        return False
    if any(tok in s for tok in ("::=", ">>>", "...", "|", "{", "}", "==", "__", "\\")):
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters / len(s) > 0.85 and s[0].isupper() and s[-1] in ".!?"


def pydoc_sentences() -> list[str]:
    """All distinct prose sentences of ``pydoc_data.topics``, in a fixed order."""
    from pydoc_data.topics import topics

    seen, out = set(), []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            s = s.strip()
            if s not in seen and _is_prose(s):
                seen.add(s)
                out.append(s)
    return out


def split_sentences(n_calib: int, n_eval: int = EVAL_SENTENCES, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint (calibration, evaluation) sentences. The split is fixed; ``seed`` only picks
    which calibration sentences are used when fewer than all are asked for."""
    all_s = pydoc_sentences()
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(all_s))
    evaluation = [all_s[i] for i in perm[:n_eval]]
    pool = [all_s[i] for i in perm[n_eval:]]
    pick = np.random.default_rng(seed).permutation(len(pool))[:n_calib]
    return [pool[i] for i in sorted(pick)], evaluation


def tokenize(tokenizer, sentences: list[str], max_length: int = 128) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def token_batches(input_ids: np.ndarray, attention_mask: np.ndarray, batch_size: int):
    """List of (ids, mask) torch int64 batches, longest sentences first, each trimmed to its
    longest sentence (the batching every token model gets: qwt_deploy.data.inputs.InputSet)."""
    from .inputs import InputSet

    return [b.torch() for b in InputSet(("input_ids", "attention_mask"), (input_ids, attention_mask)).batches(batch_size)]
