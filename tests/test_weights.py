"""Local weight files: round trips, head re-creation, channel adaptation, and errors that name what disagrees."""
import re
from pathlib import Path

import pytest
import timm
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.vision.data import ImageDataLoaders
from torch.utils.data import TensorDataset

from normfree import nf_learner, save_weights
from normfree.data import write_digits_image_folder
from normfree.models import load_weights

# tensor DataLoaders take no Normalize transform; nf_learner says so, which these tests do not examine
pytestmark = pytest.mark.filterwarnings("ignore:these DataLoaders take no batch transforms")


def image_dls(channels=3, classes=4):
    x, y = torch.randn(32, channels, 16, 16), torch.arange(32) % classes
    dls = DataLoaders(DataLoader(TensorDataset(x, y), bs=8), DataLoader(TensorDataset(x, y), bs=8))
    dls.c = classes
    return dls


def source_model(arch="test_nfnet", classes=4, channels=3):
    torch.manual_seed(3)
    model = timm.create_model(arch, num_classes=classes, in_chans=channels)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # differ from any fresh init
    return model


def write(model, path):
    if path.suffix == ".safetensors":
        save_weights(model, path, "test_nfnet")
    elif path.name.startswith("fastai"):
        torch.save({"model": model.state_dict(), "opt": {}}, path)  # learn.save() layout
    else:
        torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)  # a DDP checkpoint
    return path


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth", "fastai_save.pth"])
def test_round_trip(tmp_path, name):
    model = source_model()
    learn = nf_learner(image_dls(), "test_nfnet", weights=write(model, tmp_path / name))
    for (name_, expected), actual in zip(model.state_dict().items(), learn.model.state_dict().values()):
        assert torch.equal(expected, actual), name_
    assert not learn.model.stem.conv1.weight.requires_grad  # starts frozen, as vision_learner with weights
    assert learn.model.get_classifier().weight.requires_grad


def test_exported_learner_as_weights(tmp_path):
    folder = write_digits_image_folder(tmp_path / "digits", size=16, per_class=4)
    source = nf_learner(ImageDataLoaders.from_folder(folder, valid_pct=0.25, seed=0, bs=4), "test_nfnet")
    source.model.load_state_dict(source_model(classes=10).state_dict())
    source.export("learner.pkl")  # into learn.path, the image folder
    learn = nf_learner(image_dls(classes=10), "test_nfnet", weights=folder / "learner.pkl")
    for expected, actual in zip(source.model.state_dict().values(), learn.model.state_dict().values()):
        assert torch.equal(expected, actual)


def test_other_class_count_recreates_the_head(tmp_path):
    model = source_model(classes=1000)
    with pytest.warns(UserWarning, match="1000-class classifier; keeping a new one for 4 classes"):
        learn = nf_learner(image_dls(), "test_nfnet", weights=write(model, tmp_path / "w.safetensors"))
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.fc")}
    for key, value in body.items():
        assert torch.equal(learn.model.state_dict()[key], value)
    head = learn.model.get_classifier()
    assert head.out_features == 4 and head.weight.std().item() == pytest.approx(0.01, rel=0.2)


def test_other_input_channels_adapt_the_first_conv(tmp_path):
    model = source_model(channels=3)
    learn = nf_learner(image_dls(channels=1), "test_nfnet", weights=write(model, tmp_path / "w.safetensors"))
    expected = model.stem.conv1.weight.detach().sum(dim=1, keepdim=True)  # RGB filters summed for gray input
    torch.testing.assert_close(learn.model.stem.conv1.weight.detach(), expected)


def test_gray_weights_adapt_to_rgb_input(tmp_path):
    model = source_model(channels=1)
    learn = nf_learner(image_dls(channels=3), "test_nfnet", weights=write(model, tmp_path / "w.safetensors"))
    gray = torch.randn(2, 1, 16, 16)
    model.eval(), learn.model.eval()
    stem = learn.model.stem.conv1
    expected = torch.nn.functional.conv2d(gray, model.stem.conv1.weight.detach(), None, stem.stride, stem.padding)
    actual = torch.nn.functional.conv2d(gray.repeat(1, 3, 1, 1), stem.weight.detach(), None, stem.stride, stem.padding)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_wrong_architecture_lists_the_keys(tmp_path):
    path = save_weights(timm.create_model("nf_resnet26", num_classes=4), tmp_path / "w.safetensors", "nf_resnet26")
    with pytest.raises(ValueError, match=r"\(saved from 'nf_resnet26'\) does not fit test_nfnet: \d+ keys missing "
                                         r"from the file \(stem\.conv1\.weight.*; \d+ unexpected keys \(.*; \d+ shapes "
                                         r"differ \(head\.fc\.weight: file \[4, 2048\] vs model \[4, 192\]"):
        nf_learner(image_dls(), "test_nfnet", weights=path)


