"""The project's one logger, ``logging.getLogger("qwt_deploy")``.

Library code logs notes and progress through :data:`logger` and never prints; the CLI decides
what reaches the terminal (:func:`configure`: ``--quiet`` shows warnings and errors only, ``-v``
adds debug detail). A Python user sees warnings by default, as with any library logger, and can
raise or lower the level with ``logging.getLogger("qwt_deploy").setLevel(...)``.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("qwt_deploy")


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not when the handler was
    made), so a CLI called in-process (tests, notebooks) never writes to a stale stream."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure(verbosity: int = 0) -> None:
    """CLI logging: ``verbosity`` -1 (``--quiet``): warnings; 0: info; 1+ (``-v``): debug.
    Messages go to stderr as plain lines, so stdout keeps only the summary table. Records still
    propagate to the root logger (pytest's caplog, an application's own handlers); the CLI's
    handler is installed once, however often a CLI ``main()`` runs in one process."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
