"""MTCNN's PNet, RNet and ONet with facenet-pytorch's pretrained weights (a third-party model
the tests and ``bench/bench_onnx_models.py`` quantize through the ONNX route).

``facenet_pytorch/__init__`` and ``models/utils/detect_face`` import torchvision, which does not
import beside this torch, so ``models/mtcnn.py`` is loaded by file path under a stub parent
package that answers its one relative import. Weights: ``torch.load(weights_only=True)``."""

from __future__ import annotations

import importlib.util
import os
import sys
import types

from ..errors import QwtError

INSTALL = ("pip install --no-deps facenet-pytorch==2.6.0 "
           "(never without --no-deps: it would pull a CUDA torch)")


def available() -> bool:
    return importlib.util.find_spec("facenet_pytorch") is not None


def build_nets() -> dict:
    """``{"pnet", "rnet", "onet"}`` -> the nets in eval mode."""
    import torch

    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None:
        raise QwtError("MTCNN needs facenet-pytorch", INSTALL)
    root = spec.submodule_search_locations[0]
    stubs = {"_mtcnn_pkg": [], "_mtcnn_pkg.utils": [], "_mtcnn_pkg.utils.detect_face": None}
    for name, path in stubs.items():
        if name not in sys.modules:
            mod = types.ModuleType(name)
            if path is not None:
                mod.__path__ = path
            mod.detect_face = mod.extract_face = None
            sys.modules[name] = mod
    s = importlib.util.spec_from_file_location("_mtcnn_pkg.mtcnn", os.path.join(root, "models", "mtcnn.py"))
    mtcnn = importlib.util.module_from_spec(s)
    s.loader.exec_module(mtcnn)
    nets = {}
    for name, cls in (("pnet", mtcnn.PNet), ("rnet", mtcnn.RNet), ("onet", mtcnn.ONet)):
        net = cls(pretrained=False)
        net.load_state_dict(torch.load(os.path.join(root, "data", f"{name}.pt"), map_location="cpu", weights_only=True))
        nets[name] = net.eval()
    return nets
