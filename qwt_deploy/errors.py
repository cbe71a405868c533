"""The two kinds of failure.

:class:`QwtError`: every problem a user can cause (bad model file, bad calibration data,
unsupported operator, unwritable output). Its message is one line naming the problem and the
fix. The CLI prints that line and exits with code 2; it never shows a traceback for these.

:class:`InternalError`: a broken invariant inside qwt-deploy itself (a pass that produced an
invalid graph, a simulation that disagrees with its own plan). It is a bug to report, not
something the user can fix; the CLI says so and exits with code 3.
"""


class QwtError(Exception):
    """A problem with the user's input, phrased as ``<problem>. Fix: <what to do>``."""

    def __init__(self, problem: str, fix: str):
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(f"{self.problem}. Fix: {self.fix}.")


class InternalError(RuntimeError):
    """A bug in qwt-deploy: an invariant of the pipeline does not hold."""
