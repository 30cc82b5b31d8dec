"""The errors normfree raises for what a user can fix: a setting that cannot work (`ConfigError`, from the output
folder up to the command line), a model `normfree.to_normfree` cannot convert (`ConversionError`), and a file that
could not be written (`WriteError`, a full disk, ...)."""
from __future__ import annotations

__all__ = ["ConfigError", "ConversionError", "WriteError"]


class ConfigError(ValueError):
    """A setting that cannot work: `option` is its name (a `TrainConfig` field), `message` the fix."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message


class ConversionError(ValueError):
    """What `normfree.to_normfree` cannot convert, with the module path and the fix."""


class WriteError(OSError):
    """A file normfree could not write (`normfree.utils.outdir.atomic_write`): `filename` is its path, `errno` and
    `strerror` the operating system's reason (``ENOSPC``, "No space left on device", for a full disk). Raised as
    ``WriteError(errno, strerror, filename)``, as any OSError, so that it pickles across processes."""

    def __str__(self) -> str:
        reason = self.strerror if self.errno is None else f"[Errno {self.errno}] {self.strerror}"
        return f"cannot write {self.filename}: {reason}"
