"""to_normfree in the workflow: nf_learner(convert=), normfree train --to-normfree [MODE], normfree compare's converted
and folded methods."""
import json

import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from torch import nn
from torch.utils.data import TensorDataset

import normfree
from normfree import nf_learner
from normfree.app.cli import build_parser, main
from normfree.app.compare import CompareConfig
from normfree.app.config import TrainConfig
from normfree.app.grid_jobs import train_command
from normfree.models import ConvertedResidual
from normfree.models.factory import build_model
from normfree.models.weights import save_weights

QUICK = dict(data="digits", size=8, limit=64, bs=16, epochs=1)


@pytest.mark.slow
def test_train_to_normfree_with_per_sample_agc(tmp_path):
    result = normfree.train(**QUICK, arch="resnet18", to_normfree=True, per_sample=True, quiet=True,
                            save_model=False, save_plots=False, out=tmp_path / "run")
    model = result.learner.model
    assert any(isinstance(m, ConvertedResidual) for m in model.modules())
    assert not any("Norm" in type(m).__name__ for m in model.modules())
    assert result.config.to_normfree and len(result.epochs) == 1
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["to_normfree"] == "nf"  # to_normfree=True is the mode "nf"


@pytest.mark.parametrize("arch, message", [
    ("nf_resnet_tiny", "--to-normfree: nf_resnet_tiny is already normalizer-free; drop to_normfree"),
    ("test_nfnet", "--to-normfree: test_nfnet is already normalizer-free"),
    ("bn_resnet_tiny", "--to-normfree: bn_resnet_tiny cannot be converted: bn_resnet_tiny is the BatchNorm twin of "
                       "normfree's nf_resnet_tiny: to_normfree does not convert its pre-activation blocks; build "
                       "nf_resnet_tiny (--arch nf_resnet_tiny"),
])
def test_train_cli_refuses_what_it_cannot_convert(tmp_path, capsys, arch, message):
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--arch", arch, "--to-normfree", "--out", str(tmp_path / "run")])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compare_converted_methods_on_your_own_arch(tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["compare", "--arch", "resnet18", "--batch-sizes", "16", "--no-accum", "--seeds", "0", "--epochs",
                   "1", "--size", "8", "--limit", "48", "--lrs", "0.01", "--out", str(out)])
    assert status == 0
    configs = {p.parent.name: json.loads(p.read_text())["config"] for p in (out / "runs").glob("*/result.json")}
    assert sorted(configs) == ["bn-bs16-x1-seed0", "converted-agc-bs16-x1-seed0", "converted-bs16-x1-seed0"]
    assert {name: (c["arch"], c["to_normfree"], c["agc"]) for name, c in configs.items()} == {
        "bn-bs16-x1-seed0": ("resnet18", None, None),
        "converted-bs16-x1-seed0": ("resnet18", "nf", None),
        "converted-agc-bs16-x1-seed0": ("resnet18", "nf", normfree.app.config.DEFAULT_AGC),
    }
    report = (out / "report.md").read_text()
    assert "converted to NF + AGC" in report and "resnet18 converted by normfree.to_normfree" in report


def test_compare_method_choices_are_checked():
    with pytest.raises(normfree.ConfigError, match="arch: 'resnet18' is not one of the small ResNets.*nf-agc"):
        CompareConfig(arch="resnet18", methods=("bn", "nf-agc"))
    with pytest.raises(normfree.ConfigError, match="methods: bn_resnet_tiny cannot be converted"):
        CompareConfig(arch="nf_resnet_tiny", methods=("bn", "converted"))
    assert CompareConfig().method_keys() == ["bn", "nf-agc"]  # the twins' default is unchanged
    assert CompareConfig(arch="resnet18").method_keys() == ["bn", "converted", "converted-agc"]


# ---- mode "fold" in the workflow ------------------------------------------------------------------------------------

def batchnorm_free(model):
    return not any(isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) for m in model.modules())


