"""nf_learner: BN-free models for every NF family, body/head split, errors, baselines."""
import warnings

import pytest
import timm
import torch
import torchvision
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.data.transforms import Normalize
from fastai.vision.data import ImageDataLoaders
from torch import nn
from torch.utils.data import TensorDataset

from helpers import write_npz
from normfree import AGC, build_model, nf_learner, save_weights
from normfree.data import medmnist_dataloaders, write_digits_image_folder
from normfree.models import find_classifier, normalizer_free_archs
from normfree.models.factory import unknown_arch_error

NORMALISATION = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
PAPER_PARAMS_M = {"nfnet_f0": 71.5, "nfnet_f1": 132.6, "nfnet_f2": 193.8, "nfnet_f3": 254.9,
                  "nfnet_f4": 316.1, "nfnet_f5": 377.2, "nfnet_f6": 438.4}
LISTED_FAMILIES = ["nfnet_f0", "nfnet_f7", "dm_nfnet_f0", "dm_nfnet_f6", "nfnet_l0", "eca_nfnet_l0", "eca_nfnet_l3",
                   "nf_regnet_b0", "nf_regnet_b5", "nf_resnet26", "nf_resnet50", "nf_resnet101", "nf_seresnet26",
                   "nf_ecaresnet101", "test_nfnet"]


def image_dls(n=64, channels=3, size=16, classes=4, bs=16):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, size, size, generator=generator)
    y = torch.arange(n) % classes
    dls = DataLoaders(DataLoader(TensorDataset(x, y), bs=bs, shuffle=True),
                      DataLoader(TensorDataset(x[:16], y[:16]), bs=bs))
    dls.c = classes
    return dls


def normalisation_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, NORMALISATION)]


def test_every_listed_family_is_known():
    assert set(LISTED_FAMILIES) <= set(normalizer_free_archs())


@pytest.mark.parametrize("arch", normalizer_free_archs())
def test_no_normalisation_layer_anywhere(arch):
    with torch.device("meta"):
        model = build_model(arch, n_out=10, n_in=3)
    assert normalisation_layers(model) == []
    assert isinstance(find_classifier(model), nn.Linear)


@pytest.mark.parametrize("arch, millions", PAPER_PARAMS_M.items())
def test_parameter_counts_match_the_paper(arch, millions):
    with torch.device("meta"):
        model = build_model(arch, n_out=1000, n_in=3)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_learner_model_head_and_agc():
    learn = nf_learner(image_dls(), "test_nfnet")
    assert normalisation_layers(learn.model) == []
    head = learn.model.get_classifier()
    assert head.out_features == 4 and head.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert torch.all(head.bias == 0)
    agc = learn.adaptive_clip
    assert isinstance(agc, AGC) and agc.clipping == 0.01 and agc.skip_classifier == "weight"
    assert not any(isinstance(cb, AGC) for cb in nf_learner(image_dls(), "test_nfnet", agc=None).cbs)


@pytest.mark.slow
def test_freeze_trains_only_the_head_then_fine_tune_trains_all():
    learn = nf_learner(image_dls(), "test_nfnet")
    body, head = learn.splitter(learn.model)
    assert [p for p in head] == list(learn.model.get_classifier().parameters())
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.freeze()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    changed = [not torch.equal(b, p) for b, p in zip(before, learn.model.parameters())]
    head_ids = {id(p) for p in head}
    assert all(c == (id(p) in head_ids) for c, p in zip(changed, learn.model.parameters()))
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(1, 1e-2, freeze_epochs=0)
    assert all(not torch.equal(b, p) for b, p in zip(before, learn.model.parameters()) if id(p) not in head_ids
               and p.requires_grad)


@pytest.mark.slow
def test_discriminative_learning_rates():
    learn = nf_learner(image_dls(), "test_nfnet")
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, lr=slice(1e-5, 1e-3))
    assert [h["lr"] for h in learn.opt.hypers] == pytest.approx([1e-5, 1e-3])


