"""Residual blocks of the IR, for QwT (v1) block compensation.

QwT adds one linear branch per residual block: ``Y' = Y + W·X + b``, with X the value that
enters the block and Y the value that leaves it. This module finds those blocks and inserts
one ``qwt_branch`` node per block into a copy of the graph.

The rule (explainable, and the same for CNNs and transformers)
---------------------------------------------------------------
1. **Cut values.** Walking the nodes in topological order, a value is a *cut* if, right
   after it is produced, it is the only value still to be read (the whole state of the
   network is that one tensor). Between two consecutive cuts lies a *segment*: the smallest
   single-entry, single-exit region. A plain layer in a chain is a segment of one node; a
   residual block ``Y = Add(X, f(X))`` is one segment, from X to the Add, because X stays
   live until the Add reads it. Side values (an attention mask and what is computed from it
   alone, see :func:`main_values`) are not counted: they stay live through every block.
2. **Grouping by module path.** Weighted nodes are named after their module path
   (``_blocks.3._expand_conv``, ``layer1.0.conv1``, ``encoder.layer.2.attention.self.query``).
   The regex ``pattern`` (default :data:`DEFAULT_PATTERN`: everything up to the first
   ``.<index>.``) maps a name to its block key (``_blocks.3``, ``layer1.0``,
   ``encoder.layer.2``). A block is the run of consecutive segments from the first to the
   last segment that holds a node of that key; it must hold no node of another key and at
   least ``min_weighted`` weighted nodes (a single layer is CWAC's job, not a block's).
   Block X = the cut before its first segment, Y = the cut after its last one.
3. **Fallback ``residual``.** Where no name matches (a model without indexed submodules),
   every multi-node segment that contains a weighted node is a block: exactly the regions
   ``Y = merge(X, f(X))`` of residual networks.

Why cuts rather than "nodes whose name starts with the key": node names exist only for
weighted nodes (an Add is named ``add_3``), and a pre-norm transformer's LayerNorm or a
ResNet's residual Add must belong to the block whose X it reads. Cuts place every node
without looking at names, and guarantee the property QwT needs: Y depends on the rest of the
network only through X, so ``Y_fp = block_FP(X_q)`` is well defined.

Values between blocks that belong to no block (a post-norm transformer's LayerNorm after the
residual Add, a stem, a head) stay uncompensated by QwT; CWAC can still cover their layers.

X and Y may differ in channels and resolution: the CNN branch is then a 1x1 (grouped)
convolution with the block's stride, mapping C_in to C_out, as QwT's reference code does for
ResNet downsample blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .ir import Graph, Node
from .ops import OPS, OpSpec, Role

DEFAULT_PATTERN = r"^(.*?\.\d+)\."
QWT_BRANCH = "qwt_branch"


def _identity_forward(node, xs, w, b):
    """Without a fitted branch (float model, or R^2 <= 0) the node passes Y through."""
    return xs[1]


def _identity_emit(g, node, ins, w, b):
    return ins[1]


# Registered here, not in ops.py, because only graphs made by insert_qwt_branches hold it.
# FLOAT role: each target's placement decides the quantizers around it (ONNX Runtime: Y keeps
# its output quantizer, the branch sum gets its own; TensorRT: Y stays float).
OPS.setdefault(QWT_BRANCH, OpSpec(QWT_BRANCH, Role.FLOAT, _identity_forward, _identity_emit))


@dataclass
class Block:
    name: str  # block key, e.g. "_blocks.3"
    x: str  # value entering the block
    y: str  # value leaving the block
    nodes: list[str] = field(default_factory=list)  # node names, topological order
    weighted: int = 0


def main_values(graph: Graph) -> set[str]:
    """Values that depend on the primary input ``graph.inputs[0]``. The rest (an attention
    mask and what is computed from it alone) are *side* values: constant along the network's
    main path, read by many blocks, and never a reason to merge blocks."""
    main = {graph.inputs[0]}
    for n in graph.nodes:
        if any(v in main for v in n.inputs):
            main.add(n.output)
    return main


def cut_values(graph: Graph) -> list[tuple[int, str]]:
    """(index of the producing node, value) for every cut; index -1 is the graph input.
    Only main values count as live (see :func:`main_values`)."""
    last = graph.last_use()
    main = main_values(graph)
    live = {graph.inputs[0]}
    cuts = [(-1, graph.inputs[0])]
    for i, n in enumerate(graph.nodes):
        if n.output not in main:
            continue
        live.add(n.output)
        live = {v for v in live if last.get(v, -1) > i}
        if live == {n.output}:
            cuts.append((i, n.output))
    return cuts


def _segments(graph: Graph) -> list[tuple[str, str, list[int]]]:
    """(entry value, exit value, main-path node indices) between consecutive cuts."""
    cuts = cut_values(graph)
    main = main_values(graph)
    return [(v0, v1, [i for i in range(i0 + 1, i1 + 1) if graph.nodes[i].output in main])
            for (i0, v0), (i1, v1) in zip(cuts, cuts[1:])]


def detect_blocks(graph: Graph, pattern: str = "auto", min_weighted: int = 2) -> list[Block]:
    """Blocks by module path (``pattern``: a regex whose group 1, or whole match, is the block
    key; ``"auto"``: :data:`DEFAULT_PATTERN`, falling back to ``"residual"`` if it finds none;
    ``"residual"``: multi-node segments)."""
    if pattern == "auto":
        found = detect_blocks(graph, DEFAULT_PATTERN, min_weighted)
        return found or detect_blocks(graph, "residual", min_weighted)
    segs = _segments(graph)
    nodes = graph.nodes
    if pattern == "residual":
        out = []
        for x, y, idx in segs:
            w = sum(OPS[nodes[i].op].role is Role.WEIGHTED for i in idx)
            if len(idx) > 1 and w >= 1:
                out.append(Block(name=nodes[idx[0]].name, x=x, y=y, nodes=[nodes[i].name for i in idx], weighted=w))
        return out
    rx = re.compile(pattern)

    def key(n: Node) -> Optional[str]:
        m = rx.match(n.name)
        if not m:
            return None
        return m.group(1) if m.groups() else m.group(0)

    seg_keys = [{key(nodes[i]) for i in idx} - {None} for _, _, idx in segs]
    order: list[str] = []
    for ks in seg_keys:
        for k in sorted(ks):
            if k not in order:
                order.append(k)
    out = []
    for k in order:
        where = [j for j, ks in enumerate(seg_keys) if k in ks]
        lo, hi = where[0], where[-1]
        if any(ks - {k} for ks in seg_keys[lo:hi + 1]):
            continue  # shares a single-entry region with another block: no clean X -> Y
        idx = [i for j in range(lo, hi + 1) for i in segs[j][2]]
        w = sum(OPS[nodes[i].op].role is Role.WEIGHTED for i in idx)
        if w < min_weighted:
            continue
        out.append(Block(name=k, x=segs[lo][0], y=segs[hi][1], nodes=[nodes[i].name for i in idx], weighted=w))
    return out


def branch_node_name(block: Block) -> str:
    return f"{block.name}.qwt_branch"


def insert_qwt_branches(graph: Graph, blocks: list[Block]) -> Graph:
    """A copy of ``graph`` with a ``qwt_branch`` node (inputs X, Y; output Y') after each
    block's Y; every former reader of Y (and a graph output Y) reads Y' instead. The original
    graph and its nodes are not modified."""
    nodes = list(graph.nodes)
    outputs = list(graph.outputs)
    out_shapes = dict(graph.output_shapes)
    rename: dict[str, str] = {}
    for blk in blocks:
        x = rename.get(blk.x, blk.x)
        y_new = f"{blk.y}.qwt"
        inside = {n.output for n in graph.nodes if n.name in set(blk.nodes)}
        side = sorted({v for n in graph.nodes if n.name in set(blk.nodes) for v in n.inputs} - inside - {blk.x})
        # side values (an attention mask) are inputs of the branch node too, so
        # calibration keeps them until the block's full-precision rerun
        br = Node(name=branch_node_name(blk), op=QWT_BRANCH, inputs=[x, blk.y] + side, output=y_new,
                  attrs={"block": blk.name, "block_nodes": list(blk.nodes), "x": x})
        pos = max(i for i, n in enumerate(nodes) if n.output == blk.y)
        for i in range(pos + 1, len(nodes)):
            n = nodes[i]
            if blk.y in n.inputs:
                nodes[i] = replace(n, inputs=[y_new if v == blk.y else v for v in n.inputs])
        nodes.insert(pos + 1, br)
        if blk.y in outputs:
            outputs = [y_new if v == blk.y else v for v in outputs]
            out_shapes[y_new] = out_shapes.pop(blk.y)
        rename[blk.y] = y_new
    dims = {rename.get(k, k): v for k, v in getattr(graph, "dim_names", {}).items()}
    extra = {"dim_names": dims} if hasattr(graph, "dim_names") else {}
    return replace(graph, nodes=nodes, outputs=outputs, output_shapes=out_shapes, **extra)  # keeps dtypes etc.


def branch_nodes(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op == QWT_BRANCH]


def value_shapes(graph: Graph, example: Optional[torch.Tensor] = None) -> dict[str, tuple]:
    """Shapes of every value from one float forward pass on zeros (batch 1)."""
    x = example if example is not None else torch.zeros((1,) + tuple(graph.input_shapes[graph.inputs[0]][1:]))
    env = {graph.inputs[0]: x}
    shapes = {graph.inputs[0]: tuple(x.shape)}
    with torch.no_grad():
        for n in graph.nodes:
            y = OPS[n.op].forward(n, [env[v] for v in n.inputs], n.weight, n.bias)
            if n.activation is not None:
                y = n.activation.apply(y)
            env[n.output] = y
            shapes[n.output] = tuple(y.shape)
    return shapes


def describe_blocks(graph: Graph, blocks: list[Block]) -> list[dict]:
    """One row per block: nodes, X/Y shapes and the stride a 1x1 branch needs (for docs/CLI)."""
    shapes = value_shapes(graph)
    rows = []
    for b in blocks:
        sx, sy = shapes[b.x], shapes[b.y]
        stride = (-(-sx[2] // sy[2])) if len(sx) == 4 and len(sy) == 4 and sy[2] else 1
        rows.append(dict(block=b.name, x=b.x, y=b.y, nodes=len(b.nodes), weighted=b.weighted,
                         x_shape=list(sx[1:]), y_shape=list(sy[1:]), stride=int(stride)))
    return rows