@pytest.mark.slow
def test_train_cli_folds_with_to_normfree_fold_and_its_config_round_trips(tmp_path):
    """--to-normfree fold with per-sample AGC (the folded model has no normalisation layer)."""
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--size", "8", "--limit", "64", "--bs", "16", "--epochs", "1", "--arch",
                 "resnet18", "--to-normfree", "fold", "--per-sample", "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["config"]["to_normfree"] == "fold"
    config = TrainConfig.load(out)
    assert config.to_normfree == "fold" and TrainConfig.from_dict(config.to_dict()) == config
    assert "--to-normfree fold" in train_command(config)  # a plan line of normfree compare --plan


def test_bare_to_normfree_flag_is_the_nf_mode():
    parser = build_parser()[1]["train"]
    assert parser.parse_args(["--to-normfree"]).to_normfree == "nf"
    assert parser.parse_args(["--to-normfree", "fold"]).to_normfree == "fold"
    assert parser.parse_args([]).to_normfree is None


@pytest.mark.parametrize("given, mode", [(True, "nf"), (False, None), ("fold", "fold"), (None, None)])
def test_train_config_to_normfree_takes_a_mode_and_old_flags(given, mode):
    """config.json files of runs before modes hold true/false: they load as "nf" / no conversion."""
    assert TrainConfig.from_dict({"arch": "resnet18", "to_normfree": given}).to_normfree == mode


@pytest.mark.bad_input
@pytest.mark.parametrize("given", ["folded", 1, ["fold"]], ids=["unknown_name", "number", "list"])
def test_train_config_refuses_unknown_modes_naming_to_normfree(given):
    with pytest.raises(normfree.ConfigError, match=r"^to_normfree: must be one of nf, fold \(nf: .*; fold: .*\), or "
                                                   r"None for no conversion; got"):
        TrainConfig(arch="resnet18", to_normfree=given)


@pytest.mark.bad_input
def test_train_cli_refuses_an_unknown_mode(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--arch", "resnet18", "--to-normfree", "folded", "--out", str(tmp_path / "run")])
    assert stopped.value.code == 2
    assert "--to-normfree: invalid choice: 'folded'" in capsys.readouterr().err


def image_dls(n=32, size=16, classes=3, bs=8):
    generator = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 3, size, size, generator=generator),
                       torch.randint(0, classes, (n,), generator=generator))
    dls = DataLoaders(DataLoader(ds, bs=bs, shuffle=True), DataLoader(ds, bs=bs))
    dls.c = classes
    return dls


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:these DataLoaders take no batch transforms")
@pytest.mark.parametrize("convert", ["fold", {"mode": "fold"}], ids=["mode_name", "options"])
def test_nf_learner_fold_keeps_the_function_of_the_loaded_weights(tmp_path, convert):
    torch.manual_seed(0)
    trained = build_model("resnet18", 3, 3)
    for bn in trained.modules():  # statistics and affine parameters as training would leave them
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.3)
    path = save_weights(trained, tmp_path / "trained.safetensors", arch="resnet18")
    dls = image_dls()
    learn = nf_learner(dls, "resnet18", weights=path, convert=convert)
    assert batchnorm_free(learn.model)
    reference = build_model("resnet18", 3, 3, weights=path).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected, actual = reference(x), learn.model.double().eval()(x)
    assert float((expected - actual).abs().max() / expected.abs().max()) <= 1e-5


