"""Never leave a partial output file: write to a temporary file beside it, then rename.

:class:`StagedFiles` does this for a set of files that belong together (a model and its report):
each is written under a temporary name, and all are renamed only once every one was written
and checked; an error or an interrupt before that removes the temporary files and leaves any
earlier outputs as they were.
"""

from __future__ import annotations

import os
import stat
import tempfile
from typing import Iterable, Optional

from .errors import QwtError


def check_writable(path: str, inputs: Iterable[Optional[str]] = ()) -> None:
    """``path`` may be written: its folder exists and is writable, and it is not a folder, a
    device or another non-regular file, nor the same file as any of ``inputs`` (compared by
    inode, so ``./m.pt2``, a symlink or a hard link to the model are caught too)."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(d):
        raise QwtError(f"output folder {d} does not exist", "create it or choose another -o path")
    if os.path.isdir(path):
        raise QwtError(f"output path {path} is a folder", "pass a file name such as model.int8.onnx")
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            # os.replace would swap the device node (/dev/full, a FIFO, a socket) for a regular file
            raise QwtError(f"output path {path} exists and is not a regular file", "choose another -o path")
        for src in inputs:
            if src and os.path.exists(src) and os.path.samefile(src, path):
                raise QwtError(f"output path {path} is the input file {src}; writing it would destroy the input",
                               "choose another -o path")
    if not os.access(d, os.W_OK):
        raise QwtError(f"output folder {d} is not writable", "choose a writable -o path")


def _write_error(path: str, e: OSError) -> QwtError:
    return QwtError(f"cannot write {path} ({e.strerror or type(e).__name__})",
                    "free disk space or choose another -o path" if e.errno in (28, 122) else "choose another -o path")


def _write_temp(path: str, data: bytes) -> str:
    """``data`` in a new temporary file beside ``path``, with the mode a plain open() gives."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=d)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
        # mkstemp makes the file 0600; give it the mode a plain open() would (e.g. 0644), so a
        # model written here can be read by another user, such as a container's non-root user
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException as e:
        _unlink(tmp)
        if isinstance(e, OSError):  # ENOSPC, EDQUOT, EIO: one line, no traceback, no partial file
            raise _write_error(path, e) from None
        raise
    return tmp


def _write_all(f, data: bytes) -> None:
    f.write(data)  # one function, so that a test can make the disk "full" for one file


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_bytes(path: str, data: bytes) -> None:
    check_writable(path)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException as e:
        _unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


class StagedFiles:
    """Files written under temporary names, renamed into place together by :meth:`commit`.

    Use as a context manager: leaving the block without ``commit()`` (an error, Ctrl-C) deletes
    every temporary file, so no output of a half-finished run appears, and an earlier run's
    model and report stay together."""

    def __init__(self, inputs: Iterable[Optional[str]] = ()):
        self.inputs = tuple(inputs)
        self._staged: dict[str, str] = {}  # final path -> temporary path

    def check(self, path: str) -> None:
        check_writable(path, self.inputs)

    def write(self, path: str, data: bytes) -> str:
        """Write ``data`` for ``path``; returns the temporary path (readable until commit)."""
        self.check(path)
        old = self._staged.pop(path, None)
        if old:
            _unlink(old)
        self._staged[path] = _write_temp(path, data)
        return self._staged[path]

    def commit(self) -> None:
        for path, tmp in list(self._staged.items()):
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise _write_error(path, e) from None
            del self._staged[path]

    def discard(self) -> None:
        for tmp in self._staged.values():
            _unlink(tmp)
        self._staged.clear()

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
