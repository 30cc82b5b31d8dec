"""The DataLoaders builders in normfree.data: batch shapes, standardisation, IDX parsing and bad input."""
import gzip

import numpy as np
import pytest
import torch
from fastai.data.transforms import Normalize
from PIL import Image

from helpers import write_fashion, write_idx, write_npz
from normfree.data import (
    FASHION_MNIST_CLASSES,
    csv_dataloaders,
    fashion_mnist_dataloaders,
    image_folder_dataloaders,
    medmnist_dataloaders,
    read_idx,
)


def write_png(path, seed, size=10, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3) if mode == "RGB" else (size, size), dtype=np.uint8)
    Image.fromarray(pixels, mode=mode).save(path)
    return path


def write_folder(root, classes=("cat", "dog"), per_class=6, layout=""):
    seed = 0
    for cls in classes:
        for i in range(per_class):
            # A mix of gray and RGB files: every image must come out with 3 channels.
            write_png(root / layout / cls / f"{i}.png", seed, mode="L" if i % 2 else "RGB")
            seed += 1
    return root


def write_corrupt_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes())
    return path


def all_train_images(dls):
    return torch.cat([x for x, _ in dls.train])


def assert_standardised(dls, tol=0.15):
    x = all_train_images(dls).float()
    assert abs(x.mean().item()) < tol and abs(x.std().item() - 1) < tol


def files_under(path):
    return sorted((p, p.stat().st_size) for p in path.rglob("*"))


# ---------------------------------------------------------------------------------------------
# IDX / Fashion-MNIST


def test_read_idx_parses_known_bytes(tmp_path):
    labels = tmp_path / "labels.gz"
    labels.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([7, 0, 9])))
    np.testing.assert_array_equal(read_idx(labels, 2049), [7, 0, 9])
    images = tmp_path / "images"  # uncompressed works too
    images.write_bytes(b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (2, 1, 3)) + bytes(range(6)))
    parsed = read_idx(images, 2051)
    assert parsed.dtype == np.uint8 and parsed.shape == (2, 1, 3)
    np.testing.assert_array_equal(parsed.ravel(), range(6))


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x00\x00\x08\x03" + (5).to_bytes(4, "big"), "magic number 2051, expected 2049"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(3), "truncated"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(6), "expected 5"),
        (b"\x12\x34\x56\x78", "not an IDX file"),
        (b"\x00\x00", "truncated"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, payload, message):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(ValueError, match=message) as error:
        read_idx(path, 2049)
    assert str(path) in str(error.value)


def test_read_idx_rejects_a_broken_gzip_and_a_missing_file(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(bytes(100))[:-10])
    with pytest.raises(ValueError, match="decompress") as error:
        read_idx(path)
    assert str(path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="nowhere.gz"):
        read_idx(tmp_path / "nowhere.gz")


def test_fashion_mnist_batches(tmp_path):
    folder = write_fashion(tmp_path / "fm")
    before = files_under(tmp_path)
    dls = fashion_mnist_dataloaders(folder, bs=8)
    x, y = dls.one_batch()
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dls.c == 10 and dls.vocab == FASHION_MNIST_CLASSES
    assert len(dls.train.dataset) == 40 and len(dls.valid.dataset) == 20
    assert_standardised(dls)
    assert files_under(tmp_path) == before  # only reads

    small = fashion_mnist_dataloaders(folder, bs=4, size=16, limit=12)
    assert small.one_batch()[0].shape == (4, 1, 16, 16)
    assert len(small.train.dataset) == 12 and len(small.valid.dataset) == 12


def test_fashion_mnist_same_seed_same_order(tmp_path):
    folder = write_fashion(tmp_path / "fm")
    first, second = (fashion_mnist_dataloaders(folder, bs=8, seed=3).one_batch()[1] for _ in range(2))
    assert torch.equal(first, second)


def test_fashion_mnist_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        fashion_mnist_dataloaders(tmp_path / "missing-dir")

    folder = write_fashion(tmp_path / "no-labels")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        fashion_mnist_dataloaders(folder)

    folder = write_fashion(tmp_path / "count")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(39) % 10)
    with pytest.raises(ValueError, match="40 images but .*train-labels-idx1-ubyte.gz has 39 labels"):
        fashion_mnist_dataloaders(folder)

    folder = write_fashion(tmp_path / "magic")
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((40, 28, 28)), magic=2049)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: IDX magic number 2049, expected 2051"):
        fashion_mnist_dataloaders(folder)

    folder = write_fashion(tmp_path / "truncated")
    raw = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        fashion_mnist_dataloaders(folder)

    folder = write_fashion(tmp_path / "empty", n_train=0)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: no images"):
        fashion_mnist_dataloaders(folder)

    folder = write_fashion(tmp_path / "one-class")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(40))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: expected at least 2 classes"):
        fashion_mnist_dataloaders(folder)

    folder = write_fashion(tmp_path / "label-range")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(40) % 11)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: label 10"):
        fashion_mnist_dataloaders(folder)


# ---------------------------------------------------------------------------------------------
# MedMNIST