@pytest.mark.slow
def test_compare_folded_methods_on_your_own_arch(tmp_path):
    out = tmp_path / "out"
    status = main(["compare", "--arch", "resnet18", "--methods", "folded", "folded-agc", "--batch-sizes", "16",
                   "--no-accum", "--seeds", "0", "--epochs", "1", "--size", "8", "--limit", "48", "--lrs", "0.01",
                   "--quiet", "--out", str(out)])
    assert status == 0
    configs = {p.parent.name: json.loads(p.read_text())["config"] for p in (out / "runs").glob("*/result.json")}
    assert {name: (c["arch"], c["to_normfree"], c["agc"]) for name, c in configs.items()} == {
        "folded-bs16-x1-seed0": ("resnet18", "fold", None),
        "folded-agc-bs16-x1-seed0": ("resnet18", "fold", normfree.app.config.DEFAULT_AGC),
    }
    report = (out / "report.md").read_text()
    assert "BatchNorm folded + AGC" in report and "resnet18 with its BatchNorm folded into the convolutions" in report


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["torchvision:resnet18", "fastai:xresnet18", "torchvision:vgg11_bn"])
def test_torchvision_and_fastai_archs_by_name_build_and_convert(arch):
    import torchvision
    from fastai.vision.models.xresnet import xresnet18

    library_function = {"torchvision:resnet18": torchvision.models.resnet18,
                        "fastai:xresnet18": lambda weights=None: xresnet18(),  # fastai's functions take no weights
                        "torchvision:vgg11_bn": torchvision.models.vgg11_bn}[arch]
    by_name, by_function = build_model(arch, 7), build_model(library_function, 7)
    assert [tuple(p.shape) for p in by_name.parameters()] == [tuple(p.shape) for p in by_function.parameters()]
    assert by_name(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    converted = normfree.to_normfree(by_name, alpha=0.5, skipinit=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    blocks = [m for m in converted.modules() if isinstance(m, ConvertedResidual)]
    assert all(b.alpha == 0.5 and b.skip_gain is None for b in blocks)
    assert bool(blocks) == ("resnet" in arch)


@pytest.mark.bad_input
@pytest.mark.parametrize("arch, message", [
    ("torchvision:resnet19", "unknown arch 'torchvision:resnet19': torchvision has no model 'resnet19'; close names: "
                             "torchvision:resnet18"),
    ("fastai:xresnet19", "fastai has no model 'xresnet19'; close names: fastai:xresnet18"),
])
def test_unknown_library_archs_name_close_ones(tmp_path, capsys, arch, message):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--arch", arch, "--out", str(tmp_path / "run")])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_train_alpha_and_skipinit_reach_the_converted_blocks(tmp_path):
    result = normfree.train(**QUICK, arch="torchvision:resnet18", to_normfree="nf", alpha=0.5, skipinit=False,
                            quiet=True, save_model=False, save_plots=False, out=tmp_path / "run")
    blocks = [m for m in result.learner.model.modules() if isinstance(m, ConvertedResidual)]
    assert len(blocks) == 8 and all(b.alpha == 0.5 and b.skip_gain is None for b in blocks)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert (saved["alpha"], saved["skipinit"], saved["arch"]) == (0.5, False, "torchvision:resnet18")


@pytest.mark.bad_input
@pytest.mark.parametrize("options, option", [
    (dict(arch="resnet18", alpha=0.5), "alpha"),  # no conversion: no NF blocks
    (dict(arch="resnet18", to_normfree="fold", skipinit=False), "skipinit"),  # fold keeps the blocks as they are
    (dict(arch="nf_resnet_tiny", alpha=0.0), "alpha"),
    (dict(arch="nf_resnet_tiny", alpha=float("nan")), "alpha"),
])
def test_train_config_refuses_alpha_and_skipinit_without_nf_blocks(options, option):
    with pytest.raises(normfree.ConfigError) as error:
        TrainConfig(**options)
    assert error.value.option == option


@pytest.mark.bad_input
@pytest.mark.parametrize("options, option", [
    (dict(methods=("nf-agc-skipinit",), skipinit=False), "skipinit"),
    (dict(arch="resnet18", methods=("bn", "folded-agc"), alpha=0.5), "alpha"),
])
def test_compare_refuses_block_options_it_cannot_apply(options, option):
    from normfree.app.compare import CompareConfig

    with pytest.raises(normfree.ConfigError) as error:
        CompareConfig(**options)
    assert error.value.option == option


def test_compare_passes_alpha_and_skipinit_to_converted_runs_only(tmp_path):
    from normfree.app.compare import CompareConfig, GridCell

    config = CompareConfig(arch="resnet18", methods=("bn", "converted-agc", "folded-agc"), alpha=0.5, skipinit=False,
                           out=str(tmp_path))
    runs = {m: config.train_config(GridCell(m, 16, 1, 0), 1e-2, None) for m in config.method_keys()}
    assert (runs["converted-agc"].alpha, runs["converted-agc"].skipinit) == (0.5, False)
    assert all((runs[m].alpha, runs[m].skipinit) == (None, None) for m in ("bn", "folded-agc"))
