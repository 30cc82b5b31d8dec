"""The ``normfree`` command's own start, before it imports torch, fastai and timm (which takes seconds):
- Ctrl-C (or SIGTERM) then is one line and exit status 130 (143), not a traceback through the import
  machinery; nothing is written yet. `command_started` hands SIGINT back to Python's KeyboardInterrupt
  once the command runs.
- fastai 2.8 decorates a layer with ``torch.jit.script`` at import time, which torch now deprecates: a
  FutureWarning on every start of the command that no user can act on, so the command ignores it.

Imported first by ``normfree/__init__.py`` (the only module that runs before torch is imported); acts only
when the process is the ``normfree`` command (the console script or ``python -m normfree``), never in a
program or notebook that imports normfree, whose signals and warnings filters stay as they were.
"""
import os
import signal
import sys
import warnings

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


if _COMMAND:
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _stop_while_importing)
        signal.signal(signal.SIGTERM, _stop_while_importing)