def test_medmnist_gray_single_label(tmp_path):
    npz = write_npz(tmp_path / "gray.npz")
    dls = medmnist_dataloaders(npz, bs=8)
    x, y = dls.one_batch()
    assert x.shape == (8, 1, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dls.c == 3 and dls.multi_label is False
    assert_standardised(dls)
    test_x, _ = next(iter(dls.test))
    assert dls.test is dls[2] and len(dls.test.dataset) == 8 and test_x.shape[1:] == (1, 12, 12)


def test_medmnist_rgb_and_resize(tmp_path):
    dls = medmnist_dataloaders(write_npz(tmp_path / "rgb.npz", channels=3), bs=4, size=20)
    assert dls.one_batch()[0].shape == (4, 3, 20, 20)
    assert_standardised(dls)


def test_medmnist_multi_label_gives_float_multi_hot(tmp_path):
    dls = medmnist_dataloaders(write_npz(tmp_path / "multi.npz", label_width=5), bs=8)
    _, y = dls.one_batch()
    assert y.shape == (8, 5) and y.dtype == torch.float32 and set(y.unique().tolist()) <= {0.0, 1.0}
    assert dls.c == 5 and dls.multi_label is True


def test_medmnist_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        medmnist_dataloaders(tmp_path / "nothing.npz")

    path = tmp_path / "keys.npz"
    np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8), x=np.zeros(1))
    with pytest.raises(ValueError) as error:
        medmnist_dataloaders(path)
    message = str(error.value)
    assert str(path) in message and "'val_images'" in message and "found ['train_images', 'x']" in message

    path = write_npz(tmp_path / "count.npz", val_labels=np.zeros((9, 1), np.uint8))
    with pytest.raises(ValueError, match="count.npz: val has 10 images but 9 labels"):
        medmnist_dataloaders(path)

    path = write_npz(tmp_path / "empty.npz", n=(0, 10, 8))
    with pytest.raises(ValueError, match="empty.npz: train split is empty"):
        medmnist_dataloaders(path)

    path = write_npz(tmp_path / "one.npz", train_labels=np.ones((30, 1), np.uint8))
    with pytest.raises(ValueError, match="one.npz.*expected at least 2 classes"):
        medmnist_dataloaders(path)

    path = write_npz(tmp_path / "3d.npz", shape=(6, 6, 6))
    with pytest.raises(ValueError, match=r"3d.npz: train_images has shape \(30, 6, 6, 6\), expected"):
        medmnist_dataloaders(path)

    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        medmnist_dataloaders(path)


# ---------------------------------------------------------------------------------------------
# Image folders and CSVs


def test_image_folder_random_split(tmp_path):
    root = write_folder(tmp_path / "imgs")
    before = files_under(tmp_path)
    dls = image_folder_dataloaders(root, bs=4, size=16, valid_pct=0.25)
    x, y = dls.one_batch()
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dls.c == 2 and list(dls.vocab) == ["cat", "dog"]
    assert len(dls.train.items) == 9 and len(dls.valid.items) == 3
    assert_standardised(dls, tol=0.25)
    assert files_under(tmp_path) == before  # only reads


def test_image_folder_train_valid_layout(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=4, layout="train")
    write_folder(root, per_class=2, layout="valid")
    dls = image_folder_dataloaders(root, bs=4, size=12)
    assert len(dls.train.items) == 8 and len(dls.valid.items) == 4
    assert all("valid" in p.parts for p in dls.valid.items)
    assert dls.one_batch()[0].shape == (4, 3, 12, 12)


def test_image_folder_corrupt_png_is_skipped_or_raises(tmp_path):
    root = write_folder(tmp_path / "imgs")
    bad = write_corrupt_png(root / "dog" / "broken.png")
    with pytest.warns(UserWarning, match=f"skipped 1 unreadable or corrupt image.*{bad}"):
        dls = image_folder_dataloaders(root, bs=4, size=12, valid_pct=0.25)
    assert bad not in list(dls.train.items) + list(dls.valid.items)
    with pytest.raises(ValueError, match=f"corrupt image {bad}"):
        image_folder_dataloaders(root, on_bad_image="error")
    with pytest.raises(ValueError, match="on_bad_image"):
        image_folder_dataloaders(root, on_bad_image="ignore")


def test_image_folder_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        image_folder_dataloaders(tmp_path / "no-such-folder")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty: no images found"):
        image_folder_dataloaders(tmp_path / "empty")
    root = write_folder(tmp_path / "single", classes=("cat",))
    with pytest.raises(ValueError, match="single: expected at least 2 classes"):
        image_folder_dataloaders(root)
    root = write_folder(tmp_path / "all-bad", per_class=0)
    write_corrupt_png(root / "cat" / "a.png")
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(ValueError, match="all-bad: no readable images"):
        image_folder_dataloaders(root)


def write_csv_set(tmp_path, rows=12):
    for i in range(rows):
        write_png(tmp_path / "pics" / f"{i}.png", i)
    lines = ["file,kind"] + [f"pics/{i}.png,{'ab'[i % 2]}" for i in range(rows)]
    csv = tmp_path / "set.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def test_csv_batches(tmp_path):
    csv = write_csv_set(tmp_path)
    dls = csv_dataloaders(csv, path_col="file", label_col="kind", bs=4, size=14, valid_pct=0.25)
    x, y = dls.one_batch()
    assert x.shape == (4, 3, 14, 14) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dls.c == 2 and list(dls.vocab) == ["a", "b"]
    assert len(dls.train.items) == 9 and len(dls.valid.items) == 3
    assert_standardised(dls, tol=0.25)


def test_csv_paths_relative_to_folder(tmp_path):
    csv = write_csv_set(tmp_path)
    moved = tmp_path / "elsewhere" / "list.csv"
    moved.parent.mkdir()
    moved.write_text(csv.read_text())
    with pytest.raises(ValueError, match="no readable images"), pytest.warns(UserWarning, match="skipped 12"):
        csv_dataloaders(moved, path_col="file", label_col="kind")
    dls = csv_dataloaders(moved, path_col="file", label_col="kind", folder=tmp_path, bs=4, size=8)
    assert dls.c == 2


