"""Data sets as fastai DataLoaders."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from torch.utils.data import TensorDataset

__all__ = ["digits_dataloaders", "write_digits_image_folder"]


def write_digits_image_folder(path: str | Path, size: int = 32, per_class: int | None = None) -> Path:
    """Write the bundled digits as PNG files in ImageNet-style class folders (``path/3/0042.png``).

    An offline stand-in for "a folder of your images": `ImageDataLoaders.from_folder(path, ...)`
    reads it. `per_class` keeps the first n images of each class. Returns `path`.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    path = Path(path)
    pixels, labels = load_digits(return_X_y=True)
    written: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(pixels, labels)):
        if per_class is not None and written.get(label, 0) >= per_class:
            continue
        folder = path / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray((image.reshape(8, 8) * 255 / 16).astype("uint8"), mode="L")
        gray.resize((size, size), Image.BILINEAR).save(folder / f"{index:04d}.png")
        written[label] = written.get(label, 0) + 1
    return path


def digits_dataloaders(
    bs: int = 64, size: int = 32, valid_pct: float = 0.2, seed: int = 0, device: torch.device | str | None = None
) -> DataLoaders:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes), always available offline.

    Images are 1-channel, resized to `size` px (bilinear) and standardised with the training
    split's mean and std; `valid_pct` of the images, chosen with `seed`, are held out.
    """
    from sklearn.datasets import load_digits

    if bs < 1:
        raise ValueError(f"bs must be >= 1, got {bs}")
    if size < 8:
        raise ValueError(f"size must be >= 8 px (the digits are 8x8), got {size}")
    if not 0 < valid_pct < 1:
        raise ValueError(f"valid_pct must be between 0 and 1 (exclusive), got {valid_pct}")
    pixels, labels = load_digits(return_X_y=True)
    images = torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 8, 8)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    targets = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_valid = round(valid_pct * len(images))
    valid, train = order[:n_valid], order[n_valid:]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    dls = DataLoaders(
        DataLoader(TensorDataset(images[train], targets[train]), bs=bs, shuffle=True),
        DataLoader(TensorDataset(images[valid], targets[valid]), bs=2 * bs),
        device=device,
    )
    dls.c = 10
    return dls
