"""Never leave a partial output file: write to a temporary file beside it, then rename."""

from __future__ import annotations

import os
import tempfile

from .errors import QwtError


def check_writable(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(d):
        raise QwtError(f"output folder {d} does not exist", "create it or choose another -o path")
    if os.path.isdir(path):
        raise QwtError(f"output path {path} is a folder", "pass a file name such as model.int8.onnx")
    if not os.access(d, os.W_OK):
        raise QwtError(f"output folder {d} is not writable", "choose a writable -o path")


def atomic_write_bytes(path: str, data: bytes) -> None:
    check_writable(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes the file 0600; give it the mode a plain open() would (e.g. 0644), so a
        # model written here can be read by another user, such as a container's non-root user
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