def test_csv_bad_inputs(tmp_path):
    csv = write_csv_set(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        csv_dataloaders(tmp_path / "missing.csv")
    with pytest.raises(ValueError) as error:
        csv_dataloaders(csv)  # default columns "path" / "label"
    message = str(error.value)
    assert str(csv) in message and "expected ['path', 'label']" in message and "found ['file', 'kind']" in message

    header_only = tmp_path / "header.csv"
    header_only.write_text("path,label\n")
    with pytest.raises(ValueError, match="header.csv: no images found"):
        csv_dataloaders(header_only)

    one_class = tmp_path / "one.csv"
    one_class.write_text("path,label\n" + "".join(f"pics/{i}.png,a\n" for i in range(6)))
    with pytest.raises(ValueError, match="one.csv: expected at least 2 classes"):
        csv_dataloaders(one_class)

    with_missing = tmp_path / "gaps.csv"
    with_missing.write_text(csv.read_text().replace("file,kind", "path,label") + "pics/gone.png,a\n")
    with pytest.warns(UserWarning, match="skipped 1 .*gone.png"):
        csv_dataloaders(with_missing, bs=4, size=8)
    with pytest.raises(ValueError, match="gone.png"):
        csv_dataloaders(with_missing, on_bad_image="error")

    corrupt = tmp_path / "corrupt.csv"
    write_corrupt_png(tmp_path / "pics" / "junk.png")
    corrupt.write_text(csv.read_text().replace("file,kind", "path,label") + "pics/junk.png,b\n")
    with pytest.warns(UserWarning, match="skipped 1 .*junk.png"):
        csv_dataloaders(corrupt, bs=4, size=8)
    with pytest.raises(ValueError, match="corrupt image .*junk.png"):
        csv_dataloaders(corrupt, on_bad_image="error")

    duplicated = tmp_path / "dup.csv"
    duplicated.write_text("path,label\npics/0.png,a\npics/0.png,b\npics/1.png,b\n")
    with pytest.raises(ValueError, match="dup.csv: rows 2 and 3 name the same image"):
        csv_dataloaders(duplicated)

    blank = tmp_path / "blank.csv"
    blank.write_text("path,label\npics/0.png,\npics/1.png,b\n")
    with pytest.raises(ValueError, match="blank.csv: row 2 has an empty"):
        csv_dataloaders(blank)


# ---------------------------------------------------------------------------------------------
# Data read right: full-depth images, class labels, pixels, archives


def undo_normalize(dls, x):
    """Batch `x` in the 0-1 units the images were read in, before the per-channel standardisation."""
    (norm,) = [t for t in dls.after_batch.fs if isinstance(t, Normalize)]
    return x * norm.std + norm.mean


def write_deep_folder(root, make, suffix, per_class=3):
    """Class folders a/ and b/ of images `make(class index, image index)` (a 2-D numpy array)."""
    written = {}
    for k, cls in enumerate("ab"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = make(k, i)
            path = root / cls / f"{i}{suffix}"
            Image.fromarray(pixels).save(path)
            written[path] = pixels
    return written


def read_back(dls, paths):
    """The 0-1 images the loaders yield for `paths` (in order), one channel."""
    (x,) = dls.test_dl(paths, bs=len(paths)).one_batch()
    x = undo_normalize(dls, x)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # gray copied to RGB
    return x[:, 0]


def test_16_bit_pngs_are_read_at_full_depth(tmp_path):
    rng = np.random.default_rng(0)
    written = write_deep_folder(tmp_path / "png16", lambda k, i: rng.integers(0, 65536, (8, 8), dtype=np.uint16),
                                ".png")
    assert Image.open(next(iter(written))).mode == "I;16"
    dls = image_folder_dataloaders(tmp_path / "png16", bs=4, size=8, valid_pct=0.34)
    got = read_back(dls, list(written))
    expected = torch.tensor(np.stack(list(written.values())) / 65535, dtype=torch.float32)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)  # 8-bit would be 2e-3 off; clipping, 1.0
    assert got.std() > 0.2  # spread over 0-1, not saturated to white


def test_16_bit_steps_of_one_survive(tmp_path):
    # 12-bit data in 16-bit files (CT, X-ray): values 1000..1003 must stay four distinct levels
    written = write_deep_folder(tmp_path / "ct", lambda k, i: np.full((6, 6), 1000 + 2 * k + i % 2, np.uint16), ".png",
                                per_class=2)
    dls = image_folder_dataloaders(tmp_path / "ct", bs=2, size=6, valid_pct=0.25)
    levels = read_back(dls, list(written)).mean((1, 2)) * 65535
    torch.testing.assert_close(levels, torch.tensor([1000.0, 1001, 1002, 1003]), atol=1e-2, rtol=0)


def test_float_tiffs_keep_their_values(tmp_path):
    rng = np.random.default_rng(1)
    written = write_deep_folder(tmp_path / "tif", lambda k, i: rng.random((8, 8), dtype=np.float32) * (k + 1), ".tif")
    assert Image.open(next(iter(written))).mode == "F"
    dls = image_folder_dataloaders(tmp_path / "tif", bs=4, size=8, valid_pct=0.34)
    got = read_back(dls, list(written))
    torch.testing.assert_close(got, torch.tensor(np.stack(list(written.values()))), atol=1e-5, rtol=1e-5)
    assert got.std() > 0.2  # not black
    x, _ = dls.one_batch()
    assert abs(x.mean()) < 0.5 and 0.5 < x.std() < 1.5  # standardised like any other image


def test_8_bit_16_bit_and_float_images_share_a_batch(tmp_path):
    root = write_folder(tmp_path / "mixed", per_class=2)  # 8-bit RGB and gray
    deep = write_deep_folder(root, lambda k, i: np.full((10, 10), 30000 * k, np.uint16), ".png")
    deep.update(write_deep_folder(root, lambda k, i: np.full((10, 10), 0.5, np.float32), ".tif"))
    dls = image_folder_dataloaders(root, bs=4, size=8, valid_pct=0.2)
    eight_bit = sorted(root.glob("*/*.png"))
    eight_bit = [p for p in eight_bit if p not in deep]
    paths = eight_bit + list(deep)
    (x,) = dls.test_dl(paths, bs=len(paths)).one_batch()  # every kind in one batch
    x = undo_normalize(dls, x)
    assert x.shape == (len(paths), 3, 8, 8) and x.dtype == torch.float32
    rgb = np.asarray(Image.open(eight_bit[0]).convert("RGB").resize((8, 8), Image.BILINEAR)) / 255
    rgb = torch.tensor(rgb, dtype=torch.float32)
    torch.testing.assert_close(x[0], rgb.permute(2, 0, 1), atol=1e-5, rtol=0)  # 8-bit images as before
    levels = x[len(eight_bit):].mean((1, 2, 3))
    expected = torch.tensor([pixels.mean() / (65535 if pixels.dtype == np.uint16 else 1) for pixels in deep.values()],
                            dtype=torch.float32)
    torch.testing.assert_close(levels, expected, atol=1e-5, rtol=0)


def test_float_tiff_with_nan_pixels_is_skipped_or_refused(tmp_path):
    root = tmp_path / "nan"
    write_deep_folder(root, lambda k, i: np.ones((6, 6), np.float32) * k, ".tif")
    bad = root / "a" / "1.tif"
    pixels = np.zeros((6, 6), np.float32)
    pixels[2, :3] = np.nan
    pixels[4, 4] = np.inf
    Image.fromarray(pixels).save(bad)
    with pytest.warns(UserWarning, match=rf"skipped 1 unreadable or corrupt image\(s\), e.g. {bad} \(4 of 36 "
                                         rf"pixels are NaN or infinite\)"):
        dls = image_folder_dataloaders(root, bs=2, size=6, valid_pct=0.4)
    assert bad not in list(dls.train.items) + list(dls.valid.items)
    with pytest.raises(ValueError, match=rf"corrupt image {bad} \(4 of 36 pixels are NaN or infinite\)"):
        image_folder_dataloaders(root, bs=2, size=6, on_bad_image="error")
    with pytest.raises(ValueError, match=rf"{bad}: 4 of 36 pixels are NaN or infinite; fix or remove this image"):
        dls.test_dl([bad]).one_batch()  # a file given later, as learn.predict would


def test_a_valid_class_without_training_images_is_named(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=2, layout="train")
    write_folder(root, classes=("cat", "dog", "fox"), per_class=1, layout="valid")
    with pytest.warns(UserWarning, match=r"imgs: class\(es\) fox of the valid split have no training image"):
        dls = image_folder_dataloaders(root, bs=2, size=8)
    assert list(dls.vocab) == ["cat", "dog", "fox"]


def npz_labels(*values):
    return np.array(values)[:, None]


def test_npz_labels_far_beyond_the_classes_present_are_refused(tmp_path):
    train = npz_labels(*([0, 1, 2] * 9), 100000, 0, 1)
    path = write_npz(tmp_path / "ids.npz", train_labels=train)
    with pytest.raises(ValueError, match=r"ids.npz: labels go up to 100000 \(a 100001-class model\) but only 4 "
                                         r"distinct labels occur \(0, 1, 2, 100000\).*0\.\.C-1.*np.unique"):
        medmnist_dataloaders(path)
    # a few gaps are fine: labels 0, 1, 3 make a 4-class model (class 2 is never seen)
    gaps = npz_labels(*[0, 1, 3] * 10)
    dls = medmnist_dataloaders(write_npz(tmp_path / "gaps.npz", train_labels=gaps, val_labels=gaps[:10],
                                         test_labels=gaps[:8]), bs=8)
    assert dls.c == 4


def test_npz_non_integer_labels_are_refused(tmp_path):
    halves = npz_labels(*[0.5, 1.5, 2.0] * 10)
    path = write_npz(tmp_path / "halves.npz", train_labels=halves)
    with pytest.raises(ValueError, match=r"halves.npz: train_labels: 20 label\(s\) are not whole numbers \(e.g. 0.5\)"):
        medmnist_dataloaders(path)
    path = write_npz(tmp_path / "nan.npz", val_labels=npz_labels(*[0.0, np.nan] * 5))
    with pytest.raises(ValueError, match=r"nan.npz: val_labels: 5 label\(s\) are not whole numbers \(e.g. nan\)"):
        medmnist_dataloaders(path)
    path = write_npz(tmp_path / "text.npz", test_labels=npz_labels(*"abcdefgh"))
    with pytest.raises(ValueError, match=r"text.npz: test_labels: labels of type <U1 are not class numbers"):
        medmnist_dataloaders(path)
    path = write_npz(tmp_path / "multi.npz", label_width=3, val_labels=np.full((10, 3), 0.5))
    with pytest.raises(ValueError, match=r"multi.npz: val_labels: 30 label\(s\) are not whole numbers"):
        medmnist_dataloaders(path)
    path = write_npz(tmp_path / "multi2.npz", label_width=3, val_labels=np.full((10, 3), 2))
    with pytest.raises(ValueError, match=r"multi2.npz: val_labels has 3 columns \(multi-label\) but holds values other "
                                         r"than 0 and 1 \(e.g. 2\)"):
        medmnist_dataloaders(path)
    path = write_npz(tmp_path / "negative.npz", train_labels=npz_labels(*[0, 1, -1] * 10))
    with pytest.raises(ValueError, match=r"negative.npz: train_labels: negative class label -1"):
        medmnist_dataloaders(path)
    # whole numbers stored as floats are class numbers
    whole = npz_labels(*[0.0, 1.0, 2.0] * 10)
    dls = medmnist_dataloaders(write_npz(tmp_path / "whole.npz", train_labels=whole), bs=8)
    assert dls.c == 3 and dls.one_batch()[1].dtype == torch.int64


def test_npz_that_is_not_an_archive_says_so(tmp_path):
    for name, payload, found in (("text.npz", b"hello", "this file begins b'hell'"),
                                 ("empty.npz", b"", "the file is empty")):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ValueError, match=rf"{name}: not an .npz archive \(numpy.savez writes a zip file; {found}") \
                as error:
            medmnist_dataloaders(tmp_path / name)
        assert "pickle" not in str(error.value)
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    with pytest.raises(ValueError, match=r"array.npz: not an .npz archive .*begins b'\\x93NUM'"):
        medmnist_dataloaders(tmp_path / "array.npz")
    whole = write_npz(tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut.npz: not a readable .npz archive .*truncated or corrupt"):
        medmnist_dataloaders(tmp_path / "cut.npz")
    damaged = bytearray(whole)
    start = whole.index(b"train_images.npy") + 200  # inside that member's data (stored uncompressed)
    damaged[start : start + 50] = bytes(50)
    (tmp_path / "damaged.npz").write_bytes(damaged)
    with pytest.raises(ValueError, match=r"damaged.npz: cannot read train_images \(Bad CRC-32.*truncated or corrupt"):
        medmnist_dataloaders(tmp_path / "damaged.npz")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_npz_nan_or_infinite_pixels_are_refused(tmp_path, bad):
    images = np.random.default_rng(0).random((10, 12, 12), dtype=np.float32)
    images[3, 0, :2] = bad
    images[7, 5, 5] = bad
    path = write_npz(tmp_path / "pixels.npz", val_images=images)
    with pytest.raises(ValueError, match=r"pixels.npz: val_images: 3 NaN or infinite pixel value\(s\) in 2 image\(s\) "
                                         r"\(first: image 3\)"):
        medmnist_dataloaders(path)
    # float pixels without NaN are standardised like uint8 ones
    images[np.isinf(images) | np.isnan(images)] = 0.5
    path = write_npz(tmp_path / "float.npz", val_images=images)
    dls = medmnist_dataloaders(path, bs=8)
    train = np.load(path)["train_images"].astype(np.float64)  # the statistics come from the training split
    expected = torch.tensor((images - train.mean()) / train.std())[:, None]
    torch.testing.assert_close(dls.valid.one_batch()[0].double(), expected, rtol=1e-5, atol=1e-5)  # all 10, in order


def test_npz_class_missing_from_training_is_named(tmp_path):
    path = write_npz(tmp_path / "unseen.npz", val_labels=npz_labels(*[0, 1, 2, 3] * 2, 3, 3))
    with pytest.warns(UserWarning, match=r"unseen.npz: class\(es\) 3 of the val split have no training image"):
        dls = medmnist_dataloaders(path, bs=8)
    assert dls.c == 4


def write_idx_typed(path, array, type_code):
    """`array` as a gzipped IDX file of the given type (0x09 int8, 0x0D float32, ...)."""
    dtype = {0x09: ">i1", 0x0D: ">f4"}[type_code]
    array = np.asarray(array, dtype=dtype)
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))
    return path