def test_mismatched_shapes_are_listed(tmp_path):
    state = source_model().state_dict()
    state["stages.0.0.conv1.weight"] = torch.randn(8, 3, 1, 1)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    expected_shape = list(timm.create_model("test_nfnet").stages[0][0].conv1.weight.shape)
    with pytest.raises(ValueError, match=rf"1 shapes differ \(stages\.0\.0\.conv1\.weight: file \[8, 3, 1, 1\] "
                                         rf"vs model \[{', '.join(map(str, expected_shape))}\]\)"):
        nf_learner(image_dls(), "test_nfnet", weights=path)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        nf_learner(image_dls(), "test_nfnet", weights=tmp_path / "nope.safetensors")
    (tmp_path / "w.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"expected one of \.safetensors, \.pth, \.pt, \.bin, \.pkl"):
        load_weights(timm.create_model("test_nfnet"), tmp_path / "w.txt")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth' is not a PyTorch checkpoint") as error:
        load_weights(timm.create_model("test_nfnet"), tmp_path / "broken.pth")
    assert "weights_only" not in str(error.value)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_weights(timm.create_model("test_nfnet"), tmp_path / "list.pth")


def test_files_that_are_not_safetensors_or_checkpoints_get_a_one_line_error(tmp_path):
    model = timm.create_model("test_nfnet")
    whole = save_weights(model, tmp_path / "whole.safetensors").read_bytes()
    cases = {
        "text.safetensors": b"hello, a text file\n",  # safetensors: "header too large"
        "tiny.safetensors": b"hi",  # "header too small"
        "truncated.safetensors": whole[: len(whole) // 2],  # "file not fully covered"
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ValueError, match=rf"'.*{name}' is not a readable safetensors file .*truncated or corrupt"):
            load_weights(model, tmp_path / name)

    (tmp_path / "notes.pth").write_text("my notes\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, found in (("notes.pth", "begins b'my n'"), ("empty.pt", "the file is empty")):
        with pytest.raises(ValueError, match=rf"'.*{name}' is not a PyTorch checkpoint .*{found}\): point to a file "
                                             rf"written by torch.save") as error:
            load_weights(model, tmp_path / name)
        assert "weights_only" not in str(error.value)

    checkpoint = tmp_path / "full.pth"
    torch.save(model.state_dict(), checkpoint)
    (tmp_path / "cut.pth").write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"'.*cut.pth' is not a readable PyTorch checkpoint .*truncated or corrupt"):
        load_weights(model, tmp_path / "cut.pth")

    torch.save({"model": model.state_dict(), "maker": Path}, tmp_path / "objects.pth")  # a class: not weights-only
    with pytest.raises(ValueError, match=r"'.*objects.pth' holds Python objects other than tensors.*state_dict\(\)") \
            as error:
        load_weights(model, tmp_path / "objects.pth")
    assert "weights_only=False" not in str(error.value)


def test_the_weight_suffixes_are_stated_once_and_quoted_everywhere(tmp_path, capsys):
    from normfree.app.cli import build_parser
    from normfree.app.config import TrainConfig
    from normfree.app.train import OUTPUT_FILES
    from normfree.models.weights import SAVE_SUFFIX, WEIGHT_FILES, WEIGHT_SUFFIXES

    assert WEIGHT_SUFFIXES == (".safetensors", ".pth", ".pt", ".bin", ".pkl") and SAVE_SUFFIX == ".safetensors"
    assert WEIGHT_FILES == ".safetensors, .pth, .pt, .bin or a learn.export() .pkl"
    assert (OUTPUT_FILES["weights"], OUTPUT_FILES["learner"]) == ("model.safetensors", "learner.pkl")
    weights_help = next(a.help for a in build_parser()[1]["train"]._actions if a.dest == "weights")
    assert weights_help.startswith(f"start from a local weights file: {WEIGHT_FILES} (default")
    with pytest.raises(ValueError, match=re.escape(f"nope.pt: no such file; expected a {WEIGHT_FILES} file") + "$"):
        TrainConfig(weights=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="save_weights writes .safetensors files; got 'w.pth'"):
        save_weights(source_model(), tmp_path / "w.pth")
