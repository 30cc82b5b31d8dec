"""SIGTERM handled as Ctrl-C: what ``timeout``, ``kill`` and cluster schedulers send stops a run the same clean way.

`sigterm_as_interrupt` makes SIGTERM raise `Terminated`, a `KeyboardInterrupt`, so every ``except
KeyboardInterrupt`` that checkpoints a run handles both. `how_stopped` and `exit_status` name the
signal and give the shell's status for it (130 for Ctrl-C, 143 for SIGTERM). `stops_when_asked` holds
both back for a block that must stop at a point of its own choosing (the processes of a launched run, which
stop together, `normfree.app.distributed`).
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["Terminated", "exit_status", "how_stopped", "interrupt", "sigterm_as_interrupt", "stops_when_asked"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be."""


def how_stopped(error: BaseException) -> str:
    """``SIGTERM`` or ``Ctrl-C``: what stopped a run that raised `error` (a KeyboardInterrupt); an interruption
    of another kind names itself in its `stopped_by` (`normfree.app.distributed.PeerStopped`)."""
    return getattr(error, "stopped_by", "SIGTERM" if isinstance(error, Terminated) else "Ctrl-C")


def exit_status(how: str | None) -> int:
    """The shell's exit status for a process stopped by `how` (`how_stopped`'s answer): 128 + the signal number."""
    return 128 + (signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)


def interrupt(how: str | None) -> KeyboardInterrupt:
    """The exception to raise again for a run stopped by `how` (`how_stopped`'s answer)."""
    return Terminated() if how == "SIGTERM" else KeyboardInterrupt()


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not break off the checkpoint
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (once; later ones are ignored while the run saves its
    checkpoint). Only where Python can handle signals (the main thread) and SIGTERM still has its default
    action: a program's own SIGTERM handler is left alone."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def stops_when_asked() -> Iterator[Callable[[], str | None]]:
    """Within the block, Ctrl-C and SIGTERM are recorded instead of raised where they land; the block asks the
    function it is given (what stopped it, `how_stopped`'s answer, or None) where it can stop, and raises
    `interrupt(...)` itself. A stop still unanswered when the block ends is raised then. Once one has arrived, both
    signals are ignored after the block (the run is saving its checkpoint). Only Python's own Ctrl-C handler and
    `sigterm_as_interrupt`'s are held back; in another thread nothing changes."""
    received: list[str] = []

    def record(signum, frame) -> None:
        received.append("SIGTERM" if signum == signal.SIGTERM else "Ctrl-C")

    held = {}
    if threading.current_thread() is threading.main_thread():
        for signum, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _raise_terminated)):
            if signal.getsignal(signum) is handler:
                held[signum] = handler
                signal.signal(signum, record)
    try:
        yield lambda: received[0] if received else None
    finally:
        for signum, handler in held.items():
            signal.signal(signum, signal.SIG_IGN if received else handler)
    if received:
        raise interrupt(received[0])
