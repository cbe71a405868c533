"""Deployment targets, one module each (:mod:`.ort`, :mod:`.trt`). Adding a backend means
adding one module with a :class:`Target` and listing it in :data:`TARGETS`."""

from __future__ import annotations

from ..errors import QwtError
from .base import ExecutionProviderPath, Target
from .ort import ORT
from .trt import TRT

TARGETS: dict[str, Target] = {t.name: t for t in (ORT, TRT)}


def get_target(target: "str | Target") -> Target:
    """The :class:`Target` for a name (``"ort"``, ``"trt"``) or the target itself."""
    if isinstance(target, Target):
        return target
    if target not in TARGETS:
        raise QwtError(f"target {target!r} is not available in this build (have: {', '.join(sorted(TARGETS))})",
                       f"use one of {', '.join(sorted(TARGETS))}")
    return TARGETS[target]


__all__ = ["Target", "ExecutionProviderPath", "TARGETS", "get_target", "ORT", "TRT"]
