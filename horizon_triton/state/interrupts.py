"""SIGINT and SIGTERM during training and saving: finish what is under way, then stop with the usual status.

Inside ``deferred_signals()`` the first SIGINT or SIGTERM is only recorded: the code in the block looks at
``received()`` where stopping is safe (fit: after an optimizer step, once a checkpoint is written) and raises
``stop_error``; if it never does, leaving the outermost block raises it. A second signal raises at once, from
wherever the main thread is (a save in progress is then abandoned and cleaned up, never left half written).

SIGINT becomes ``Interrupted`` (a KeyboardInterrupt: exit status 130 through the CLI), SIGTERM ``Terminated``
(a SystemExit with code 143 = 128 + 15), the conventions of shells and job schedulers. Handlers can only be set in
the main thread; elsewhere the block changes nothing.

``until_signal(batches)`` stops a loop (the CLI's final evaluation) at its next batch once a signal was
deferred; ``raising_on_sigterm()`` makes SIGTERM outside those blocks raise Terminated at once (as SIGINT raises
KeyboardInterrupt) instead of ending the process without its ``finally`` blocks.
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT stopped the work; ``checkpoint`` is the training checkpoint written before stopping, if any."""

    def __init__(self, message: str, checkpoint=None):
        super().__init__(message)
        self.signum, self.checkpoint = signal.SIGINT, checkpoint


class Terminated(SystemExit):
    """SIGTERM stopped the work (exit status 143); ``checkpoint`` as for Interrupted."""

    def __init__(self, message: str, checkpoint=None):
        super().__init__(128 + signal.SIGTERM)
        self.message, self.signum, self.checkpoint = message, signal.SIGTERM, checkpoint

    def __str__(self) -> str:
        return self.message


def stop_error(signum: int, checkpoint=None) -> BaseException:
    name = signal.Signals(signum).name
    message = f"{name} received" + (f"; training state saved in {checkpoint}" if checkpoint else "")
    return Terminated(message, checkpoint) if signum == signal.SIGTERM else Interrupted(message, checkpoint)


class _Deferral:
    depth = 0
    received: int | None = None
    previous: dict = {}


def _handle(signum, frame) -> None:
    if _Deferral.received is not None:
        raise stop_error(signum)                 # the second signal: stop now
    _Deferral.received = signum
    sys.stderr.write(f"\n{signal.Signals(signum).name} received: finishing the current step (and saving a "
                     "checkpoint if a checkpoint directory is set); send it again to stop at once\n")
    sys.stderr.flush()


def received() -> int | None:
    """The signal recorded since the outermost deferred_signals() began, or None."""
    return _Deferral.received


class deferred_signals:
    """Context manager; re-entrant (a save inside fit defers to fit's handling)."""

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            self.installed = False
            return self
        self.installed = True
        if _Deferral.depth == 0:
            _Deferral.received = None
            _Deferral.previous = {s: signal.signal(s, _handle) for s in SIGNALS}
        _Deferral.depth += 1
        return self

    def __exit__(self, kind, error, tb):
        if not self.installed:
            return False
        _Deferral.depth -= 1
        if _Deferral.depth:
            return False
        for s, handler in _Deferral.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)   # None: set outside Python
        pending, _Deferral.received = _Deferral.received, None
        if pending is not None and error is None:
            raise stop_error(pending)
        return False


def until_signal(batches):
    """The batches, until a signal is received inside deferred_signals(); the first is always given (a loop
    that stops early then has something to count). An evaluation that a signal cut short is to be discarded."""
    for index, batch in enumerate(batches):
        if index and _Deferral.received is not None:
            return
        yield batch


class raising_on_sigterm:
    """Context manager: SIGTERM raises Terminated at once, as SIGINT raises KeyboardInterrupt (Python's default for
    SIGTERM ends the process without running ``finally`` blocks or removing temporary files). Blocks of
    deferred_signals() inside it defer as usual; main thread only (elsewhere it changes nothing)."""

    def __enter__(self):
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGTERM, _raise_terminated)
        return self

    def __exit__(self, kind, error, tb):
        if self.installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)
        return False


def _raise_terminated(signum, frame) -> None:
    raise stop_error(signum)
