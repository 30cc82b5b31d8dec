"""Ctrl-C while the ``normfree`` command is still starting (importing torch, fastai and timm takes seconds):
one line and exit status 130, not a traceback through the import machinery. Nothing is written yet then.

Imported first by ``normfree/__init__.py``; acts only when the process is the ``normfree`` command
(the console script or ``python -m normfree``), never in a program or notebook that imports normfree.
`command_started` hands SIGINT back to Python's KeyboardInterrupt once the command runs.
"""
import os
import signal
import sys

_COMMAND = os.path.basename(sys.argv[0]) == "normfree" if sys.argv else False
_COMMAND = _COMMAND or "normfree" in [b for a, b in zip(sys.orig_argv, sys.orig_argv[1:]) if a == "-m"]


def _stop_while_importing(signum, frame) -> None:
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    sys.stderr.write(f"\nnormfree: stopped by {name} while starting, before anything was read or written.\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def command_started() -> None:
    """Back to Python's own SIGINT handling (KeyboardInterrupt) and SIGTERM's default, if this installed its own."""
    if _COMMAND and signal.getsignal(signal.SIGINT) is _stop_while_importing:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if _COMMAND and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _stop_while_importing)
    signal.signal(signal.SIGTERM, _stop_while_importing)
