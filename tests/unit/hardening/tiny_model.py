"""A tiny image model for the hardening tests, made with onnx.helper (no export, no torch):
input N x 1 x 28 x 28 float (grey, like fashion-cnn), output N x 10, with the edge metadata
qwt-export writes (image preprocessing resize 28 / crop 28, ten labels); and an in-process
qwt-serve on 127.0.0.1 for it."""

from __future__ import annotations

import http.client
import json
import os
import threading

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwt_deploy.edge.metadata import export_metadata

SAMPLE = (1, 28, 28)


def write_tiny_model(path: str) -> str:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((28 * 28, 10)).astype(np.float32) * 0.01, "w")
    shape = numpy_helper.from_array(np.array([-1, 28 * 28], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SAMPLE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [w, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    labels = os.path.join(os.path.dirname(path), "tiny-labels.txt")
    with open(labels, "w") as f:
        f.write("\n".join(f"class{i}" for i in range(10)) + "\n")
    meta = export_metadata(dict(resize=28, crop=28, mean=[72.9], std=[90.0]), SAMPLE, "photos/", labels)
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, path)
    return path


class InProcessServer:
    """EdgeServer on an ephemeral port in a thread of this process."""

    def __init__(self, model_path: str, **cfg):
        from qwt_deploy.edge.model import EdgeModel
        from qwt_deploy.edge.server import EdgeServer, ServeConfig

        self.srv = EdgeServer(EdgeModel(model_path), ServeConfig(port=0, max_wait_ms=1, **cfg))
        self.port = self.srv.server_address[1]
        self.thread = threading.Thread(target=self.srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
        self.thread.start()

    def request(self, method, path, body=None, headers=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, r.getheader("Content-Type", ""), r.read()
        finally:
            c.close()

    def predict_ok(self) -> bool:
        x = np.zeros((1, *SAMPLE), np.float32)
        status, _, body = self.request("POST", "/v1/predict", json.dumps({"shape": [1, *SAMPLE], "data": x.tolist()}),
                                       {"Content-Type": "application/json"})
        return status == 200 and len(json.loads(body)["top_k"][0]) == 5

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()
