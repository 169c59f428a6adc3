"""SIGTERM and SIGINT as a request to stop between two loop calls.

A preemption (SIGTERM) or a Ctrl-C (SIGINT) during the training loop does
not interrupt a step: the handler only records the signal, and the loop
reads it after its current call, saves a checkpoint of that step and stops.
A second signal of the same kind acts at once (the handler that was there
before ours is put back by the first): a second Ctrl-C raises
KeyboardInterrupt without saving.

Handlers are installed only while the loop runs, and only from the main
thread (Python delivers signals there); elsewhere `StopRequest` is inert.
Imports no TensorFlow.
"""

import os
import signal
import sys
import threading

# Codes the workers of a multi-worker job agree on (the largest wins, so a
# Ctrl-C anywhere gives every worker the SIGINT exit status).
NONE, SIGTERM, SIGINT = 0, 1, 2
NAMES = {SIGTERM: "SIGTERM", SIGINT: "SIGINT"}
_CODES = {signal.SIGTERM: SIGTERM, signal.SIGINT: SIGINT}


class StopRequest:
    """Context manager: records SIGTERM / SIGINT while the loop runs.

    `code` is NONE until a signal arrives, then SIGTERM or SIGINT (the
    first one received).
    """

    def __init__(self):
        self.code = NONE
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in _CODES:
                previous = signal.signal(signum, self._handle)
                # None: a handler not installed from Python; put back the
                # default then.
                self._previous[signum] = (signal.SIG_DFL if previous is None
                                          else previous)
        return self

    def __exit__(self, *exc_info):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        del frame
        if self.code == NONE:
            self.code = _CODES[signum]
        # A second signal of this kind: whatever was there before us.
        signal.signal(signum, self._previous[signum])
        again = ("Ctrl-C again stops at once, without saving"
                 if signum == signal.SIGINT else
                 "a second SIGTERM stops at once, without saving")
        # os.write, not print: the main thread may be inside a print to the
        # same stream, and a buffered stream must not be re-entered.
        message = (f"\n{NAMES[_CODES[signum]]} received: saving a checkpoint "
                   f"after the current loop call, then exiting ({again}).\n")
        try:
            os.write(sys.stderr.fileno(), message.encode())
        except (OSError, ValueError):
            pass  # no usable stderr: the stop itself still happens
