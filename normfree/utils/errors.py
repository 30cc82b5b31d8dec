"""The error every check of a user's setting raises, from the output folder up to the command line."""
from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A setting that cannot work: `option` is its name (a `TrainConfig` field), `message` the fix."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message
