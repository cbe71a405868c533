"""The key each ONNX node has in the pipeline: the IR node's name, the float-node runner's key,
and what ``runtime.coverage`` maps ORT's kernels back to. Its own module, without torch, so that
the torch-free runtime side can use the same rule."""

from __future__ import annotations

import onnx


def node_names(graph: onnx.GraphProto) -> list[str]:
    """A unique, stable key per node, in graph order: its name, or ``<op_type>_<index>`` if it
    has none, with ``#<n>`` appended to repeats."""
    seen: dict[str, int] = {}
    out = []
    for i, n in enumerate(graph.node):
        key = n.name or f"{n.op_type}_{i}"
        if key in seen:
            seen[key] += 1
            key = f"{key}#{seen[key]}"
        seen.setdefault(key, 0)
        out.append(key)
    return out
