"""The one-string data description of ``normfree train --data`` and ``normfree.train(data=...)``.

| spec | data | builder |
|---|---|---|
| ``digits`` | scikit-learn's bundled 8x8 digits | `digits_dataloaders` |
| ``fashion-mnist[:DIR]`` | the Fashion-MNIST IDX ``.gz`` files (default DIR: Debian's) | `fashion_mnist_dataloaders` |
| ``PATH.npz`` | a MedMNIST file | `medmnist_dataloaders` |
| ``PATH.csv`` | a CSV of image paths and labels | `csv_dataloaders` |
| a folder | class subfolders of images, or ``train/`` + ``valid/`` | `image_folder_dataloaders` |
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from fastai.data.core import DataLoaders

from .loaders import (
    csv_dataloaders,
    digits_dataloaders,
    fashion_mnist_dataloaders,
    image_folder_dataloaders,
    medmnist_dataloaders,
)

__all__ = ["DATA_SPEC_HELP", "DataSpec", "parse_data_spec"]

DATA_SPEC_HELP = ("digits, fashion-mnist[:DIR], a MedMNIST .npz file, a .csv of image paths and labels, or an "
                  "image folder")
_FASHION = "fashion-mnist"
_DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# Image size (px) when none is asked for: the data's own where it has one, else fastai's usual small size.
_DEFAULT_SIZE = {"digits": 32, _FASHION: 28, "medmnist": None, "csv": 64, "image-folder": 64}
_LIMITED = ("digits", _FASHION, "medmnist")  # in-memory sets: `limit` keeps the first n of each split


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: which builder (`kind`) reads which `path` (None for digits)."""

    kind: str
    path: Path | None = None

    @property
    def supports_limit(self) -> bool:
        return self.kind in _LIMITED

    def default_size(self) -> int | None:
        """Image size used when none is given (None: the images' own size)."""
        return _DEFAULT_SIZE[self.kind]

    def dataloaders(
        self,
        bs: int,
        size: int | None = None,
        seed: int = 0,
        limit: int | None = None,
        valid_pct: float = 0.2,
        path_col: str = "path",
        label_col: str = "label",
        device: torch.device | str | None = None,
    ) -> DataLoaders:
        """Build the DataLoaders; `size` None means `default_size()`. `limit` needs `supports_limit`."""
        if limit is not None and not self.supports_limit:
            raise ValueError(f"limit works with {', '.join(_LIMITED)} data only, not {self.kind}")
        size = self.default_size() if size is None else size
        if self.kind == "digits":
            return digits_dataloaders(bs, size, valid_pct, seed, limit, device)
        if self.kind == _FASHION:
            return fashion_mnist_dataloaders(self.path, bs, size, seed, limit, device)
        if self.kind == "medmnist":
            return medmnist_dataloaders(self.path, bs, size, seed, limit, device)
        if self.kind == "csv":
            return csv_dataloaders(self.path, path_col, label_col, None, bs, size, valid_pct, seed, device=device)
        return image_folder_dataloaders(self.path, bs, size, valid_pct, seed, device=device)

    def __str__(self) -> str:
        if self.kind == "digits":
            return "digits"
        if self.kind == _FASHION:
            return _FASHION if self.path == _DEFAULT_FASHION_DIR else f"{_FASHION}:{self.path}"
        return str(self.path)


def parse_data_spec(spec: str | Path) -> DataSpec:
    """`DataSpec` for a ``--data`` string; ValueError saying what is accepted when it is none of them.

    Paths are checked for existence here; their contents are checked when the data is built.
    """
    text = str(spec).strip()
    if text == "digits":
        return DataSpec("digits")
    if text == _FASHION or text.startswith(_FASHION + ":"):
        folder = Path(text.partition(":")[2] or _DEFAULT_FASHION_DIR).expanduser()
        if not folder.is_dir():
            hint = " (Debian/Ubuntu: apt-get install dataset-fashion-mnist)" if folder == _DEFAULT_FASHION_DIR else ""
            raise ValueError(f"{folder}: no such folder; expected the Fashion-MNIST IDX .gz files there{hint}, "
                             f"or give another folder as fashion-mnist:DIR")
        return DataSpec(_FASHION, folder)
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(f"{text!r} is not a known data set nor an existing path; expected {DATA_SPEC_HELP}")
    if path.is_dir():
        return DataSpec("image-folder", path)
    if path.suffix.lower() == ".npz":
        return DataSpec("medmnist", path)
    if path.suffix.lower() == ".csv":
        return DataSpec("csv", path)
    raise ValueError(f"{path}: a {path.suffix or 'suffix-less'} file is not data normfree reads; "
                     f"expected {DATA_SPEC_HELP}")
