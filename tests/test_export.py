"""An NF learner survives learn.export() / load_learner() with its callbacks, and predicts one image; the
learner.pkl of `normfree.train` predicts, for every data kind, on each form of input a user has at hand, and holds
no training data."""
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastai.learner import load_learner
from fastai.metrics import accuracy
from fastai.vision.core import PILImage
from fastai.vision.data import ImageDataLoaders
from PIL import Image

import normfree
from helpers import write_fashion, write_npz
from normfree import AGC, nf_learner
from normfree.data import medmnist_dataloaders, write_digits_image_folder


@pytest.mark.slow
def test_export_round_trip_and_predict(tmp_path):
    folder = write_digits_image_folder(tmp_path / "digits", size=16, per_class=8)
    dls = ImageDataLoaders.from_folder(folder, valid_pct=0.25, seed=0, bs=16)
    learn = nf_learner(dls, "test_nfnet", agc=0.05, metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    learn.export(tmp_path / "learner.pkl")
    loaded = load_learner(tmp_path / "learner.pkl")
    assert [cb.clipping for cb in loaded.cbs if isinstance(cb, AGC)] == [0.05]
    test_dl = learn.dls.test_dl(sorted(folder.rglob("*.png"))[:12])
    with learn.no_bar():
        expected, _ = learn.get_preds(dl=test_dl)
    with loaded.no_bar():
        actual, _ = loaded.get_preds(dl=loaded.dls.test_dl(sorted(folder.rglob("*.png"))[:12]))
    assert torch.equal(actual, expected)
    image = sorted(folder.glob("7/*.png"))[0]
    with loaded.no_bar():
        label, index, probabilities = loaded.predict(image)
    assert label in [str(d) for d in range(10)] and probabilities.shape == (10,)
    assert float(probabilities.sum()) == torch.tensor(1.0).item() or abs(float(probabilities.sum()) - 1) < 1e-5


# ---------------------------------------------------------------------------------------------
# `normfree.train`'s learner.pkl, for every data kind: predicts on what a user has at hand, holds no data

SIZE = 8  # the model's input size: every kind's images are resized to it (the stored ones are 10, 12 or 28 px)
TRAINING_NAME = "trainingimage"  # in every image file name: the pickle must not hold one


def write_images(root, rows):
    """PNGs root/<class>/trainingimage-<i>.png, 10x10, RGB and gray mixed; the (relative path, class) written."""
    rng = np.random.default_rng(0)
    written = []
    for i in range(rows):
        cls = ("cat", "dog")[i % 2]
        path = root / cls / f"{TRAINING_NAME}-{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (10, 10, 3) if i % 3 else (10, 10)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        written.append((f"{cls}/{path.name}", cls))
    return written


def write_kind(kind, root):
    """`normfree.train` options for tiny data of `kind` written under `root`."""
    quick = dict(arch="nf_resnet_tiny", size=SIZE, bs=8, epochs=1)
    if kind == "digits":
        return dict(quick, data="digits", limit=24)
    if kind == "fashion-mnist":
        return dict(quick, data=f"fashion-mnist:{write_fashion(root / 'fashion', n_train=24, n_valid=12)}")
    if kind.startswith("medmnist"):
        channels, width = {"medmnist-gray": (None, 1), "medmnist-rgb": (3, 1), "medmnist-multi-label": (3, 4)}[kind]
        npz = write_npz(root / "set.npz", channels=channels, label_width=width, n=(24, 12, 6))
        return dict(quick, data=str(npz))
    if kind == "image-folder":
        write_images(root / "folder", 24)
        return dict(quick, data=str(root / "folder"), valid_pct=0.25)
    rows = write_images(root / "listed", 24)
    (root / "listed" / "labels.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    return dict(quick, data=str(root / "listed" / "labels.csv"), valid_pct=0.25)


KINDS = ["digits", "fashion-mnist", "medmnist-gray", "medmnist-rgb", "medmnist-multi-label", "image-folder", "csv"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """kind -> (kind, the trained Learner, the one `load_learner` reads back from learner.pkl, the run folder),
    trained once per kind for the whole module."""
    runs = {}

    def run(kind):
        if kind not in runs:
            root = tmp_path_factory.mktemp(kind)
            result = normfree.train(**write_kind(kind, root), out=root / "run", quiet=True, save_plots=False)
            with pytest.warns(UserWarning, match="load_learner"):
                loaded = load_learner(root / "run" / "learner.pkl")
            runs[kind] = kind, result.learner, loaded, root / "run"
        return runs[kind]

    return run


@pytest.fixture(params=KINDS)
def exported(request, trained):
    return trained(request.param)


def channels_first(array):
    pixels = torch.from_numpy(array)
    return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)


def file_pixels(image):
    """[C, H, W] float pixels 0-255 of an 8-bit image as fastai opens it (RGB)."""
    return channels_first(np.array(image.convert("RGB"), dtype=np.float32))


class Reference:
    """What the trained model predicts for one input, computed by hand: the input as the training images are
    stored (or read as RGB, for image files), resized to SIZE (bilinear), standardised with the per-channel mean
    and std of the training images (float64), through the model. Never the code under test's transforms."""

    def __init__(self, learn):
        self.model = learn.model.eval().cpu()
        self.files = not hasattr(learn.dls.train_ds, "tensors")
        if self.files:  # image folders and CSVs: every training image, read as RGB, 0-1
            training = torch.stack([self.resized(file_pixels(Image.open(p)))[0] for p in learn.dls.train_ds.items])
            training = training / 255
        else:
            training = self.resized(learn.dls.train_ds.tensors[0].double())
        self.mean = training.double().mean((0, 2, 3), keepdim=True)
        self.std = training.double().std((0, 2, 3), unbiased=False, keepdim=True)
        self.multi_label, self.vocab = getattr(learn.dls, "multi_label", False), list(learn.dls.vocab)

    def resized(self, pixels):
        if self.files:  # fastai's Resize: PIL's bilinear resampling of the (square) image
            image = Image.fromarray(pixels.permute(1, 2, 0).numpy().astype(np.uint8)).resize((SIZE, SIZE),
                                                                                            Image.BILINEAR)
            return file_pixels(image)[None]
        pixels = pixels[None] if pixels.ndim == 3 else pixels
        return F.interpolate(pixels.double(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)

    def __call__(self, pixels):
        """(class name(s), probabilities) for one image `pixels` [C, H, W] (stored units; 0-255 for files)."""
        x = self.resized(pixels.double()) / (255 if self.files else 1)
        with torch.no_grad():
            logits = self.model(((x - self.mean) / self.std).float())[0]
        if self.multi_label:
            probabilities = torch.sigmoid(logits)
            return [self.vocab[k] for k in torch.nonzero(probabilities > 0.5).flatten().tolist()], probabilities
        probabilities = torch.softmax(logits, 0)
        return self.vocab[int(probabilities.argmax())], probabilities


def inputs_and_pixels(kind, learn, folder):
    """{input form: (an input, its pixels as the reference reads them)} for one validation image."""
    if kind in ("image-folder", "csv"):
        path = learn.dls.valid_ds.items[0]
        pixels = file_pixels(Image.open(path))
        gray = torch.from_numpy(np.array(Image.open(path).convert("L")))
        return {"str": (str(path), pixels), "Path": (path, pixels), "PIL.Image": (Image.open(path), pixels),
                "fastai PILImage": (PILImage.create(path), pixels), "valid_ds item": (learn.dls.valid_ds[0], pixels),
                "uint8 tensor [3, H, W]": (pixels.to(torch.uint8), pixels),
                "uint8 tensor [H, W]": (gray, gray[None].expand(3, -1, -1).float())}
    stored, target = learn.dls.valid_ds[0]
    forms = {"valid_ds item": ((stored, target), stored), "tensor [C, H, W]": (stored, stored),
             "array [C, H, W]": (stored.numpy(), stored)}
    if stored.shape[0] == 1:
        forms["tensor [H, W]"] = (stored[0], stored)
    else:
        forms["array [H, W, 3] (as in the .npz)"] = (stored.permute(1, 2, 0).numpy(), stored)
    if stored.dtype == torch.uint8:
        forms["float tensor of whole numbers"] = (stored.float(), stored)
    # an image file of the stored size: 8-bit pixels, the digits' 0-16 scaled to 0-255
    white = 16 if kind == "digits" else 255
    path = folder / "image.png"
    Image.fromarray((stored.double() * 255 / white).round().to(torch.uint8).permute(1, 2, 0).squeeze(-1).numpy()
                    ).save(path)
    from_file = channels_first(np.array(Image.open(path))).double() * white / 255
    forms.update({"str": (str(path), from_file), "Path": (path, from_file), "PIL.Image": (Image.open(path), from_file),
                  "fastai PILImage": (PILImage.create(path), from_file)})
    return forms


@pytest.mark.slow
def test_exported_learner_predicts_every_input_form_as_the_model_does(exported):
    kind, learn, loaded, folder = exported
    reference = Reference(learn)
    forms = inputs_and_pixels(kind, learn, folder)
    for form, (given, pixels) in forms.items():
        expected_label, expected = reference(pixels)
        for which in (loaded, learn) if form == "valid_ds item" else (loaded,):  # the trained one: as exported
            with which.no_bar():
                label, _, probabilities = which.predict(given)
            torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=1e-4, msg=f"{kind}: {form}")
            assert label == expected_label, (kind, form)
    # a batch of them at once: test_dl over a list (of mixed forms)
    with loaded.no_bar():
        batch, _ = loaded.get_preds(dl=loaded.dls.test_dl([given for given, _ in forms.values()], bs=4))
    torch.testing.assert_close(batch, torch.stack([reference(pixels)[1] for _, pixels in forms.values()]),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_exported_learner_holds_no_data_but_its_classes(exported):
    kind, learn, loaded, folder = exported
    assert len(loaded.dls.train_ds) == len(loaded.dls.valid_ds) == 0
    assert list(loaded.dls.vocab) == list(learn.dls.vocab) and loaded.dls.c == learn.dls.c
    with zipfile.ZipFile(folder / "learner.pkl") as pickle_file:  # torch.save's archive
        assert not any(TRAINING_NAME.encode() in pickle_file.read(name) for name in pickle_file.namelist())
    loaded.export(folder / "again.pkl")  # and the loaded Learner exports again


def write_png(path, pixels):
    Image.fromarray(pixels).save(path)
    return path


BAD_INPUTS = {  # case: (kind, the input given a folder to write in, error, message)
    "3-channel tensor to a 1-channel model": (
        "digits", lambda folder: torch.zeros(3, 8, 8), ValueError,
        r"^got an image of shape \[3, 8, 8\]; this model takes one image as in training: a tensor or array "
        r"\[1, 8, 8\] or \[8, 8\] of float32 pixels, or an 8-bit image file or PIL image of 8x8 px$"),
    "a batch of one image": (
        "digits", lambda folder: torch.zeros(1, 1, 8, 8), ValueError,
        r"^got an image of shape \[1, 1, 8, 8\]; .*; for several images use learn.dls.test_dl\(list\(images\)\)$"),
    "a tensor of another size": ("digits", lambda folder: torch.zeros(1, 9, 9), ValueError,
                                 r"^got an image of shape \[1, 9, 9\]; this model takes"),
    "a number": ("digits", lambda folder: 3, TypeError, r"^got int; this model takes one image as in training"),
    "an image file of another size": (
        "digits", lambda folder: write_png(folder / "big.png", np.zeros((10, 10), np.uint8)), ValueError,
        r"big.png: a 10x10 px image of PIL mode L; this model takes .* image file or PIL image of 8x8 px$"),
    "a 16-bit image file to an 8-bit model": (
        "fashion-mnist", lambda folder: write_png(folder / "deep.png", np.zeros((28, 28), np.uint16)), ValueError,
        r"deep.png: a 28x28 px image of PIL mode I;16; this model takes .* 8-bit image file"),
    "0-1 floats to a model of 8-bit pixels": (
        "fashion-mnist", lambda folder: torch.full((28, 28), 0.5), ValueError,
        r"^got float32 pixels from 0.5 to 0.5; this model was trained on uint8 pixels 0-255: give whole numbers in "
        r"that range \(0-1 floats: \(x \* 255\).round\(\)\)$"),
    "4-channel tensor to an image-folder model": (
        "image-folder", lambda folder: torch.zeros(4, 10, 10, dtype=torch.uint8), TypeError,
        r"^got Tensor \[4, 10, 10\] torch.uint8; this model takes an image file, a PIL image, or pixels a PIL image "
        r"holds: a tensor \[C, H, W\] or \[H, W\] \(3 channels: uint8 only\) or an array \[H, W\] or \[H, W, 3\]$"),
    "float RGB tensor to an image-folder model": (
        "image-folder", lambda folder: torch.rand(3, 10, 10), TypeError, r"^got Tensor \[3, 10, 10\] torch.float32"),
    "a number to an image-folder model": ("image-folder", lambda folder: 3, TypeError, r"^got int \[\] ; this model"),
}


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_exported_learner_names_what_it_takes_for_a_wrong_input(trained, case):
    kind, make, error, message = BAD_INPUTS[case]
    _, _, loaded, folder = trained(kind)
    with loaded.no_bar(), pytest.raises(error, match=message):
        loaded.predict(make(folder))


@pytest.mark.bad_input
@pytest.mark.parametrize("folder", [".", "a-folder-whose-name-takes-the-path-past-the-80-characters-a-message-shows"],
                         ids=["short-path", "long-path"])  # the message keeps the file's name either way
def test_image_files_are_refused_by_a_model_of_float_pixels_of_no_fixed_white(tmp_path, folder):
    rng = np.random.default_rng(0)
    floats = {f"{split}_images": rng.normal(size=(n, 12, 12)).astype(np.float32)
              for split, n in (("train", 24), ("val", 12), ("test", 6))}
    dls = medmnist_dataloaders(write_npz(tmp_path / "floats.npz", n=(24, 12, 6), **floats), bs=4)
    (tmp_path / folder).mkdir(exist_ok=True)
    image = write_png(tmp_path / folder / "image.png", np.zeros((12, 12), np.uint8))
    with pytest.raises(TypeError, match=r"image.png; this model was trained on float32 pixels of no fixed white "
                                        r"level, which an image file cannot give: it takes one image as in training: "
                                        r"a tensor or array \[1, 12, 12\] or \[12, 12\] of float32 pixels$"):
        dls.test_dl([image]).one_batch()
    (x,) = dls.test_dl([torch.from_numpy(floats["val_images"][0])]).one_batch()  # its own pixels: taken
    assert x.shape == (1, 1, 12, 12)


@pytest.mark.slow
def test_learner_pkl_is_the_size_of_the_model_not_of_the_data(tmp_path):
    result = normfree.train(data="digits", arch="nf_resnet_tiny", size=SIZE, bs=64, steps=1, quiet=True,
                            out=tmp_path, save_plots=False)
    data_bytes = sum(t.nbytes for ds in (result.learner.dls.train_ds, result.learner.dls.valid_ds) for t in ds.tensors)
    weights_bytes = (tmp_path / "model.safetensors").stat().st_size
    assert data_bytes > 400_000  # all 1797 digits, 64 float32 pixels each
    assert (tmp_path / "learner.pkl").stat().st_size < weights_bytes + 100_000
