"""Ctrl-C during fit: finish the step, return what was done, say how to go on.

A fit of many steps that dies on KeyboardInterrupt loses every step it took. So while fit's
loop runs on the main thread, the first SIGINT only *asks* it to stop: the loop ends at the
next step boundary and fit returns a FitResult with ``status="interrupted"`` (the last
completed iterate, the history so far) and a ``FitInterrupted`` warning saying how to
resume. A second SIGINT raises KeyboardInterrupt at once, as a second Ctrl-C does in most
long-running tools (pip, Jupyter). This is what scikit-learn's MLP does with its
``except KeyboardInterrupt: warnings.warn("Training interrupted by user.")`` (it keeps the fit
so far), done here at a step boundary so that the iterate returned is a whole step's. A
request that comes after the last step has nothing left to stop: the fit is complete and is
returned as "completed", without a warning.

A result rather than an exception carrying one: a NumPy or SciPy user reads what a call
returns (SciPy's ``minimize`` reports why it stopped in ``status``), and a script running
many fits checks ``result.status`` to stop.

The handler is installed only where it is safe and the user has not chosen otherwise: on the
main thread (only it may set signal handlers, and only it receives SIGINT in Python), and only
in place of Python's own ``signal.default_int_handler``: a program that ignores SIGINT or
handles it itself keeps its handler. The previous handler is put back when the block ends,
whatever happens inside. Off the main thread nothing is touched: KeyboardInterrupt, if
anything raises it there, propagates as usual.
"""
from __future__ import annotations

import signal
import sys
import threading


_active: "DeferredInterrupt | None" = None  # the installed handler's block, if any


def stop_requested() -> bool:
    """Whether a fit's first Ctrl-C has asked its loop to stop (what a wait that cannot end
    at a step boundary, such as a kernel compile (_cpu/compiling.py), polls)."""
    block = _active
    return block is not None and block.requested


class FitInterrupted(UserWarning):
    """fit was stopped by Ctrl-C (SIGINT) and returned the steps it had taken."""


class DeferredInterrupt:
    """``with DeferredInterrupt() as stop:`` -- ``stop.requested`` turns True at the first
    SIGINT; a second raises KeyboardInterrupt. Re-entrant uses (a fit inside a fit's policy)
    find the handler already installed and leave it to the outer block."""

    def __init__(self):
        self.requested = False
        self.installed = False
        self._previous = None

    def __enter__(self) -> "DeferredInterrupt":
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                return self  # ignored, the OS default, or the program's own handler: not ours
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main interpreter: signals are not ours to set
            return self
        global _active
        self.installed, _active = True, self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        if self.installed:
            signal.signal(signal.SIGINT, self._previous)
            self.installed, _active = False, None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, no result
        self.requested = True
        sys.stderr.write("\nlorakern.fit: Ctrl-C: stopping at the end of this step "
                         "(press Ctrl-C again to stop at once)\n")
        sys.stderr.flush()

    def __call__(self) -> bool:
        """True once a stop was asked for (what a device loop polls between chunks)."""
        return self.requested
