"""Data sets as fastai DataLoaders.

Every builder returns batches of float images ``[B, C, H, W]`` standardised with per-channel
mean and std measured on its training split, integer class targets (float multi-hot for
multi-label data), ``dls.c`` = number of classes and ``dls.vocab`` where class names exist.
The builders only read: they never write files.
"""
from __future__ import annotations

import gzip
import io
import random
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders, Datasets, TfmdDL, TfmdLists
from fastai.data.transforms import (
    Categorize,
    Category,
    IntToFloatTensor,
    MultiCategory,
    Normalize,
    ToTensor,
    get_image_files,
)
from fastai.torch_core import TensorImage
from fastai.vision.augment import Resize
from fastai.vision.core import PILImage
from fasttransform import ItemTransform, Transform
from PIL import Image
from torch.utils.data import TensorDataset

from ..utils.errors import ConfigError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "csv_dataloaders",
    "digits_dataloaders",
    "fashion_mnist_dataloaders",
    "image_folder_dataloaders",
    "medmnist_dataloaders",
    "read_idx",
    "subset_dataloaders",
    "write_digits_image_folder",
]

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_IMAGES, _IDX_LABELS = 2051, 2049
_MEDMNIST_KEYS = [f"{split}_{kind}" for split in ("train", "val", "test") for kind in ("images", "labels")]
_BAD_IMAGE_MODES = ("skip", "error")
# The value of a white pixel in scikit-learn's digits (0 black .. 16 white).
_DIGITS_WHITE = 16
# Enough pixels for stable per-channel statistics without decoding a whole large folder.
_STATS_IMAGES = 1024
# validation and test batches of in-memory images hold at least this many: evaluation is per image in eval mode, so
# a micro-batch run need not validate in micro-batches (hundreds of tiny forward passes per epoch)
_MIN_EVAL_BS = 64


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
        gray = Image.fromarray((image.reshape(8, 8) * 255 / _DIGITS_WHITE).astype("uint8"), mode="L")
        gray.resize((size, size), Image.BILINEAR).save(folder / f"{index:04d}.png")
        written[label] = written.get(label, 0) + 1
    return path


# ---------------------------------------------------------------------------------------------
# Shared checks and splitting


# The one check of each value that the builders and `normfree.app.config.TrainConfig` share: a ConfigError
# (a ValueError) naming the argument, raised where the value enters, whichever of the two that is.


def check_bs(bs: int) -> None:
    """ConfigError naming ``bs`` unless it is a whole number >= 1."""
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ConfigError("bs", f"must be a whole number >= 1, got {bs!r}")


def check_valid_pct(valid_pct: float) -> None:
    """ConfigError naming ``valid_pct`` unless it is a number strictly between 0 and 1."""
    if isinstance(valid_pct, bool) or not isinstance(valid_pct, (int, float)) or not 0 < valid_pct < 1:
        raise ConfigError("valid_pct", f"must be between 0 and 1 (exclusive), got {valid_pct!r}")


def check_limit(limit: int | None) -> None:
    """ConfigError naming ``limit`` unless it is None (all images) or a whole number >= 1."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError("limit", f"must be a whole number >= 1, got {limit!r}")


def _check_image_options(bs: int, valid_pct: float, on_bad_image: str) -> None:
    """The checks of the image-file builders (folders, CSVs)."""
    check_bs(bs)
    check_valid_pct(valid_pct)
    if on_bad_image not in _BAD_IMAGE_MODES:
        raise ValueError(f"on_bad_image must be one of {_BAD_IMAGE_MODES}, got {on_bad_image!r}")


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (expected {what})")
    return path


def _random_split(n: int, valid_pct: float, seed: int, source: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, valid) index split; both sides must be non-empty."""
    n_valid = round(valid_pct * n)
    if not 0 < n_valid < n:
        raise ValueError(f"{source}: {n} items are too few to hold out valid_pct={valid_pct} and still train")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_valid:], order[:n_valid]


def _check_several_classes(labels: Sequence | torch.Tensor, source: object) -> None:
    found = set(labels.tolist() if isinstance(labels, torch.Tensor) else labels)
    if len(found) < 2:
        raise ValueError(f"{source}: expected at least 2 classes, found {len(found)} ({sorted(map(str, found))})")


def _class_labels(labels: np.ndarray, where: object) -> np.ndarray:
    """Class labels as int64, refusing what is not a class number: non-numeric, NaN, fractional, negative."""
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
        raise ValueError(f"{where}: labels of type {labels.dtype} are not class numbers; expected whole numbers 0..C-1")
    if np.issubdtype(labels.dtype, np.floating):
        fractional = labels[labels != np.round(labels)]  # NaN is != itself: counted here too
        if fractional.size:
            raise ValueError(f"{where}: {fractional.size} label(s) are not whole numbers (e.g. {fractional.flat[0]}); "
                             f"class labels must be 0..C-1. Round or map them to class numbers yourself, e.g. "
                             f"np.unique(labels, return_inverse=True)")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{where}: negative class label {labels.min()}; class labels must be 0..C-1")
    return labels


def _check_label_range(labels: Sequence[np.ndarray], source: object) -> int:
    """The class count max label + 1, refused when more than half of the classes 0..max occur in no split:
    labels such as 0, 1, 2 and 100000 are ids or a typo, not class numbers, and would build a
    100001-class model in silence."""
    present = np.unique(np.concatenate([np.asarray(y).ravel() for y in labels]))
    classes = int(present.max()) + 1
    if classes > 2 * len(present):
        shown = ", ".join(map(str, present[:6])) + (", ..." if len(present) > 6 else "")
        raise ValueError(f"{source}: labels go up to {classes - 1} (a {classes}-class model) but only {len(present)} "
                         f"distinct labels occur ({shown}): class labels must be 0..C-1 with few gaps. Renumber "
                         f"them, e.g. np.unique(labels, return_inverse=True)")
    return classes


def _warn_untrained_classes(train: Sequence, others: dict[str, Sequence], source: object,
                            names: Sequence[str] | None = None) -> None:
    """Warn when a class of another split (valid, test) has no training example: it is never predicted."""
    trained = set(train.tolist() if hasattr(train, "tolist") else train)
    for split, labels in others.items():
        missing = sorted(set(labels.tolist() if hasattr(labels, "tolist") else labels) - trained)
        if missing:
            shown = [names[k] if names is not None else k for k in missing]
            warnings.warn(f"{source}: class(es) {', '.join(map(str, shown))} of the {split} split have no training "
                          f"image: the model never predicts them and scores 0 on their {split} images", stacklevel=4)


