"""SIGINT (Ctrl-C) and SIGTERM (what Slurm sends before a kill) as one exception: a run stops where it is, keeps
every problem it wrote, stops its grading workers and says how far it got, in one line."""

from __future__ import annotations

import signal
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Not an Exception: no `except Exception` on the way may swallow it."""

    def __init__(self, signum: int, detail: str = "no problem was finished"):
        super().__init__(detail)
        self.signum = signum
        self.detail = detail

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@contextmanager
def signals_interrupt():
    """Within the block, SIGINT and SIGTERM raise Interrupted in the main thread."""

    def raise_interrupted(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_interrupted) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class TimeLimit(Exception):
    """A bounded wait ran out."""


class _Expired(BaseException):
    """Raised inside the waiting library: a BaseException, so its `except Exception` retry loops let it pass."""


@contextmanager
def time_limit(seconds: float | None, what: str):
    """Raise TimeLimit when the block runs past `seconds` (None: no limit): a hub that accepts connections but never
    answers is otherwise retried for minutes by the clients' own per-request timeouts. SIGALRM, so main thread
    only; elsewhere the block runs unbounded."""
    import threading

    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds), 1.0)  # again every second, should one be swallowed
    try:
        yield
    except _Expired:
        raise TimeLimit(f"{what} did not answer within {seconds:g} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
