"""Utilities with no knowledge of models or training: atomic files and locked output folders, peak memory."""
