"""tqdm progress callbacks shared by the CLIs (``progress(i, total, label)`` protocol)."""

from __future__ import annotations

import sys
from typing import Callable


def layer_progress_bar(desc: str = "calibrate+compensate") -> Callable[[int, int, str], None]:
    """Progress of the layer-by-layer calibration; starts a new bar when a new run begins
    (qwt-check calibrates once per target)."""
    from tqdm import tqdm

    state: dict = {}

    def progress(i: int, total: int, name: str) -> None:
        bar = state.get("bar")
        if bar is None or bar.total != total or i < bar.n:
            bar = state["bar"] = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr)
        bar.set_postfix_str(name[:32])
        bar.update(i - bar.n)
        if i >= total:
            bar.close()

    return progress
