"""A tiny deterministic ONNX graph builder (names are derived, never random)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # per-channel DequantizeLinear needs >= 13; 17 is what TensorRT and ORT both know well
IR_VERSION = 8  # the IR version of opset 17, so older runtimes load the file


class OnnxBuilder:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self._names: set[str] = set()

    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        if name in self.inits:
            if np.array_equal(numpy_helper.to_array(self.inits[name]), array):
                return name
            name = self._unique(name)
        self._names.add(name)
        self.inits[name] = numpy_helper.from_array(np.array(array, order="C"), name)  # keeps 0-d scalars 0-d
        return name

    def op(self, op_type: str, inputs: list[str], name: str, out: Optional[str] = None, **attrs) -> str:
        node_name = self._unique(f"{name}/{op_type}")
        out = out or node_name + ":0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=node_name, **attrs))
        return out

    def node(self, proto: onnx.NodeProto, name: str) -> list[str]:
        """Append a node copied from a source graph (attributes, subgraphs and domain kept),
        under a unique name, with fresh output names; returns them ("" stays "")."""
        # node names and tensor names are separate namespaces in ONNX: keep the source node's
        # name unless another node already has it
        taken = {n.name for n in self.nodes}
        base, i, node_name = proto.name or name, 1, proto.name or name
        while node_name in taken:
            i += 1
            node_name = f"{base}_{i}"
        proto.name = node_name
        outs = [self._unique(f"{node_name}:{k}") if t else "" for k, t in enumerate(proto.output)]
        del proto.output[:]
        proto.output.extend(outs)
        self.nodes.append(proto)
        return outs

    def rename(self, old: str, new: str) -> None:
        for n in self.nodes:
            for io in (n.input, n.output):
                for i, t in enumerate(io):
                    if t == old:
                        io[i] = new

    def clip(self, x: str, lo: Optional[float], hi: Optional[float], name: str) -> str:
        if lo == 0.0 and hi is None:
            return self.op("Relu", [x], name)
        ins = [x, self.const(f"{name}.clip_min", np.array(lo, np.float32)) if lo is not None else ""]
        if hi is not None:
            ins.append(self.const(f"{name}.clip_max", np.array(hi, np.float32)))
        return self.op("Clip", ins, name)

    def quantize_dequantize(self, x: str, scale: float, zero_point: int, name: str, dtype=np.uint8) -> str:
        s = self.const(f"{name}.scale", np.array(scale, np.float32))
        z = self.const(f"{name}.zero_point", np.array(zero_point, dtype))
        q = self.op("QuantizeLinear", [x, s, z], name)
        return self.op("DequantizeLinear", [q, s, z], name)

    def dequantize(self, name: str, codes: np.ndarray, scale: np.ndarray, axis: int = 0) -> str:
        """Constant integer tensor followed by (per-channel) DequantizeLinear."""
        q = self.const(f"{name}_quantized", codes)
        s = self.const(f"{name}_scale", scale.astype(np.float32))
        z = self.const(f"{name}_zero_point", np.zeros(scale.shape, codes.dtype))
        attrs = {"axis": axis} if scale.ndim == 1 else {}
        return self.op("DequantizeLinear", [q, s, z], name, **attrs)

    def model(self, input_name: str, input_shape: list, outputs: dict[str, list], graph_name: str,
              metadata: dict[str, str], inputs: Optional[list[tuple[str, int, list]]] = None,
              opset: Optional[int] = None, opset_imports: Optional[dict[str, int]] = None) -> onnx.ModelProto:
        """``inputs``, if given, replaces the single float input: (name, TensorProto type, shape)
        per graph input, e.g. int64 token ids and attention mask with dynamic axes."""
        inps = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)] if inputs is None else \
            [helper.make_tensor_value_info(name, elem, shape) for name, elem, shape in inputs]
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in outputs.items()]
        graph = helper.make_graph(self.nodes, graph_name, inps, outs, initializer=list(self.inits.values()))
        opset = max(OPSET, opset or OPSET)
        domains = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in sorted((opset_imports or {}).items())
                                                      if d not in ("", "ai.onnx")]
        m = helper.make_model(graph, opset_imports=domains, producer_name="qwt-deploy")
        # the IR version of the opset, so older runtimes load the file (opset 17: 8; 18-20: 9; 21+: 10)
        m.ir_version = IR_VERSION if opset == OPSET else (9 if opset <= 20 else 10)
        for k in sorted(metadata):
            m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(metadata[k])))
        return m
