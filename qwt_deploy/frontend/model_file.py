"""Recognise a model file by its content and load it, never running pickled code by default.

Accepted forms:

- a ``torch.export`` program (``torch.export.save``; any extension) -- recommended, self-contained;
- ``package.module:factory`` (a Python callable returning an ``nn.Module``), optionally with a
  state-dict file loaded with ``weights_only=True``;
- a pickled ``nn.Module`` (``torch.save(model)``) -- only with ``trust_pickle=True``, because
  unpickling runs arbitrary code.

Everything else (TorchScript, ONNX, a bare state dict, a corrupt file) gets a one-line error
saying what to do instead.
"""

from __future__ import annotations

import importlib
import logging
import os
import zipfile
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import QwtError


@dataclass
class LoadedModel:
    program: Optional[torch.export.ExportedProgram] = None
    module: Optional[torch.nn.Module] = None
    description: str = ""
    onnx: Optional["onnx.ModelProto"] = None  # an FP32 ONNX graph (frontend.onnx_graph translates it)
    # the user's file when ``onnx`` is its conversion to a newer opset (checked against it by the API)
    onnx_converted_from: Optional[str] = None


def _zip_names(path: str) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def sniff(path: str) -> str:
    """'export' | 'torchscript' | 'torch-save' | 'onnx' | 'unknown' from the file's bytes."""
    names = _zip_names(path)
    if names:
        if any(n.endswith("archive_format") or "/models/" in n and n.endswith(".json") for n in names):
            return "export"
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-save"
        return "unknown"
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return "torch-save"  # legacy (non-zip) torch.save / plain pickle
    if path.endswith(".onnx") or head[:2] == b"\x08\x07" or head[:1] == b"\x08":
        return "onnx"
    return "unknown"


def load_factory(spec: str, state_dict: Optional[str]) -> torch.nn.Module:
    mod_name, _, fn_name = spec.partition(":")
    if not fn_name:
        raise QwtError(f"'{spec}' is not of the form package.module:factory", "write e.g. mypkg.models:build_resnet")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise QwtError(f"cannot import {spec} ({type(e).__name__}: {e})", "install the package that defines the model") from None
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise QwtError(f"{spec}() returned {type(model).__name__}, not an nn.Module", "return the model from the factory")
    if state_dict:
        sd = _load_weights_only(state_dict)
        if not isinstance(sd, dict):
            raise QwtError(f"{state_dict} does not hold a state dict", "save model.state_dict() with torch.save")
        sd = sd.get("state_dict", sd)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise QwtError(f"state dict {state_dict} does not fit {spec} (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})",
                           "pass the state dict that belongs to this architecture")
    return model


def _load_weights_only(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise QwtError(f"{path} is not a loadable weights file ({first})",
                       "pass a torch.export program, or a state dict saved with torch.save(model.state_dict())") from None


class _TorchLogCapture(logging.Filter):
    """Holds back a torch logger's records while loading a file: ``torch.export.load`` logs a
    12-line traceback for a damaged archive before raising; our one line names its cause."""

    def __init__(self, name: str):
        super().__init__()
        self.logger, self.records = logging.getLogger(name), []

    def filter(self, record) -> bool:
        self.records.append(record)
        return False

    def first_exception(self) -> Optional[BaseException]:
        return next((r.exc_info[1] for r in self.records if r.exc_info and r.exc_info[1] is not None), None)

    def __enter__(self):
        self.logger.addFilter(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeFilter(self)


def load_model(path: Optional[str], factory: Optional[str] = None, trust_pickle: bool = False) -> LoadedModel:
    if factory:
        return LoadedModel(module=load_factory(factory, path), description=f"factory {factory}" + (f" + {path}" if path else ""))
    if not path:
        raise QwtError("no model given", "pass a model file, or --model-factory package.module:factory")
    if os.path.isdir(path):
        raise QwtError(f"model path {path} is a folder, not a file", "pass the model file (e.g. model.pt2) inside it")
    if not os.path.isfile(path):
        raise QwtError(f"model file {path} does not exist", "check the path")
    if os.path.getsize(path) == 0:
        raise QwtError(f"model file {path} is empty", "re-save the model with torch.export.save")
    kind = sniff(path)
    if kind == "export":
        swallowed = _TorchLogCapture("torch.export")  # torch logs the real cause as a traceback, then raises a vaguer one
        try:
            with swallowed:
                return LoadedModel(program=torch.export.load(path), description=f"torch.export program {path}")
        except Exception as e:
            cause = swallowed.first_exception() or e
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
            raise QwtError(f"{path} looks like a torch.export program but cannot be loaded ({first})",
                           "re-save it with torch.export.save from the same torch version") from None
    if kind == "torchscript":
        raise QwtError(f"{path} is a TorchScript archive, which keeps no aten graph we can quantize faithfully",
                       "save a torch.export program instead: torch.export.save(torch.export.export(model, (x,)), 'model.pt2')")
    if kind == "onnx":
        from .onnx_source import load_fp32_onnx, source_opset

        model = load_fp32_onnx(path)
        converted = source_opset(path) != source_opset(model)
        return LoadedModel(onnx=model, onnx_converted_from=path if converted else None,
                           description=f"FP32 ONNX {path}" + (f" (opset {source_opset(path)} converted to "
                                                              f"{source_opset(model)})" if converted else ""))
    if kind == "torch-save":
        if not trust_pickle:
            obj = None
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                raise QwtError(f"{path} is a pickled model; unpickling runs code from the file",
                               "save a torch.export program instead, or pass --trust-pickle if you trust this file") from None
            raise QwtError(f"{path} holds only weights ({type(obj).__name__}), not a model",
                           "add --model-factory package.module:factory to build the architecture")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise QwtError(f"{path} cannot be unpickled ({first})", "check the file, or save a torch.export program") from None
        if not isinstance(obj, torch.nn.Module):
            raise QwtError(f"{path} unpickles to {type(obj).__name__}, not an nn.Module",
                           "use --model-factory with a state dict, or save the whole module")
        return LoadedModel(module=obj, description=f"pickled module {path}")
    raise QwtError(f"{path} is not a recognised model file (corrupt, or an unknown format)",
                   "pass a torch.export program saved with torch.export.save")
