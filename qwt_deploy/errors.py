"""User-facing errors.

Every problem a user can cause (bad model file, bad calibration data, unsupported operator,
unwritable output) is raised as a :class:`QwtError`, whose message is one line naming the
problem and the fix. The CLI prints that line and exits non-zero; it never shows a traceback
for these.
"""


class QwtError(Exception):
    """A problem with the user's input, phrased as ``<problem>. Fix: <what to do>``."""

    def __init__(self, problem: str, fix: str):
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(f"{self.problem}. Fix: {self.fix}.")