def _check_finite_pixels(images: np.ndarray, where: object) -> None:
    """Refuse NaN or infinite pixels (float images): they make the loss NaN."""
    if not np.issubdtype(images.dtype, np.floating):
        return
    bad = ~np.isfinite(images)
    if bad.any():
        per_image = bad.reshape(len(images), -1).any(1)
        raise ValueError(f"{where}: {int(bad.sum())} NaN or infinite pixel value(s) in {int(per_image.sum())} "
                         f"image(s) (first: image {int(per_image.argmax())}); they would make the loss NaN. Fix or "
                         f"drop those images (e.g. np.nan_to_num)")


# ---------------------------------------------------------------------------------------------
# In-memory tensors (digits, Fashion-MNIST, MedMNIST)


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    x = x.float()
    if size is not None and x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def _batch_stats(batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over a stream of batches [B, C, H, W], summed in float64.

    Streaming means a large uint8 set is never converted to float all at once."""
    total = squares = None
    count = 0
    for x in batches:
        x = x.double()
        sums, sums_sq = x.sum((0, 2, 3)), (x * x).sum((0, 2, 3))
        total, squares = (sums, sums_sq) if total is None else (total + sums, squares + sums_sq)
        count += x.numel() // x.shape[1]
    mean = total / count
    # A constant channel would divide by zero; leave it merely centred.
    std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def _seeded_shuffle(dls: DataLoaders, seed: int) -> DataLoaders:
    # fastai seeds each loader's shuffling from the global `random`; pin it to `seed` instead
    # so runs repeat without touching global state.
    dls.train.rng = random.Random(seed)
    return dls


class _TensorImages(TensorDataset):
    """Images [N, C, H, W] as stored and their targets (class numbers, or float multi-hot [N, K] for multi-label
    data), with the class names `vocab`. ``dls.vocab``, ``dls.c`` and ``dls.multi_label`` read them here (fastai's
    DataLoaders pass unknown attributes on to the training set), so an exported Learner keeps them: its
    ``learn.export()`` empties the sets (fastai calls ``dataset.new_empty()``) and keeps the loaders' transforms
    and the names, no data."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, vocab: Sequence[str]):
        super().__init__(images, targets)
        self.vocab = list(vocab)

    @property
    def c(self) -> int:
        return len(self.vocab)

    @property
    def multi_label(self) -> bool:
        return self.tensors[1].ndim == 2

    def new_empty(self) -> _TensorImages:
        # new tensors: a slice t[:0] would share, and torch.save would write, the whole set's storage
        return _TensorImages(*(t.new_empty((0, *t.shape[1:])) for t in self.tensors), self.vocab)

    def decode(self, sample: tuple, full: bool = True) -> tuple:
        """A decoded sample (image, target), as `Learner.predict` shows it: the target as class name(s)."""
        if len(sample) < 2:  # a test set's sample: no target
            return sample
        image, target = sample
        if self.multi_label:
            return image, MultiCategory([self.vocab[k] for k in torch.nonzero(target.bool()).flatten().tolist()])
        return image, Category(self.vocab[int(target)])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _file_shown(given, limit: int = 80) -> str:
    """`given` (a path, usually) for a message: its end, where the file's name is, when it is long."""
    text = str(given)
    return text if len(text) <= limit else "..." + text[3 - limit:]


def _channels_first(pixels: torch.Tensor) -> torch.Tensor | None:
    """One image [C, H, W], [H, W] (1 channel) or channels last [H, W, C] (as in a .npz and PIL) as [C, H, W], with
    C 1 or 3; None for any other shape. Channels first wins where both read (an image 1 or 3 px wide)."""
    if pixels.ndim == 2:
        return pixels[None]
    if pixels.ndim == 3 and pixels.shape[0] in (1, 3):
        return pixels
    if pixels.ndim == 3 and pixels.shape[-1] in (1, 3):
        return pixels.permute(2, 0, 1)
    return None


class _StoredImage(ItemTransform):
    """Item transform of normfree's in-memory data: an item as the training images are stored, ``(image, target)``
    or ``(image,)``, the image [C, H, W] of the stored dtype, from whatever `Learner.predict` and ``dls.test_dl``
    are given: a dataset item (image, target), an image tensor or array ([C, H, W], [H, W] for 1 channel, or
    channels last [H, W, C]) of the stored size, or, where the stored pixels have a known white level (8-bit
    images; the digits' 0-16), an image file (str or Path) or PIL image of the stored size. Anything else is a
    TypeError or ValueError naming what the model takes."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, white: float | None):
        super().__init__()
        self.shape, self.dtype, self.white = tuple(shape), dtype, white

    def encodes(self, item: list):  # a dataset item (image, target), as fasttransform passes a tuple
        image, *target = item
        if isinstance(image, torch.Tensor) and tuple(image.shape) == self.shape:  # as a builder stored it
            return (image, *target)
        return (self.image(image), *target)

    def encodes(self, item: object):  # noqa: F811 (fasttransform dispatches on the annotated type)
        return (self.image(item),)

    @property
    def _takes(self) -> str:
        channels, height, width = self.shape
        layouts = f"[{channels}, {height}, {width}]" + (f" or [{height}, {width}]" if channels == 1 else
                                                        f" or [{height}, {width}, {channels}]")
        files = f", or an 8-bit image file or PIL image of {width}x{height} px" if self.white is not None else ""
        return f"one image as in training: a tensor or array {layouts} of {_dtype_name(self.dtype)} pixels{files}"

    def image(self, given) -> torch.Tensor:
        """`given` as one stored image [C, H, W]."""
        if isinstance(given, (str, Path, Image.Image)):
            return self._from_file(given)
        if isinstance(given, np.ndarray):
            given = torch.from_numpy(np.array(given))  # a copy: arrays may be read-only
        if not isinstance(given, torch.Tensor):
            raise TypeError(f"got {type(given).__name__}; this model takes {self._takes}")
        pixels = _channels_first(given)
        if pixels is None or tuple(pixels.shape) != self.shape:
            batch = "; for several images use learn.dls.test_dl(list(images))" if given.ndim == 4 else ""
            raise ValueError(f"got an image of shape {list(given.shape)}; this model takes {self._takes}{batch}")
        if pixels.dtype == self.dtype:
            return pixels
        if not self.dtype.is_floating_point:  # 8-bit pixels: other types only when they hold the same values
            low, high = torch.iinfo(self.dtype).min, torch.iinfo(self.dtype).max
            values = pixels.double()
            if not (values == values.round()).all() or values.min() < low or values.max() > high:
                raise ValueError(f"got {_dtype_name(pixels.dtype)} pixels from {values.min():g} to "
                                 f"{values.max():g}; this model was trained on {_dtype_name(self.dtype)} pixels "
                                 f"{low}-{high}: give whole numbers in that range (0-1 floats: (x * 255).round())")
        return pixels.to(self.dtype)

    def _from_file(self, given) -> torch.Tensor:
        channels, height, width = self.shape
        if self.white is None:
            raise TypeError(f"got {type(given).__name__} {_file_shown(given)}; this model was trained on "
                            f"{_dtype_name(self.dtype)} pixels of no fixed white level, which an image file cannot "
                            f"give: it takes {self._takes}")
        with Image.open(given) if isinstance(given, (str, Path)) else nullcontext(given) as image:
            if image.mode in _DEEP_MODES or image.size != (width, height):
                raise ValueError(f"{_file_shown(given)}: a {image.width}x{image.height} px image of PIL mode "
                                 f"{image.mode}; this model takes {self._takes}")
            pixels = torch.from_numpy(np.array(image.convert("L" if channels == 1 else "RGB")))
        pixels = _channels_first(pixels)
        return pixels if self.dtype == torch.uint8 else pixels.to(self.dtype) * (self.white / 255)


class StandardiseImages(ItemTransform):
    """Batch transform: stored pixels [B, C, H, W] (any dtype) -> standardised float at `size` px; decodes
    back to pixels (at `size` px).

    Done per batch, on the batch's device, so the stored set stays compact (uint8) and resizing
    runs on the GPU when there is one.
    """

    def __init__(self, size: int | None, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.size, self.mean, self.std = size, mean, std

    def encodes(self, batch):
        x, *rest = batch
        x = _resize(x, self.size)
        return ((x - self.mean.to(x.device)) / self.std.to(x.device), *rest)

    def decodes(self, batch):
        x, *rest = batch
        return (x * self.std.to(x.device) + self.mean.to(x.device), *rest)


def _tensor_dataloaders(splits: Sequence[tuple[torch.Tensor, torch.Tensor]], size: int | None, bs: int, seed: int,
                        device, vocab: Sequence[str], white: float | None = None) -> DataLoaders:
    """DataLoaders over (images [N, C, H, W], targets) splits: train first (shuffled, source of
    the statistics), then valid and any further split (e.g. test), at twice the batch size and at least
    `_MIN_EVAL_BS`.
    `vocab` names the classes; `white` is the stored value of a white pixel (uint8: 255), for image files given
    to `Learner.predict` (None: image files are refused)."""
    train_images = splits[0][0]
    chunks = (_resize(train_images[i : i + 4096], size) for i in range(0, len(train_images), 4096))
    mean, std = _batch_stats(chunks)
    standardise = StandardiseImages(size, mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1))
    stored = _StoredImage(train_images.shape[1:], train_images.dtype,
                          255 if train_images.dtype == torch.uint8 else white)
    loaders = [
        TfmdDL(_TensorImages(x, y, vocab), bs=bs if i == 0 else max(2 * bs, _MIN_EVAL_BS), shuffle=i == 0,
               num_workers=0, after_item=stored, after_batch=standardise)
        for i, (x, y) in enumerate(splits)
    ]
    return _seeded_shuffle(DataLoaders(*loaders, device=device), seed)


def digits_dataloaders(
    bs: int = 64,
    size: int = 32,
    valid_pct: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
    device: torch.device | str | None = None,
) -> DataLoaders:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes), always available offline.

    Images are 1-channel, resized to `size` px (bilinear) and standardised with the training
    split's mean and std; `valid_pct` of the images, chosen with `seed`, are held out.
    `seed` also fixes the order of the training batches. `limit` keeps the first n images of
    each split (after the random split) for quick runs.
    """
    from sklearn.datasets import load_digits

    check_bs(bs)
    check_valid_pct(valid_pct)
    check_limit(limit)
    if size < 8:
        raise ValueError(f"size must be >= 8 px (the digits are 8x8), got {size}")
    pixels, labels = load_digits(return_X_y=True)
    images = torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 8, 8)
    targets = torch.tensor(labels, dtype=torch.long)
    train, valid = _random_split(len(images), valid_pct, seed, "digits")
    train, valid = train[:limit], valid[:limit]
    splits = [(images[train], targets[train]), (images[valid], targets[valid])]
    return _tensor_dataloaders(splits, size, bs, seed, device, [str(d) for d in range(10)], white=_DIGITS_WHITE)


