"""The data kinds of ``normfree train --data`` and ``normfree.train(data=...)``: one `DataKind` per kind, in
`DATA_KINDS`.

| spec | data | builder |
|---|---|---|
| ``digits`` | scikit-learn's bundled 8x8 digits | `digits_dataloaders` |
| ``fashion-mnist[:DIR]`` | the Fashion-MNIST IDX ``.gz`` files (default DIR: Debian's) | `fashion_mnist_dataloaders` |
| ``PATH.npz`` | a MedMNIST file | `medmnist_dataloaders` |
| ``PATH.csv`` | a CSV of image paths and labels | `csv_dataloaders` |
| a folder | class subfolders of images, or split folders of them (below) | `image_folder_dataloaders` |

A folder's splits: ``train/``, a validation ``valid/``, ``val/`` or ``validation/`` (else `valid_pct` of train/), and
a held-out ``test/`` (``dls.test``).

`DATA_KINDS` is the only list of kinds: `parse_data_spec`, `DataSpec.dataloaders`, the checks of
`normfree.app.config.TrainConfig` and the command line's help all read it. A kind's default image
size, default path and whether `limit` applies are its builder's own: the ``size`` and path defaults
of the builder's signature, and whether it takes a ``limit``.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastai.data.core import DataLoaders

from ..utils.errors import ConfigError
from .loaders import (
    csv_dataloaders,
    digits_dataloaders,
    fashion_mnist_dataloaders,
    image_folder_dataloaders,
    medmnist_dataloaders,
)

__all__ = ["DATA_KINDS", "DATA_SPEC_HELP", "DataKind", "DataSpec", "data_spec_help", "limited_kinds",
           "parse_data_spec", "size_help"]


@dataclass(frozen=True)
class DataKind:
    """One kind of data: how ``--data`` names it and which builder reads it.

    - `builder`: the ``*_dataloaders`` function; its first parameter is the path it reads unless it is
      ``bs`` (a bundled data set such as digits).
    - `spec`: how ``--data`` writes it, for the help (``fashion-mnist[:DIR]``, ``a MedMNIST .npz file``).
    - `label`: its short name in lists of kinds (``digits``, ``.npz``, ``folders``).
    - selected by its name (`named`: ``digits``, ``fashion-mnist[:DIR]``), by a file `suffix`, or as the
      kind of a `folder`.
    - `missing`: what the default folder of a named kind should hold, and `install`: how to get it.
    """

    name: str
    builder: Callable[..., DataLoaders]
    spec: str
    label: str
    named: bool = False
    suffix: str | None = None
    folder: bool = False
    missing: str = ""
    install: str = ""

    @property
    def _parameters(self) -> dict[str, inspect.Parameter]:
        return dict(inspect.signature(self.builder).parameters)

    @property
    def reads_path(self) -> bool:
        """Whether the builder reads a path (its first parameter), i.e. the kind is not a bundled data set."""
        return next(iter(self._parameters)) != "bs"

    @property
    def default_size(self) -> int | None:
        """Image size (px) when none is asked for: the builder's default (None: the images' own size)."""
        return self._parameters["size"].default

    @property
    def default_path(self) -> Path | None:
        """The folder a named kind reads when none is given (the builder's default), else None."""
        if not self.reads_path:
            return None
        default = next(iter(self._parameters.values())).default
        return None if default is inspect.Parameter.empty else Path(default)

    @property
    def supports_limit(self) -> bool:
        """Whether `limit` (the first n images of each split) applies: in-memory data sets only."""
        return "limit" in self._parameters

    def build(self, path: Path | None, **options: Any) -> DataLoaders:
        """The builder called with `path` (for kinds that read one) and the `options` it takes (others unused,
        e.g. `valid_pct` for data with its own validation split)."""
        parameters = self._parameters
        given = {name: value for name, value in options.items() if name in parameters}
        return self.builder(path, **given) if self.reads_path else self.builder(**given)


DATA_KINDS: dict[str, DataKind] = {kind.name: kind for kind in (
    DataKind("digits", digits_dataloaders, "digits", "digits", named=True),
    DataKind("fashion-mnist", fashion_mnist_dataloaders, "fashion-mnist[:DIR]", "fashion-mnist", named=True,
             missing="the Fashion-MNIST IDX .gz files", install="Debian/Ubuntu: apt-get install dataset-fashion-mnist"),
    DataKind("medmnist", medmnist_dataloaders, "a MedMNIST .npz file", ".npz", suffix=".npz"),
    DataKind("csv", csv_dataloaders, "a .csv of image paths and labels", "CSVs", suffix=".csv"),
    DataKind("image-folder", image_folder_dataloaders, "an image folder", "folders", folder=True),
)}


def _listed(words: list[str]) -> str:
    return ", ".join(words[:-1]) + f", or {words[-1]}" if len(words) > 1 else "".join(words)


def data_spec_help() -> str:
    """What ``--data`` accepts, in words: every kind's `spec`."""
    return _listed([kind.spec for kind in DATA_KINDS.values()])


def limited_kinds() -> str:
    """The kinds `limit` (and the other in-memory options) work with, e.g. ``digits, fashion-mnist, .npz``."""
    return ", ".join(kind.label for kind in DATA_KINDS.values() if kind.supports_limit)


def size_help() -> str:
    """Each kind's default image size, e.g. ``digits 32, fashion-mnist 28, .npz native, ...``."""
    return ", ".join(f"{kind.label} {kind.default_size or 'native'}" for kind in DATA_KINDS.values())


DATA_SPEC_HELP = data_spec_help()


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: which kind (`kind`, a key of `DATA_KINDS`) reads which `path` (None for digits)."""

    kind: str
    path: Path | None = None

    @property
    def data_kind(self) -> DataKind:
        return DATA_KINDS[self.kind]

    @property
    def supports_limit(self) -> bool:
        return self.data_kind.supports_limit

    def default_size(self) -> int | None:
        """Image size used when none is given (None: the images' own size)."""
        return self.data_kind.default_size

    def check_in_memory(self, option: str, value: Any) -> None:
        """ConfigError naming `option` when it is set (not None/False) and this kind is not an in-memory data
        set (`DataKind.supports_limit`): `limit`, `classes`, `per_class` and `holdout` need one."""
        if value not in (None, False) and not self.supports_limit:
            raise ConfigError(option, f"works with in-memory data sets ({limited_kinds()}) only, not {self.kind} "
                                      f"data; leave {option} out")

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
        self.check_in_memory("limit", limit)
        options = dict(bs=bs, size=self.default_size() if size is None else size, seed=seed, valid_pct=valid_pct,
                       path_col=path_col, label_col=label_col, device=device)
        if limit is not None:
            options["limit"] = limit
        return self.data_kind.build(self.path, **options)

    def __str__(self) -> str:
        kind = self.data_kind
        if not kind.named:
            return str(self.path)
        return kind.name if self.path is None or self.path == kind.default_path else f"{kind.name}:{self.path}"


def parse_data_spec(spec: str | Path) -> DataSpec:
    """`DataSpec` for a ``--data`` string; ValueError saying what is accepted when it is none of them.

    Paths are checked for existence here; their contents are checked when the data is built.
    """
    text = str(spec).strip()
    name, colon, folder_text = text.partition(":")
    kind = DATA_KINDS.get(name)
    if kind is not None and kind.named and (kind.default_path is not None or not colon):
        if kind.default_path is None:
            return DataSpec(kind.name)
        folder = Path(folder_text or kind.default_path).expanduser()
        if not folder.is_dir():
            hint = f" ({kind.install})" if kind.install and folder == kind.default_path else ""
            raise ValueError(f"{folder}: no such folder; expected {kind.missing or 'the data'} there{hint}, "
                             f"or give another folder as {kind.name}:DIR")
        return DataSpec(kind.name, folder)
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(f"{text!r} is not a known data set nor an existing path; expected {data_spec_help()}")
    for kind in DATA_KINDS.values():
        if (kind.folder and path.is_dir()) or (kind.suffix and not path.is_dir() and
                                               path.suffix.lower() == kind.suffix):
            return DataSpec(kind.name, path)
    raise ValueError(f"{path}: a {path.suffix or 'suffix-less'} file is not data normfree reads; "
                     f"expected {data_spec_help()}")