def test_weights_bring_input_normalisation_from_the_timm_config(tmp_path):
    path = save_weights(timm.create_model("test_nfnet", num_classes=10), tmp_path / "w.safetensors", "test_nfnet")
    folder = write_digits_image_folder(tmp_path / "digits", size=16, per_class=4)
    dls = ImageDataLoaders.from_folder(folder, valid_pct=0.25, seed=0, bs=8)
    nf_learner(dls, "test_nfnet", weights=path)
    (norm,) = [t for t in dls.after_batch.fs if isinstance(t, Normalize)]
    config = timm.create_model("test_nfnet").pretrained_cfg
    assert norm.mean.flatten().tolist() == pytest.approx(list(config["mean"]))
    assert norm.std.flatten().tolist() == pytest.approx(list(config["std"]))
    nf_learner(dls, "test_nfnet", weights=path)
    assert len([t for t in dls.after_batch.fs if isinstance(t, Normalize)]) == 1
    with pytest.warns(UserWarning, match=r"normalise inputs yourself with mean=\(0.5, 0.5, 0.5\)"):
        nf_learner(image_dls(classes=10), "test_nfnet", weights=path)
    with warnings.catch_warnings():  # normfree's own tensor data is standardised already: no advice needed
        warnings.filterwarnings("error", message="these DataLoaders take no batch transforms")
        rgb = tmp_path / "rgb.npz"
        write_npz(rgb, channels=3)
        nf_learner(medmnist_dataloaders(rgb, bs=8), "test_nfnet", weights=path)


def test_unknown_arch_lists_close_normalizer_free_names():
    with pytest.raises(ValueError, match=r"unknown arch 'nfnet_f9'; close names: nfnet_f\d"):
        nf_learner(image_dls(), "nfnet_f9")


@pytest.mark.parametrize("typed, meant", [("resnet-18", "resnet18"), ("NFNET-F0", "nfnet_f0"),
                                          ("nf-resnet-50", "nf_resnet50"), ("ResNet50", "resnet50")])
def test_unknown_arch_suggests_the_timm_name_written_otherwise(typed, meant):
    with pytest.raises(ValueError, match=rf"unknown arch '{typed}'; did you mean {meant}\? "
                                         rf"Other close names: (dm_)?nf"):
        nf_learner(image_dls(), typed)


def test_unknown_arch_suggestions_put_normalizer_free_names_first():
    message = str(unknown_arch_error("resnet-18"))
    names = message.split("Other close names: ")[1].split(" (")[0].split(", ")
    nf = set(normalizer_free_archs())
    assert "resnet18d" in names and names[0] in nf
    assert [name in nf for name in names] == sorted((name in nf for name in names), reverse=True)  # NF, then others
    assert "timm.list_models() all" in message


def test_n_out_mismatch_and_missing_class_count():
    with pytest.raises(ValueError, match="n_out=7 but the data has 4 classes"):
        nf_learner(image_dls(), "test_nfnet", n_out=7)
    dls = image_dls()
    del dls.c
    with pytest.raises(ValueError, match="pass n_out="):
        nf_learner(dls, "test_nfnet")
    assert nf_learner(dls, "test_nfnet", n_out=4).model.get_classifier().out_features == 4


def test_non_image_data_is_refused():
    x, y = torch.randn(32, 5), torch.arange(32) % 2
    dls = DataLoaders(DataLoader(TensorDataset(x, y), bs=8), DataLoader(TensorDataset(x, y), bs=8))
    with pytest.raises(ValueError, match=r"needs image batches shaped \[batch, channels, height, width\].*\(8, 5\)"):
        nf_learner(dls, "test_nfnet", n_out=2)


def test_pretrained_without_the_hub_names_the_weights_alternative(monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", unreachable)
    with pytest.raises(RuntimeError, match=r"could not load pretrained weights for 'test_nfnet' \(OSError.*weights="):
        nf_learner(image_dls(), "test_nfnet", pretrained=True)


def test_pretrained_for_an_arch_without_published_weights():
    with pytest.raises(RuntimeError, match=r"'nf_resnet26' \(RuntimeError: No pretrained weights exist.*weights="):
        nf_learner(image_dls(), "nf_resnet26", pretrained=True)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet26", torchvision.models.resnet18],
                         ids=["timm_resnet26", "torchvision_resnet18"])
def test_batchnorm_baselines_share_the_interface(arch):
    learn = nf_learner(image_dls(size=32), arch, n_out=4)
    classifier = find_classifier(learn.model)
    assert classifier.out_features == 4 and classifier.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert normalisation_layers(learn.model) != []  # the body keeps its BatchNorm: it is the baseline
    body, head = learn.splitter(learn.model)
    fc = [m for m in learn.model.modules() if isinstance(m, nn.Linear)][-1]  # the one Linear, last: the classifier
    assert [id(p) for p in head] == [id(fc.weight), id(fc.bias)]
    assert [id(p) for p in body + head] == [id(p) for p in learn.model.parameters()]  # the rest, fc last, once each
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