def test_fashion_mnist_labels_and_pixels_other_than_uint8_are_refused(tmp_path):
    # The IDX magic number says the type: Fashion-MNIST's files are uint8, so float labels (0.5), negative
    # int8 labels and float pixels (NaN) are refused by type, saying which type was found.
    for name, prefix, array, code, found in (
        ("halves", "train-labels-idx1", np.arange(40) % 10 + 0.5, 0x0D,
         "float32 data in 1 dim\\(s\\), expected uint8 in 1"),
        ("negative", "t10k-labels-idx1", np.arange(20) % 10 - 1, 0x09,
         "int8 data in 1 dim\\(s\\), expected uint8 in 1"),
        ("nan", "train-images-idx3", np.full((40, 28, 28), np.nan), 0x0D,
         "float32 data in 3 dim\\(s\\), expected uint8 in 3"),
    ):
        folder = write_fashion(tmp_path / name)
        path = write_idx_typed(folder / f"{prefix}-ubyte.gz", array, code)
        with pytest.raises(ValueError, match=rf"{path}: IDX magic number \d+, expected 20\d\d \(found {found}\)"):
            fashion_mnist_dataloaders(folder)


def test_fashion_mnist_class_missing_from_training_is_named(tmp_path):
    folder = write_fashion(tmp_path / "unseen")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(40) % 9)  # no "Ankle boot" (9) in training
    with pytest.warns(UserWarning, match=r"unseen: class\(es\) Ankle boot of the t10k split have no training image"):
        fashion_mnist_dataloaders(folder, bs=8)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:load_learner")
