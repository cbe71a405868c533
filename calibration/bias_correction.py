"""Bias correction (AIMET, Brevitas): CWAC with alpha fixed at 1, so only a per-channel shift
``beta = E[y_fp] - E[y_q]`` is fitted. The baseline that QwT-v2's alpha has to beat."""

from __future__ import annotations

from .cwac import ChannelAffineCompensation


class BiasCorrection(ChannelAffineCompensation):
    """Same statistics and fold as CWAC; the solve keeps alpha = 1."""

    fix_alpha = True