def subset_dataloaders(
    dls: DataLoaders,
    classes: Sequence[int] | None = None,
    per_class: int | None = None,
    holdout_pct: float | None = None,
    seed: int = 0,
) -> DataLoaders:
    """normfree's in-memory DataLoaders (digits, Fashion-MNIST, MedMNIST) narrowed, for transfer
    learning and for tuning without the validation split:

    - `classes`: keep only these labels, renumbered 0..k-1 in the order given (every split);
    - `per_class`: at most this many training images of each class, drawn with `seed` (a class with fewer
      trains on all of its images, named in a warning);
    - `holdout_pct`: validate on this fraction of the (remaining) training images, drawn with `seed`,
      instead of the data's validation split, which is then not used at all (nor a test split):
      hyperparameters chosen on it never saw the validation images.

    The standardisation statistics are measured again on the training images that remain.
    ValueError naming the argument for anything that cannot work.
    """
    if not isinstance(dls.train_ds, _TensorImages):
        raise ValueError("classes, per_class and holdout work with in-memory data (the DataLoaders of a builder that "
                         "takes a limit, such as digits_dataloaders), not image folders or CSVs")
    (stored,), (standardise,) = dls.train.after_item.fs, dls.train.after_batch.fs  # _tensor_dataloaders' own
    splits = [ds.tensors for ds in (dls.train_ds, dls.valid_ds, *(dl.dataset for dl in dls.loaders[2:]))]
    c, vocab = dls.c, dls.vocab
    if classes is not None:
        if dls.multi_label:
            raise ValueError("classes: multi-label data cannot be narrowed to classes")
        classes = list(classes)
        if len(set(classes)) != len(classes) or len(classes) < 2 or not all(0 <= k < c for k in classes):
            raise ValueError(f"classes: need two or more distinct labels in 0..{c - 1}, got {classes}")
        relabel = torch.full((c,), -1, dtype=torch.long)
        relabel[classes] = torch.arange(len(classes))
        splits = [(x[relabel[y] >= 0], relabel[y][relabel[y] >= 0]) for x, y in splits]
        c = len(classes)
        vocab = [vocab[k] for k in classes]
    generator = torch.Generator().manual_seed(seed)
    if per_class is not None:
        if dls.multi_label:
            raise ValueError("per_class: multi-label data has no single class per image")
        x, y = splits[0]
        counts = torch.bincount(y, minlength=c)
        short = [f"{vocab[k]} ({int(counts[k])})" for k in range(c)
                 if counts[k] < per_class]
        if short:
            warnings.warn(f"per_class {per_class} is more than the training images of class(es) {', '.join(short)}: "
                          f"those train on all of theirs", stacklevel=2)
        keep = torch.cat([idx[torch.randperm(len(idx), generator=generator)[:per_class]]
                          for idx in (torch.nonzero(y == k).flatten() for k in range(c))]).sort().values
        splits[0] = (x[keep], y[keep])
    if holdout_pct is not None:
        x, y = splits[0]
        order = torch.randperm(len(x), generator=generator)
        n_valid = round(len(x) * holdout_pct)
        if not 0 < n_valid < len(x):
            raise ValueError(f"holdout: {holdout_pct:.0%} of {len(x)} training images leaves nothing to train or "
                             f"validate on")
        splits = [(x[order[n_valid:]], y[order[n_valid:]]), (x[order[:n_valid]], y[order[:n_valid]])]
    if not dls.multi_label:
        _check_several_classes(splits[0][1], "the narrowed training split")
    narrowed = _tensor_dataloaders(splits, standardise.size, dls.train.bs, seed, dls.device, vocab, stored.white)
    if len(splits) > 2:
        narrowed.test = narrowed[2]
    return narrowed


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped if its name ends in ``.gz``.

    Checks the magic number (against `expected_magic` too, e.g. 2051 images / 2049 labels) and
    that the data length matches the big-endian dimensions. Raises ValueError naming `path`.
    """
    path = _existing(path, "an IDX file")
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:  # bad or truncated gzip stream
        raise ValueError(f"{path}: cannot decompress IDX file ({error})") from error
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, expected a 4-byte magic number)")
    magic = int.from_bytes(raw[:4], "big")
    ndim, type_code = raw[3], raw[2]
    if raw[:2] != b"\0\0" or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: not an IDX file (magic number {magic:#010x})")
    if expected_magic is not None and magic != expected_magic:
        wanted = _IDX_DTYPES.get((expected_magic >> 8) & 0xFF)
        raise ValueError(f"{path}: IDX magic number {magic}, expected {expected_magic} (found "
                         f"{np.dtype(_IDX_DTYPES[type_code]).name} data in {ndim} dim(s), expected "
                         f"{np.dtype(wanted).name if wanted else '?'} in {expected_magic & 0xFF})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header} for {ndim} dims)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX data is {len(raw) - header} bytes, expected {expected} for dims {dims}"
            + (" (truncated)" if len(raw) - header < expected else "")
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _fashion_split(folder: Path, prefix: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
    images = read_idx(_existing(images_path, "a Fashion-MNIST IDX images file"), _IDX_IMAGES)
    labels = read_idx(_existing(labels_path, "a Fashion-MNIST IDX labels file"), _IDX_LABELS)
    if len(images) != len(labels):
        raise ValueError(f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(images) == 0:
        raise ValueError(f"{images_path}: no images")
    # The magic numbers fix both files to uint8: labels are whole numbers >= 0 and pixels finite.
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: label {labels.max()} found, expected 0..{len(FASHION_MNIST_CLASSES) - 1}")
    images, labels = images[:limit], labels[:limit]
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def fashion_mnist_dataloaders(
    path: str | Path = "/usr/share/datasets/fashion-mnist",
    bs: int = 64,
    size: int = 28,
    seed: int = 0,
    limit: int | None = None,
    device: torch.device | str | None = None,
) -> DataLoaders:
    """Fashion-MNIST (28x28 grayscale, 10 classes) from the four IDX ``.gz`` files in `path`.

    Train = ``train-*`` files, valid = ``t10k-*``; `limit` keeps the first n of each for quick
    runs. `seed` fixes the order of the training batches. (Debian: ``dataset-fashion-mnist``.)
    """
    check_bs(bs)
    check_limit(limit)
    folder = _existing(path, "a folder with the Fashion-MNIST IDX .gz files")
    splits = [_fashion_split(folder, prefix, limit) for prefix in ("train", "t10k")]
    _check_several_classes(splits[0][1], folder / "train-labels-idx1-ubyte.gz")
    _warn_untrained_classes(splits[0][1], {"t10k": splits[1][1]}, folder, FASHION_MNIST_CLASSES)
    return _tensor_dataloaders(splits, size, bs, seed, device, FASHION_MNIST_CLASSES)


def _medmnist_array(data, key: str, source: Path, limit: int | None) -> np.ndarray:
    try:
        return data[key][:limit]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{source}: cannot read {key} ({error}): truncated or corrupt .npz?") from None


def _medmnist_split(data, split: str, source: Path, limit: int | None) -> tuple[torch.Tensor, np.ndarray]:
    images = _medmnist_array(data, f"{split}_images", source, limit)
    labels = _medmnist_array(data, f"{split}_labels", source, limit)
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ValueError(f"{source}: {split}_images has shape {images.shape}, expected [N, H, W] or [N, H, W, 3]")
    if not (np.issubdtype(images.dtype, np.number) or images.dtype == np.bool_):
        raise ValueError(f"{source}: {split}_images holds {images.dtype} values, expected numbers (uint8 pixels)")
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2:
        raise ValueError(f"{source}: {split}_labels has shape {labels.shape}, expected [N, 1] or [N, K]")
    if len(images) != len(labels):
        raise ValueError(f"{source}: {split} has {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError(f"{source}: {split} split is empty")
    _check_finite_pixels(images, f"{source}: {split}_images")
    pixels = torch.from_numpy(images)
    pixels = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2).contiguous()
    return pixels, _class_labels(labels, f"{source}: {split}_labels")


# An .npz is a zip archive (numpy.savez); this is the start of every zip file with at least one member.
_ZIP_MAGIC = b"PK\x03\x04"


def medmnist_dataloaders(
    npz_path: str | Path,
    bs: int = 64,
    size: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    device: torch.device | str | None = None,
) -> DataLoaders:
    """A MedMNIST ``.npz`` (keys ``{train,val,test}_{images,labels}``) as DataLoaders.

    Images uint8 [N, H, W] (1 channel) or [N, H, W, 3] (RGB), resized to `size` px if given
    (other numeric types are standardised the same way; NaN or infinite pixels are refused).
    Labels [N, 1] give integer targets (``dls.c`` = max label + 1); [N, K] with K > 1 are
    multi-label: float multi-hot targets, ``dls.c = K`` and ``dls.multi_label = True``. Except one-hot
    labels: [N, K] with exactly one 1 in every row of every split are almost certainly one class per
    image, so they are read as K single-label classes (class = the column of the 1, ``dls.c = K``,
    ``dls.multi_label = False``) with a warning; multi-label training would score them with a 0.5
    threshold per column and report an accuracy near 1 - 1/K for a model that predicts nothing.
    Labels must be whole numbers (floats such as 0.5 are refused, 2.0 is class 2) and class
    numbers 0..C-1: labels whose max + 1 is more than twice the number of distinct labels in
    the file (more than half of the classes 0..max never occur, e.g. 0, 1, 2 and 100000) are
    refused rather than building a mostly empty classifier. A class of the val or test split
    with no training image is named in a warning (it would score 0).
    Train = train, valid = val; the test split is ``dls.test`` (also ``dls[2]``), so
    ``learn.validate(ds_idx=2)`` scores it. `seed` fixes the order of the training batches.
    `limit` keeps the first n images of each split for quick runs.
    """
    check_bs(bs)
    check_limit(limit)
    source = _existing(npz_path, "a MedMNIST .npz file")
    if source.is_dir():
        raise ValueError(f"{source}: a folder, expected a MedMNIST .npz file")
    with open(source, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        found = "the file is empty" if not head else f"this file begins {head!r}"
        raise ValueError(f"{source}: not an .npz archive (numpy.savez writes a zip file; {found}). Give the MedMNIST "
                         f".npz file itself, e.g. as downloaded by the medmnist package")
    try:
        data = np.load(source, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{source}: not a readable .npz archive ({error}): truncated or corrupt?") from None
    with data:
        missing = [key for key in _MEDMNIST_KEYS if key not in data.files]
        if missing:
            raise ValueError(
                f"{source}: missing keys {missing}; expected {_MEDMNIST_KEYS}, found {sorted(data.files)}"
            )
        splits = [_medmnist_split(data, split, source, limit) for split in ("train", "val", "test")]
    shapes = {tuple(images.shape[1:]) for images, _ in splits}
    widths = {labels.shape[1] for _, labels in splits}
    if len(shapes) > 1 or len(widths) > 1:
        raise ValueError(f"{source}: splits disagree on image shape {shapes} or label width {widths}")
    width = widths.pop()
    one_hot = width > 1 and all(((labels == 0) | (labels == 1)).all() and (labels.sum(1) == 1).all()
                                for _, labels in splits)
    if one_hot:
        warnings.warn(f"{source}: the {width}-column labels are one-hot (exactly one 1 in every row of every split): "
                      f"read as {width} single-label classes (the column of the 1), not as multi-label; give "
                      f"[N, 1] class numbers to silence this", stacklevel=2)
        splits = [(images, labels.argmax(1)[:, None]) for images, labels in splits]
    multi_label = width > 1 and not one_hot
    if multi_label:
        for split, (_, labels) in zip(("train", "val", "test"), splits):
            if ((labels != 0) & (labels != 1)).any():
                raise ValueError(f"{source}: {split}_labels has {labels.shape[1]} columns (multi-label) but holds "
                                 f"values other than 0 and 1 (e.g. {labels[(labels != 0) & (labels != 1)][0]})")
        targets = [torch.from_numpy(labels.astype(np.float32)) for _, labels in splits]
        c = splits[0][1].shape[1]
    else:
        targets = [torch.from_numpy(labels[:, 0]) for _, labels in splits]
        _check_several_classes(targets[0], f"{source} (train_labels)")
        c = width if one_hot else _check_label_range([labels for _, labels in splits], source)
        _warn_untrained_classes(targets[0], {"val": targets[1], "test": targets[2]}, source)
    dls = _tensor_dataloaders([(images, t) for (images, _), t in zip(splits, targets)], size, bs, seed, device,
                              [str(k) for k in range(c)])
    dls.test = dls[2]
    return dls


# ---------------------------------------------------------------------------------------------
# Image files (folders, CSV)


# PIL modes deeper than 8 bits -> the value that maps to 1.0. fastai's ImageBlock opens every image as 8-bit
# RGB, which clips 16-bit values (a 16-bit PNG comes out white) and truncates float ones (a 0-1 float TIFF
# comes out black). These are read as float at full depth instead: 16-bit (and 32-bit integer) images on the
# 16-bit scale, 0..65535 -> 0..1; float images as stored (float data has no fixed range; 0..1 is the usual
# convention, and physical units such as CT's Hounsfield units are kept). Either way the per-channel
# standardisation with the training images' mean and std brings them to mean 0, std 1, and one fixed scale
# for all images keeps their intensities comparable, which a per-image min-max scaling would not.
_DEEP_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1}


def _non_finite(pixels: np.ndarray) -> str | None:
    bad = int((~np.isfinite(pixels)).sum())
    return f"{bad} of {pixels.size} pixels are NaN or infinite" if bad else None


class _FullDepthImage(PILImage):
    """`PILImage` that opens 16-bit, 32-bit integer and float images at full depth (see `_DEEP_MODES`) as a
    float ``F`` image in the 0-255 units of fastai's pipeline (`IntToFloatTensor` then divides by 255);
    8-bit images open as fastai opens them (RGB).

    `create` reads what `Learner.predict` and ``dls.test_dl`` are given: an image file (str, Path or bytes), a PIL
    image, an image tensor ([C, H, W] or [H, W], C 1 or 3) or array (as PIL reads arrays: [H, W] or [H, W, C]),
    each as the file holding those pixels would be read, or an image this class opened (``dls.valid_ds``'s)."""

    @classmethod
    def create(cls, fn: object, **kwargs):  # `object`: fastai would pass any type not annotated here on untouched
        if isinstance(fn, cls):
            return fn
        if isinstance(fn, (str, Path, bytes)):
            with Image.open(io.BytesIO(fn) if isinstance(fn, bytes) else fn) as image:
                return cls._read(image, "the image" if isinstance(fn, bytes) else str(fn))
        if isinstance(fn, Image.Image):
            return cls._read(fn, "the image")
        pixels = fn
        if isinstance(fn, torch.Tensor):
            channels_first = _channels_first(fn)
            pixels = None if channels_first is None else channels_first.permute(1, 2, 0).squeeze(-1).cpu().numpy()
        try:
            image = Image.fromarray(pixels)
        except (TypeError, ValueError, AttributeError):  # PIL's words for pixels it cannot hold (None included)
            raise TypeError(f"got {type(fn).__name__} {list(getattr(fn, 'shape', []))} {getattr(fn, 'dtype', '')}; "
                            f"this model takes an image file, a PIL image, or pixels a PIL image holds: a tensor "
                            f"[C, H, W] or [H, W] (3 channels: uint8 only) or an array [H, W] or [H, W, 3]") from None
        return cls._read(image, "the image")

    @classmethod
    def _read(cls, image: Image.Image, name: str) -> _FullDepthImage:
        if image.mode not in _DEEP_MODES:
            return cls(image.convert("RGB"))
        pixels = np.asarray(image, dtype=np.float32) * np.float32(255 / _DEEP_MODES[image.mode])
        problem = _non_finite(pixels)
        if problem:  # the builders skip such files; this is for images given later (predict)
            raise ValueError(f"{name}: {problem}; fix or remove this image")
        return cls(Image.fromarray(pixels))


class _FloatRGB(Transform):
    """Item transform after `ToTensor`: every image as float with 3 channels, so full-depth (1-channel
    float) and 8-bit (RGB uint8) images can share a batch."""

    order = 6

    def encodes(self, x: TensorImage) -> TensorImage:
        x = x.float()
        return x.repeat(3, 1, 1) if x.shape[0] == 1 else x


def _image_problem(path: Path) -> str | None:
    """Why PIL cannot use the image at `path`, or None. The header check (`verify`) misses a file cut short
    (a JPEG truncated at 90% passes it and fails in a DataLoader worker mid-training), so every image is
    also decoded, JPEGs at 1/8 scale (`draft`: the whole file is still read, in about half the time of a full
    decode); float images are then looked at for NaN or infinite pixels."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.draft(None, (1, 1))  # JPEG only: decode at the smallest scale; other formats ignore it
            image.load()
            if image.mode == "F":
                return _non_finite(np.asarray(image))
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ...) for bad files
        return str(error) or type(error).__name__
    return None


def _open_image(image):  # no annotations: fastai's pipeline would pass any other type through unopened
    """`_FullDepthImage.create` (a path, a PIL image or a tensor), naming the file in an error: an image that
    fails to decode during training (changed since the check, or a fault the check cannot see) otherwise stops
    a DataLoader worker with only e.g. "image file is truncated"."""
    try:
        return _FullDepthImage.create(image)
    except (OSError, SyntaxError, ValueError) as error:
        if not isinstance(image, (str, Path)) or str(image) in str(error):
            raise
        raise type(error)(f"{image}: {error}; fix or remove this image") from error


def _readable_images(paths: Sequence[Path], on_bad_image: str, source: object) -> list[Path]:
    """`paths` minus files PIL cannot open and decode in full and float images with NaN or infinite pixels."""
    good, bad = [], []
    for p in paths:
        problem = _image_problem(p)
        if problem is None:
            good.append(p)
        elif on_bad_image == "error":
            raise ValueError(f"{source}: unreadable or corrupt image {p} ({problem})")
        else:
            bad.append((p, problem))
    if bad:
        warnings.warn(f"{source}: skipped {len(bad)} unreadable or corrupt image(s), e.g. {bad[0][0]} ({bad[0][1]})",
                      stacklevel=4)
    return good


def _hidden(parts: Iterable[str]) -> bool:
    """Whether a path with these parts is hidden (a part such as ``.ipynb_checkpoints`` or macOS's ``._0.png``):
    editor and system copies, never data."""
    return any(part.startswith(".") and part not in (".", "..") for part in parts)


def _warn_label_spellings(labels: Sequence[str], source: object) -> None:
    """Warn when labels differ only in case or surrounding spaces (``cat``, `` cat``, ``Cat``): each spelling
    is a class of its own, almost always by mistake."""
    counts: dict[str, dict[str, int]] = {}
    for label in labels:
        spellings = counts.setdefault(label.strip().casefold(), {})
        spellings[label] = spellings.get(label, 0) + 1
    for spellings in counts.values():
        if len(spellings) > 1:
            shown = ", ".join(f"{label!r} ({n} images)" for label, n in sorted(spellings.items()))
            warnings.warn(f"{source}: labels {shown} differ only in case or surrounding spaces: they are "
                          f"{len(spellings)} classes; spell them alike if they are one", stacklevel=4)


class _ImageOf(ItemTransform):
    """First image transform of the image folder and CSV data: a dataset item (image, label), as `predict` and
    `test_dl` may be given one, -> its image; anything else (paths, images, tensors) as it is."""

    input_types = object  # fastai's `test_dl` then passes every test item through here (its `infer_idx`)

    def encodes(self, item: list):  # a tuple arrives as a list
        return item[0]

    def encodes(self, item: object):  # noqa: F811 (fasttransform dispatches on the annotated type)
        return item


# The image-file builders' splits: "train" (the random split takes `valid_pct` of it when no image is "valid"),
# "valid" and "test" (held out: never trained on nor validated on; dls.test).
_SPLITS = ("train", "valid", "test")


def _image_dataloaders(
    paths: Sequence[Path],
    labels: Sequence[str],
    splits: Sequence[str],
    source: object,
    bs: int,
    size: int,
    valid_pct: float,
    seed: int,
    on_bad_image: str,
    device,
) -> DataLoaders:
    """Shared by the folder and CSV builders: drop bad images, split (each image's split from `splits`, the
    valid split drawn from train with `valid_pct` when none is given), then Normalize with per-channel stats
    of up to `_STATS_IMAGES` training images."""
    if not paths:
        raise ValueError(f"{source}: no images found")
    label_of = dict(zip(paths, labels))
    split_of = dict(zip(paths, splits))
    paths = _readable_images(paths, on_bad_image, source)
    if not paths:
        raise ValueError(f"{source}: no readable images")
    _warn_label_spellings([label_of[p] for p in paths], source)
    vocab = sorted(set(label_of[p] for p in paths))
    _check_several_classes(vocab, source)
    train, valid, test = ([i for i, p in enumerate(paths) if split_of[p] == split] for split in _SPLITS)
    if "valid" not in splits:
        train, valid = ([train[i] for i in idx.tolist()] for idx in _random_split(len(train), valid_pct, seed, source))
    if not train or not valid:
        raise ValueError(f"{source}: the {'train' if not train else 'valid'} split has no readable images")
    _warn_untrained_classes([label_of[paths[i]] for i in train],
                            {split: [label_of[paths[i]] for i in idx] for split, idx in (("valid", valid),
                                                                                        ("test", test)) if idx},
                            source)
    index_splits = (train, valid, test) if test else (train, valid)

    def dataloaders(batch_tfms: list) -> DataLoaders:
        # The paths and their labels as two lists (no dict of labels in a transform), so an exported Learner,
        # whose lists fastai empties, keeps neither.
        images = TfmdLists(paths, [_ImageOf(), _open_image], splits=index_splits)
        classes = TfmdLists([label_of[p] for p in paths], [Categorize(vocab)], splits=index_splits)
        return _seeded_shuffle(Datasets(tls=[images, classes]).dataloaders(
            bs=bs, device=device, after_item=[Resize(size), ToTensor(), _FloatRGB()],
            after_batch=[IntToFloatTensor(), *batch_tfms]), seed)

    # Measure a seeded sample of the training images as the network will see them (resized, 0-1).
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:_STATS_IMAGES]
    sample = [paths[train[i]] for i in order.tolist()]
    mean, std = _batch_stats(x for (x,) in dataloaders([]).test_dl(sample, bs=bs))
    dls = dataloaders([Normalize.from_stats(mean, std)])
    if test:
        dls.test = dls[2]
    return dls


# Folder names that image_folder_dataloaders reads as a split rather than a class (compared ignoring case).
_SPLIT_FOLDERS = {"train": ("train", "training"), "valid": ("valid", "val", "validation"), "test": ("test", "testing")}


def _visible_folders(root: Path) -> list[Path]:
    """The subfolders of `root` by name, hidden ones (``.ipynb_checkpoints``, ``.git``) left out."""
    return sorted(d for d in root.iterdir() if d.is_dir() and not _hidden([d.name]))


def _class_folder_images(root: Path) -> tuple[list[Path], list[str]]:
    """Images under each class subfolder of `root` (``root/<class>/**/<image>``), with their class. fastai's
    `get_image_files` leaves out hidden files and folders below the class folders."""
    paths, labels = [], []
    for folder in _visible_folders(root):
        found = sorted(get_image_files(folder))
        paths += found
        labels += [folder.name] * len(found)
    return paths, labels


def _split_folders(root: Path) -> dict[str, Path]:
    """The folders of `root` named as a split (`_SPLIT_FOLDERS`), by split; ValueError when two name the same one."""
    found: dict[str, Path] = {}
    for folder in _visible_folders(root):
        split = next((split for split, names in _SPLIT_FOLDERS.items() if folder.name.casefold() in names), None)
        if split is None:
            continue
        if split in found:
            raise ValueError(f"{root}: both {found[split].name}/ and {folder.name}/ name the {split} split; keep one "
                             f"of them (rename or move the other out of {root})")
        found[split] = folder
    return found


def _split_folder_images(root: Path, folders: dict[str, Path]) -> tuple[list[Path], list[str], list[str]]:
    """Images, classes and splits of a split layout (``root/train/<class>/<image>``, ...)."""
    others = [d.name for d in _visible_folders(root) if d not in folders.values()]
    if others:
        raise ValueError(f"{root}: {folders['train'].name}/ holds class folders, so {root} is read as split folders "
                         f"(train/, val/, test/), but {', '.join(f'{name}/' for name in others)} next to it "
                         f"name no split; move such folders into the splits as class folders, or out of {root}")
    paths, labels, splits = [], [], []
    for split, folder in folders.items():
        found, classes = _class_folder_images(folder)
        if not found and split == "test":
            unlabelled = len(get_image_files(folder))
            warnings.warn(f"{root}: {folder.name}/ has no class folders of images ({unlabelled} image(s) directly in "
                          f"it, without labels): no test split; score unlabelled images with "
                          f"learn.get_preds(dl=dls.test_dl(files))", stacklevel=3)
        elif not found:
            raise ValueError(f"{root}: no images in {folder}/<class>/")
        paths, labels, splits = paths + found, labels + classes, splits + [split] * len(found)
    return paths, labels, splits


def _without_duplicate_files(paths: list[Path], labels: list[str], splits: list[str],
                             source: object) -> tuple[list[Path], list[str], list[str]]:
    """Each file once, however it is reached (a symlink, ``x/../x/0.png``): a second path to a file of the same
    class and split is dropped with a warning; the same file in two classes or two splits is refused (it would
    be both labels, or trained on and scored)."""
    first: dict[Path, int] = {}
    keep, dropped = [], []
    for i, path in enumerate(paths):
        j = first.setdefault(path.resolve(), i)
        if j == i:
            keep.append(i)
        elif (labels[i], splits[i]) == (labels[j], splits[j]):
            dropped.append((path, paths[j]))
        else:
            raise ValueError(f"{source}: {path} and {paths[j]} are the same file, in class {labels[i]!r} ({splits[i]}) "
                             f"and class {labels[j]!r} ({splits[j]}); keep it in one place")
    if dropped:
        warnings.warn(f"{source}: {len(dropped)} image path(s) reach a file already found (e.g. {dropped[0][0]} is "
                      f"{dropped[0][1]}): each file is used once", stacklevel=3)
    return [paths[i] for i in keep], [labels[i] for i in keep], [splits[i] for i in keep]


def image_folder_dataloaders(
    path: str | Path,
    bs: int = 64,
    size: int = 64,
    valid_pct: float = 0.2,
    seed: int = 0,
    on_bad_image: str = "skip",
    device: torch.device | str | None = None,
) -> DataLoaders:
    """ImageNet-style class folders: ``path/<class>/<image>``, or split folders each holding class folders:
    ``path/train/<class>/...`` with a validation split ``valid/``, ``val/`` or ``validation/`` (then `valid_pct`
    is unused) and a held-out ``test/``. Split names are matched ignoring case (``training/`` and ``testing/``
    are read as train/ and test/); two folders naming one split (``val/`` and ``valid/``) are refused. Without
    a validation folder `valid_pct` of train/'s images, chosen with `seed`, are held out. test/ is never
    trained on nor validated on: it is ``dls.test`` (also ``dls[2]``), so ``learn.validate(ds_idx=2)`` scores
    it; a test/ without class folders (unlabelled images) is left out with a warning. A folder whose train/
    holds class folders must hold nothing but split folders (other folders next to train/ are refused), and
    in a folder of classes a folder named as a split other than train is refused rather than made a class.

    Hidden files and folders (``.ipynb_checkpoints``, macOS's ``._0.png``) are never classes nor images.
    A file reached by two paths (a symlink, ``x/../x/0.png``) is used once (warning); the same file in two
    classes or two splits is refused. Class names that differ only in case or surrounding spaces are named
    in a warning (they are separate classes).

    Images are opened as RGB and resized to `size` px (`Resize`: crop to square, centre crop on
    valid); 16-bit and float images (PIL modes I;16, I, F) at full depth, see `_DEEP_MODES`.
    Normalize uses per-channel stats computed on (up to 1024 of) the training images,
    not ImageNet's. Every image is decoded once before training (`_image_problem`; measured on one core:
    0.2-0.3 ms per 64 px image, 1 ms per 500x375 JPEG): unreadable, corrupt or truncated files, and float
    images with NaN or infinite pixels, are skipped with a warning naming them (``on_bad_image="skip"``) or
    raise ValueError (``"error"``); a file
    that still fails during training raises an error naming it. A valid or test class with no training
    image is named in a warning. `seed` picks the random split and the training order.
    """
    _check_image_options(bs, valid_pct, on_bad_image)
    root = _existing(path, "a folder of class subfolders of images")
    if not root.is_dir():
        raise ValueError(f"{root}: expected a folder of class subfolders of images, found a file")
    folders = _split_folders(root)
    if "train" in folders and _visible_folders(folders["train"]):
        paths, labels, splits = _split_folder_images(root, folders)
    else:
        misnamed = [folder.name for split, folder in folders.items() if split != "train" or len(folders) > 1]
        if misnamed:
            raise ValueError(f"{root}: {', '.join(f'{name}/' for name in misnamed)} would be class(es) but "
                             f"{'is a split name' if len(misnamed) == 1 else 'are split names'}; for split "
                             f"folders put class folders in each (train/<class>/<image>, val/<class>/<image>), "
                             f"else rename {'it' if len(misnamed) == 1 else 'them'}")
        paths, labels = _class_folder_images(root)
        splits = ["train"] * len(paths)
    paths, labels, splits = _without_duplicate_files(paths, labels, splits, root)
    return _image_dataloaders(paths, labels, splits, root, bs, size, valid_pct, seed, on_bad_image, device)


def csv_dataloaders(
    csv_path: str | Path,
    path_col: str = "path",
    label_col: str = "label",
    folder: str | Path | None = None,
    bs: int = 64,
    size: int = 64,
    valid_pct: float = 0.2,
    seed: int = 0,
    on_bad_image: str = "skip",
    device: torch.device | str | None = None,
) -> DataLoaders:
    """A CSV of image paths (relative to `folder`, default the CSV's folder) and class labels.

    Same images, resizing, normalisation and bad-image handling as `image_folder_dataloaders`;
    `valid_pct` of the rows, chosen with `seed`, are held out. Labels are used as strings, exactly as
    written: labels that differ only in case or surrounding spaces (``cat``, `` cat``) are separate classes,
    named in a warning. A missing image file counts as a bad image. Rows naming a hidden file or folder
    (``.ipynb_checkpoints/...``, macOS's ``._0.png``; for absolute paths the file name only) are skipped
    with a warning. Two rows naming the same file, however written (``x/0.png``, ``x/../x/0.png``, a
    symlink), are refused: the image could land in both the training and the validation split.
    """
    import pandas as pd

    _check_image_options(bs, valid_pct, on_bad_image)
    csv_path = _existing(csv_path, "a CSV of image paths and labels")
    base = _existing(folder, "the folder the CSV's image paths are relative to") if folder else csv_path.parent
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"{csv_path}: not a readable CSV ({error})") from error
    missing = [col for col in (path_col, label_col) if col not in table.columns]
    if missing:
        raise ValueError(
            f"{csv_path}: missing columns {missing}; expected {[path_col, label_col]}, found {list(table.columns)}"
        )
    empty = (table[path_col] == "") | (table[label_col] == "")
    if empty.any():
        raise ValueError(f"{csv_path}: row {int(empty.idxmax()) + 2} has an empty {path_col!r} or {label_col!r}")
    hidden = table[path_col].map(lambda p: _hidden(Path(p).parts if not Path(p).is_absolute() else [Path(p).name]))
    if hidden.any():
        warnings.warn(f"{csv_path}: skipped {int(hidden.sum())} row(s) naming a hidden file or folder (e.g. "
                      f"{table[path_col][hidden].iloc[0]}): editor and system copies such as .ipynb_checkpoints/ or "
                      f"macOS's ._ files, not images", stacklevel=2)
        table = table[~hidden]
    paths = [base / p for p in table[path_col]]
    row_of: dict[Path, int] = {}
    for row, p in zip(table.index, paths):
        first = row_of.setdefault(p.resolve(), row)
        if first != row:
            raise ValueError(f"{csv_path}: rows {first + 2} and {row + 2} name the same image "
                             f"({table[path_col][first]!r}, {table[path_col][row]!r}); list each image once")
    labels = table[label_col].tolist()
    return _image_dataloaders(paths, labels, ["train"] * len(paths), csv_path, bs, size, valid_pct, seed,
                              on_bad_image, device)