def test_full_depth_loaders_export_and_predict(tmp_path):
    from fastai.learner import load_learner

    from normfree import nf_learner

    rng = np.random.default_rng(2)
    written = write_deep_folder(tmp_path / "png16", lambda k, i: rng.integers(0, 65536, (8, 8), dtype=np.uint16),
                                ".png")
    learn = nf_learner(image_folder_dataloaders(tmp_path / "png16", bs=2, size=8, valid_pct=0.34), "test_nfnet")
    learn.export(tmp_path / "learner.pkl")
    loaded = load_learner(tmp_path / "learner.pkl")
    image = next(iter(written))
    with learn.no_bar(), loaded.no_bar():
        expected, actual = learn.predict(image)[2], loaded.predict(image)[2]
    torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------
# The registry of data kinds (normfree.data.registry.DATA_KINDS)


def test_each_kind_states_its_builder_default_size_path_and_limit_once():
    from pathlib import Path

    from normfree.data import digits_dataloaders
    from normfree.data.registry import DATA_KINDS

    expected = {  # kind: (builder, default size, default path, limit applies)
        "digits": (digits_dataloaders, 32, None, True),
        "fashion-mnist": (fashion_mnist_dataloaders, 28, Path("/usr/share/datasets/fashion-mnist"), True),
        "medmnist": (medmnist_dataloaders, None, None, True),
        "csv": (csv_dataloaders, 64, None, False),
        "image-folder": (image_folder_dataloaders, 64, None, False),
    }
    assert {name: (kind.builder, kind.default_size, kind.default_path, kind.supports_limit)
            for name, kind in DATA_KINDS.items()} == expected


