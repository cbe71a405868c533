"""The one way a rewriting graph pass runs: ModelProto -> gs.Graph -> pass -> cleanup/toposort -> ModelProto.

Why a scaffold: ``gs.export_onnx`` builds a new ModelProto. It keeps the graph, the opset
imports, the producer and the IR version, but drops the model-level fields onnx-graphsurgeon
does not model: ``metadata_props`` (qwt-export's deployment metadata: preprocessing, labels,
versions), ``doc_string``, ``domain`` and ``model_version``. Passes that exported by hand kept
some of them and dropped others. :func:`run_pass` is the only place that decides what survives
a pass, so every pass keeps the same things, and every pass ends with
``graph.cleanup().toposort()``.

A pass is written ONNX Runtime QDQ-transformer style: a *selector* (a pure function of one node
that returns a match or None, stating its preconditions) and an *action* (the rewrite of one
match). :func:`apply_all` runs them, :func:`run_pass` wraps the whole thing::

    def my_pass(model):
        return run_pass(model, lambda graph: len(apply_all(graph, select_x, rewrite_x)))
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import onnx
import onnx_graphsurgeon as gs

T = TypeVar("T")
M = TypeVar("M")

# ModelProto fields copied from the input when it sets them (presence-aware, so a model without
# them serializes exactly as gs.export_onnx writes it). gs already writes the producer and
# the IR version from the imported graph; copying them again is a no-op that pins the contract.
_MODEL_FIELDS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")


def run_pass(model: onnx.ModelProto, apply: Callable[[gs.Graph], T]) -> tuple[onnx.ModelProto, T]:
    """Import ``model``, call ``apply(graph)``, run ``graph.cleanup().toposort()``, export.

    Returns the new model and what ``apply`` returned (for the passes: how many matches were
    rewritten). Kept from ``model``: metadata_props, opset imports (plus any domain a new node
    uses), ir_version, producer name/version, model and graph doc strings, domain,
    model_version. ``model`` itself is not modified.
    """
    graph = gs.import_onnx(model)
    # gs keeps a reference to model.opset_import and appends newly used domains to it on export
    graph.import_domains = [_copy(o) for o in model.opset_import]
    result = apply(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    for field in _MODEL_FIELDS:
        if model.HasField(field):
            setattr(out, field, getattr(model, field))
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out, result


def apply_all(graph: gs.Graph, select: Callable[[gs.Node], Optional[M]],
              action: Callable[[gs.Graph, M], None]) -> list[M]:
    """Select on every node first, then apply ``action`` to each match in graph order.

    Selecting before rewriting means an action never changes what another node matches, and
    the nodes an action appends are not visited. Returns the matches."""
    matches = [m for m in (select(n) for n in list(graph.nodes)) if m is not None]
    for m in matches:
        action(graph, m)
    return matches


def _copy(opset: onnx.OperatorSetIdProto) -> onnx.OperatorSetIdProto:
    c = onnx.OperatorSetIdProto()
    c.CopyFrom(opset)
    return c
