"""The output folder of a run or grid: atomic writes, an exclusive lock, and the marker of an unfinished run.

- `atomic_write`: every file normfree writes into an output folder goes through it: written to a
  temporary file in the same folder, flushed to disk, then renamed over the target (`os.replace`), so
  a reader, a crash or a SIGKILL never sees half a file. Whatever stops a write (a full disk, a
  read-only or vanished folder) raises one error, `WriteError`, with the path and the errno, and leaves
  the target as it was.
- `locked_folder`: creates the folder and holds an exclusive, non-blocking `fcntl.flock` on it for
  the whole run; a second run into the same folder stops with a `ConfigError` naming it. A folder it
  created is removed again if the run stops before writing anything into it.
- `resolved_folder`: an output folder as an absolute path, refused (`ConfigError` naming `out`) when it goes
  through a loop of symbolic links.
- `INCOMPLETE`: the marker a run writes first and removes last; a folder holding it was stopped or
  killed before it finished (its text says when and how).
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import ConfigError, WriteError

__all__ = ["INCOMPLETE", "atomic_write", "locked_folder", "remove_temporary_files", "resolved_folder"]

INCOMPLETE = "INCOMPLETE"  # the marker file of a run that has not finished
_TEMPORARY = ".tmp-"  # in the names of atomic_write's temporary files
# What `_hidden_os_error` appends to a temporary file whose writer failed without an OSError. A writer stopped by a
# full disk has filled it up to the last block (the kernel writes what fits before it refuses), so this much more
# cannot fit; a writer that failed for another reason (a bug) leaves room for it.
_PROBE_BYTES = 64 * 1024
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error (safetensors') shows the errno


def atomic_write(path: str | Path, content: str | bytes | Callable[[Path], object]) -> Path:
    """Write `path` all at once: `content` (text, bytes, or a function that writes the file it is given,
    e.g. ``lambda p: fig.savefig(p)``) goes to a temporary file next to `path` (same suffix, so writers
    that read the format from it still work), which then replaces `path`. On any error or interrupt
    the temporary file is removed and `path` is as it was.

    A write that fails (a full disk, a read-only or vanished folder, `path` a folder) raises `WriteError` naming
    `path` and the errno, also where the writer hid the OSError in an error of its own (torch.save's
    "[enforce fail at inline_container.cc] unexpected pos", safetensors' SafetensorError); other errors of the
    writer (a bug) go on as they are."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}{_TEMPORARY}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        try:
            if callable(content):
                content(temporary)
            else:
                with open(temporary, "xb") as f:
                    f.write(content.encode() if isinstance(content, str) else content)
            descriptor = os.open(temporary, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            os.replace(temporary, path)
        except OSError as error:
            raise WriteError(error.errno, error.strerror or str(error), str(path)) from error
        except Exception as error:
            hidden = _hidden_os_error(error, temporary)
            if hidden is None:
                raise
            _release_frames(error)
            raise WriteError(hidden.errno, hidden.strerror, str(path)) from error
    except BaseException:
        with suppress(OSError):  # a read-only folder refuses even this (EROFS); remove_temporary_files gets the rest
            temporary.unlink(missing_ok=True)
        raise
    return path


def _release_frames(error: BaseException) -> None:
    """Clear the variables of the frames `error` (and the errors it was raised from) went through: a failed
    writer's open file, and with it the full disk's space, is released now rather than when its frames are
    collected."""
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def _hidden_os_error(error: Exception, temporary: Path) -> OSError | None:
    """The file system's error behind a writer's `error` that is no OSError, or None if there is none: the errno
    Rust's std::io::Error writes into its message (safetensors: "... (os error 28)"), else the error of writing a
    little more into `temporary` (torch.save's "unexpected pos" leaves a full disk full: ENOSPC again)."""
    written = _RUST_OS_ERROR.search(str(error))
    if written:
        code = int(written[1])
        return OSError(code, os.strerror(code))
    try:
        with open(temporary, "ab") as f:
            f.write(bytes(_PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as probed:
        return probed
    return None


def remove_temporary_files(folder: Path) -> None:
    """Remove `atomic_write`'s temporary files left in `folder` by a process that was killed mid-write."""
    for leftover in folder.glob(f".*{_TEMPORARY}*"):
        leftover.unlink(missing_ok=True)


def resolved_folder(folder: str | Path, option: str = "out") -> Path:
    """`folder` as an absolute path, ``~`` expanded and symbolic links followed; ConfigError naming `option` if it
    goes through a loop of symbolic links (which no folder can be made or found in)."""
    try:
        return Path(folder).expanduser().resolve()
    except (RuntimeError, OSError) as error:  # a loop: RuntimeError before Python 3.13, OSError (ELOOP) since
        raise ConfigError(option, f"{folder} goes through a loop of symbolic links ({error}); remove the loop or "
                                  f"choose another folder") from None


def _make_folder(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; the ones created, outermost first. ConfigError naming `out`
    when it cannot be a folder we write into."""
    folder = resolved_folder(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError("out", f"{folder} is a file; out must be a folder") from None
    except NotADirectoryError:
        blocker = next((p for p in folder.parents if p.exists() and not p.is_dir()), folder)
        raise ConfigError("out", f"{folder}: {blocker} is a file, so no folder can be made there; choose another "
                                 f"out folder") from None
    except OSError as error:
        raise ConfigError("out", f"cannot create the folder {folder} ({error.strerror}); choose a folder you can "
                                 f"write to") from None
    try:  # root ignores permission bits, and read-only file systems say so only on a write: try one
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        _remove_empty(missing)
        raise ConfigError("out", f"cannot write into {folder} ({error.strerror}); choose a folder you can write "
                                 f"to") from None
    return missing


def _remove_empty(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): keep it
            return


@contextmanager
def locked_folder(folder: str | Path) -> Iterator[Path]:
    """Create `folder` (after checking that it can be written) and hold an exclusive lock on it until the
    block ends. ConfigError naming `out` if another process holds the lock (another normfree run is
    writing there) or the folder cannot be written. Folders this created are removed if the block
    raises (an error, Ctrl-C) before anything was written into them."""
    folder = Path(folder)
    created = _make_folder(folder)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise ConfigError("out", f"another normfree run is writing into {folder}; wait for it to end or choose "
                                     f"another out folder") from None
        try:
            yield folder
        except BaseException:
            _remove_empty(created)
            raise
    finally:
        os.close(descriptor)  # releases the lock