def one_of_each_kind(tmp_path):
    """A --data string of every kind, each naming tiny data: {kind: (spec, native image size)}."""
    folder = write_folder(tmp_path / "folder", per_class=5)
    write_folder(tmp_path / "listed", per_class=5)
    rows = [f"{cls}/{i}.png,{cls}" for cls in ("cat", "dog") for i in range(5)]
    (tmp_path / "listed" / "images.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return {
        "digits": ("digits", 8),
        "fashion-mnist": (f"fashion-mnist:{write_fashion(tmp_path / 'fashion')}", 28),
        "medmnist": (str(write_npz(tmp_path / "set.npz")), 12),
        "csv": (str(tmp_path / "listed" / "images.csv"), 10),
        "image-folder": (str(folder), 10),
    }


def test_every_kind_parses_round_trips_and_builds_at_its_default_size(tmp_path):
    from normfree.data.registry import DATA_KINDS, parse_data_spec
    from normfree.utils.errors import ConfigError

    examples = one_of_each_kind(tmp_path)
    assert sorted(examples) == sorted(DATA_KINDS)
    for name, (text, native) in examples.items():
        spec = parse_data_spec(text)
        assert spec.kind == name and parse_data_spec(str(spec)) == spec
        dls = spec.dataloaders(bs=2, seed=0, valid_pct=0.3)
        size = DATA_KINDS[name].default_size or native  # None: the images' own size
        assert tuple(dls.one_batch()[0].shape[-2:]) == (size, size), name
        if DATA_KINDS[name].supports_limit:
            assert len(spec.dataloaders(bs=2, limit=3).valid_ds) == 3
        else:
            with pytest.raises(ConfigError, match=r"^limit: works with in-memory data sets \(digits, fashion-mnist, "
                                                  r"\.npz\) only"):
                spec.dataloaders(bs=2, limit=3)


# ---------------------------------------------------------------------------------------------
# The data means what the user meant: split folders, hidden files, label spellings, duplicate files,
# one-hot labels, truncated images


def items(dl):
    return [p.relative_to(p.parents[2]).as_posix() for p in dl.items]  # split/class/file


def split_of(dl):
    return {p.parent.parent.name for p in dl.items}


@pytest.mark.bad_input
@pytest.mark.parametrize("valid_name", ["val", "validation", "VAL"])
def test_image_folder_val_and_validation_are_the_validation_split(tmp_path, valid_name):
    root = write_folder(tmp_path / "imgs", per_class=4, layout="train")
    write_folder(root, per_class=2, layout=valid_name)
    dls = image_folder_dataloaders(root, bs=4, size=8)
    assert list(dls.vocab) == ["cat", "dog"]  # not "train" and "val"
    assert split_of(dls.train) == {"train"} and split_of(dls.valid) == {valid_name}
    assert len(dls.train.items) == 8 and len(dls.valid.items) == 4


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.filterwarnings("ignore:load_learner")
def test_image_folder_test_split_is_held_out_and_scored_by_ds_idx_2(tmp_path):
    from fastai.metrics import accuracy as fastai_accuracy

    from normfree import nf_learner

    root = write_folder(tmp_path / "imgs", per_class=4, layout="train")
    write_folder(root, per_class=2, layout="val")
    write_folder(root, classes=("dog", "cat"), per_class=3, layout="test")
    dls = image_folder_dataloaders(root, bs=4, size=8)
    assert list(dls.vocab) == ["cat", "dog"]
    assert dls.test is dls[2] and split_of(dls.test) == {"test"} and len(dls.test.items) == 6
    assert split_of(dls.train) == {"train"} and split_of(dls.valid) == {"val"}
    learn = nf_learner(dls, "test_nfnet", metrics=fastai_accuracy)
    with learn.no_bar():
        loss, accuracy = learn.validate(ds_idx=2)
        probabilities, _ = learn.get_preds(ds_idx=2)
    expected = [list(dls.vocab).index(p.parent.name) for p in dls.test.items]  # the class folder of each test image
    assert accuracy == pytest.approx(np.mean(probabilities.argmax(1).numpy() == np.array(expected)))


@pytest.mark.bad_input
def test_image_folder_train_and_test_without_validation_folder(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=5, layout="train")
    write_folder(root, per_class=2, layout="test")
    dls = image_folder_dataloaders(root, bs=2, size=8, valid_pct=0.2)
    assert list(dls.vocab) == ["cat", "dog"]
    assert split_of(dls.train) == split_of(dls.valid) == {"train"} and split_of(dls.test) == {"test"}
    assert len(dls.train.items) == 8 and len(dls.valid.items) == 2 and len(dls.test.items) == 4
    assert not set(items(dls.train)) & set(items(dls.valid))


