"""Utilities with no knowledge of models or training: the errors normfree raises, atomic files and locked output
folders (`outdir`), peak memory, which process of a launched run this is (`processes`)."""
from .errors import ConfigError, ConversionError, WriteError
from .memory import PeakMemory

__all__ = ["ConfigError", "ConversionError", "WriteError", "PeakMemory"]