@pytest.mark.bad_input
def test_image_folder_test_folder_without_classes_is_left_out_with_a_warning(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=5, layout="train")
    write_png(root / "test" / "unlabelled.png", 0)
    with pytest.warns(UserWarning, match=r"test/ has no class folders of images \(1 image\(s\) directly in it"):
        dls = image_folder_dataloaders(root, bs=2, size=8)
    assert len(dls.loaders) == 2 and not hasattr(dls, "test")


def both_val_and_valid(root):
    write_folder(root, per_class=2, layout="train")
    write_folder(root, per_class=1, layout="val")
    write_folder(root, per_class=1, layout="valid")


def train_and_a_class_folder(root):
    write_folder(root, per_class=2, layout="train")
    write_folder(root, classes=("cat",), per_class=1, layout="")
    write_folder(root, per_class=1, layout="val")


def class_folders_and_a_test_class(root):
    write_folder(root, classes=("cat", "dog", "test"), per_class=2)


def flat_train_and_val(root):
    write_folder(root, classes=("train", "val"), per_class=3)  # images directly in train/ and val/


@pytest.mark.bad_input
@pytest.mark.parametrize("layout, message", [
    (both_val_and_valid, r"both val/ and valid/ name the valid split; keep one"),
    (train_and_a_class_folder, r"train/ holds class folders, so .* is read as split folders .* but cat/ next to it "
                               r"name no split"),
    (class_folders_and_a_test_class, r"test/ would be class\(es\) but is a split name"),
    (flat_train_and_val, r"train/, val/ would be class\(es\) but are split names"),
])
def test_image_folder_ambiguous_layouts_are_refused(tmp_path, layout, message):
    layout(tmp_path / "imgs")
    with pytest.raises(ValueError, match=message):
        image_folder_dataloaders(tmp_path / "imgs", bs=2, size=8)


def test_image_folder_a_class_named_train_stays_a_class(tmp_path):
    root = write_folder(tmp_path / "vehicles", classes=("bus", "train"), per_class=4)  # no split folder in sight
    assert list(image_folder_dataloaders(root, bs=2, size=8).vocab) == ["bus", "train"]


def hidden_top_level_folder(root):
    write_folder(root)
    write_png(root / ".ipynb_checkpoints" / "0-checkpoint.png", 99)


def hidden_folder_in_train(root):
    write_folder(root, layout="train")
    write_folder(root, per_class=2, layout="val")
    write_png(root / "train" / ".ipynb_checkpoints" / "0-checkpoint.png", 99)


def hidden_files_in_a_class(root):
    write_folder(root)
    write_png(root / "cat" / "._0.png", 98)  # macOS's AppleDouble companion (here a real PNG)
    write_png(root / "cat" / ".cache" / "1.png", 99)


@pytest.mark.bad_input
@pytest.mark.parametrize("layout", [hidden_top_level_folder, hidden_folder_in_train, hidden_files_in_a_class])
def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path, layout):
    root = tmp_path / "imgs"
    layout(root)
    dls = image_folder_dataloaders(root, bs=2, size=8, valid_pct=0.25)
    assert list(dls.vocab) == ["cat", "dog"]
    visible = {p for p in root.rglob("*.png") if not any(part.startswith(".") for part in p.relative_to(root).parts)}
    used = [p for dl in dls.loaders for p in dl.items]
    assert len(used) == len(visible) and set(used) == visible


@pytest.mark.bad_input
def test_csv_rows_naming_hidden_files_are_skipped_with_a_warning(tmp_path):
    csv = write_csv_set(tmp_path)
    write_png(tmp_path / "pics" / "._0.png", 50)
    write_png(tmp_path / ".ipynb_checkpoints" / "pics" / "1.png", 51)
    rows = csv.read_text().replace("file,kind", "path,label") + "pics/._0.png,a\n.ipynb_checkpoints/pics/1.png,b\n"
    csv.write_text(rows)
    with pytest.warns(UserWarning, match=r"set.csv: skipped 2 row\(s\) naming a hidden file or folder "
                                         r"\(e.g. pics/._0.png"):
        dls = csv_dataloaders(csv, bs=4, size=8)
    assert len(dls.train.items) + len(dls.valid.items) == 12


@pytest.mark.bad_input
def test_csv_labels_differing_only_in_spaces_or_case_are_named(tmp_path):
    csv = write_csv_set(tmp_path)
    labels = ["cat", " cat", "cat", "Cat", "dog", "dog"] * 2
    csv.write_text("path,label\n" + "".join(f"pics/{i}.png,{label}\n" for i, label in enumerate(labels)))
    with pytest.warns(UserWarning, match=r"set.csv: labels ' cat' \(2 images\), 'Cat' \(2 images\), 'cat' \(4 images\) "
                                         r"differ only in case or surrounding spaces: they are 3 classes"):
        dls = csv_dataloaders(csv, bs=2, size=8)
    assert list(dls.vocab) == [" cat", "Cat", "cat", "dog"]  # as written: the warning is the only change


@pytest.mark.bad_input
def test_class_folders_differing_only_in_case_are_named(tmp_path):
    root = write_folder(tmp_path / "imgs", classes=("Cat", "cat", "dog"), per_class=3)
    with pytest.warns(UserWarning, match=r"labels 'Cat' \(3 images\), 'cat' \(3 images\) differ only in case"):
        image_folder_dataloaders(root, bs=2, size=8)


@pytest.mark.bad_input
def test_image_folder_file_reached_by_two_paths_is_used_once(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=5)
    (root / "cat" / "again.png").symlink_to(root / "cat" / "0.png")
    (root / "cat" / "nested").mkdir()
    (root / "cat" / "nested" / "0.png").symlink_to("../0.png")
    with pytest.warns(UserWarning, match=r"2 image path\(s\) reach a file already found .*each file is used once"):
        dls = image_folder_dataloaders(root, bs=2, size=8, valid_pct=0.3)
    used = [p.resolve() for dl in dls.loaders for p in dl.items]
    assert len(used) == len(set(used)) == 10  # the 10 files, each in one split


@pytest.mark.bad_input
@pytest.mark.parametrize("link, target", [("dog/copy.png", "cat/0.png"), ("val/cat/copy.png", "train/cat/0.png")])
def test_image_folder_file_in_two_classes_or_splits_is_refused(tmp_path, link, target):
    root = write_folder(tmp_path / "imgs", per_class=3)
    if link.startswith("val"):
        root = write_folder(tmp_path / "split", per_class=3, layout="train")
        write_folder(root, per_class=1, layout="val")
    (root / link).symlink_to(root / target)
    with pytest.raises(ValueError, match=rf"{root / link} and {root / target} are the same file"):
        image_folder_dataloaders(root, bs=2, size=8)


@pytest.mark.bad_input
@pytest.mark.parametrize("second", ["pics/../pics/0.png", "./pics/0.png", "link.png"])
def test_csv_rows_naming_one_file_twice_are_refused(tmp_path, second):
    write_csv_set(tmp_path)
    (tmp_path / "link.png").symlink_to(tmp_path / "pics" / "0.png")
    csv = tmp_path / "dup.csv"
    csv.write_text("path,label\n" + "".join(f"pics/{i}.png,{'ab'[i % 2]}\n" for i in range(8)) + f"{second},b\n")
    with pytest.raises(ValueError, match=rf"dup.csv: rows 2 and 10 name the same image \('pics/0.png', '{second}'\)"):
        csv_dataloaders(csv, bs=2, size=8)


@pytest.mark.bad_input
def test_npz_one_hot_labels_are_single_label_classes(tmp_path):
    rng = np.random.default_rng(0)
    classes = {split: rng.permutation(np.arange(n) % 4) for split, n in (("train", 30), ("val", 10), ("test", 8))}
    one_hot = {f"{split}_labels": np.eye(4, dtype=np.uint8)[k] for split, k in classes.items()}
    path = write_npz(tmp_path / "onehot.npz", **one_hot)
    with pytest.warns(UserWarning, match=r"onehot.npz: the 4-column labels are one-hot .* read as 4 single-label "
                                         r"classes"):
        dls = medmnist_dataloaders(path, bs=8)
    assert dls.c == 4 and dls.multi_label is False
    for dl, split in ((dls.train, "train"), (dls.valid, "val"), (dls.test, "test")):
        assert dl.dataset.tensors[1].dtype == torch.int64
        np.testing.assert_array_equal(dl.dataset.tensors[1].numpy(), classes[split])
    # a row with two 1s anywhere: multi-label, as before
    two = dict(one_hot, val_labels=np.vstack([one_hot["val_labels"][:9], [[1, 1, 0, 0]]]))
    dls = medmnist_dataloaders(write_npz(tmp_path / "multi.npz", **two), bs=8)
    assert dls.multi_label is True and dls.c == 4


def write_truncated_jpeg(path, seed, fraction=0.9):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    whole = path.read_bytes()
    path.write_bytes(whole[: int(len(whole) * fraction)])
    return path


@pytest.mark.bad_input
def test_truncated_jpeg_is_found_before_training(tmp_path):
    root = write_folder(tmp_path / "imgs")
    bad = write_truncated_jpeg(root / "dog" / "cut.jpg", 7)
    Image.open(bad).verify()  # the header check alone lets it through
    with pytest.warns(UserWarning, match=rf"skipped 1 unreadable or corrupt image\(s\), e.g. {bad} \(image file is "
                                         rf"truncated"):
        dls = image_folder_dataloaders(root, bs=4, size=8, valid_pct=0.25)
    assert bad not in [p for dl in dls.loaders for p in dl.items]
    with pytest.raises(ValueError, match=rf"corrupt image {bad} \(image file is truncated"):
        image_folder_dataloaders(root, bs=4, size=8, on_bad_image="error")


@pytest.mark.bad_input
def test_image_failing_during_training_names_the_file(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=0)
    for cls in ("cat", "dog"):
        for i in range(4):
            write_truncated_jpeg(root / cls / f"{i}.jpg", i, fraction=1)
    dls = image_folder_dataloaders(root, bs=2, size=8, valid_pct=0.25)
    bad = dls.train.items[0]
    write_truncated_jpeg(bad, 0)  # changed after the check
    with pytest.raises(OSError, match=rf"{bad}: image file is truncated"):
        for dl in (dls.train, dls.valid):
            for _ in dl:
                pass


@pytest.mark.bad_input
def test_folder_smaller_than_the_batch_names_bs(tmp_path):
    from normfree import train
    from normfree.utils.errors import ConfigError

    root = write_folder(tmp_path / "imgs", per_class=24)  # 48 images, 10 of them (20%) held out
    with pytest.raises(ConfigError) as error:
        train(data=str(root), arch="nf_resnet_tiny", size=8, bs=64, epochs=1, out=str(tmp_path / "out"), quiet=True)
    assert error.value.option == "bs" and "accum" not in str(error.value)
    assert "bs 64 is more than the 38 training images" in str(error.value) and "give bs <= 38" in str(error.value)
