"""to_normfree in the workflow: nf_learner(convert=), normfree train --to-normfree, normfree compare's converted methods."""
import json

import pytest

import normfree
from normfree import ConvertedResidual
from normfree.app.cli import main

QUICK = dict(data="digits", size=8, limit=64, bs=16, epochs=1)


def test_train_to_normfree_with_per_sample_agc(tmp_path):
    result = normfree.train(**QUICK, arch="resnet18", to_normfree=True, per_sample=True, quiet=True,
                            save_model=False, save_plots=False, out=tmp_path / "run")
    model = result.learner.model
    assert any(isinstance(m, ConvertedResidual) for m in model.modules())
    assert not any("Norm" in type(m).__name__ for m in model.modules())
    assert result.config.to_normfree and len(result.epochs) == 1
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["to_normfree"] is True


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


def test_compare_converted_methods_on_your_own_arch(tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["compare", "--arch", "resnet18", "--batch-sizes", "16", "--no-accum", "--seeds", "0", "--epochs",
                   "1", "--size", "8", "--limit", "48", "--lrs", "0.01", "--out", str(out)])
    assert status == 0
    configs = {p.parent.name: json.loads(p.read_text())["config"] for p in (out / "runs").glob("*/result.json")}
    assert sorted(configs) == ["bn-bs16-x1-seed0", "converted-agc-bs16-x1-seed0", "converted-bs16-x1-seed0"]
    assert {name: (c["arch"], c["to_normfree"], c["agc"]) for name, c in configs.items()} == {
        "bn-bs16-x1-seed0": ("resnet18", False, None),
        "converted-bs16-x1-seed0": ("resnet18", True, None),
        "converted-agc-bs16-x1-seed0": ("resnet18", True, normfree.app.config.DEFAULT_AGC),
    }
    report = (out / "report.md").read_text()
    assert "converted to NF + AGC" in report and "resnet18 converted by normfree.to_normfree" in report


def test_compare_method_choices_are_checked():
    with pytest.raises(normfree.ConfigError, match="arch: 'resnet18' is not one of the small ResNets.*nf-agc"):
        normfree.CompareConfig(arch="resnet18", methods=("bn", "nf-agc"))
    with pytest.raises(normfree.ConfigError, match="methods: bn_resnet_tiny cannot be converted"):
        normfree.CompareConfig(arch="nf_resnet_tiny", methods=("bn", "converted"))
    assert normfree.CompareConfig().method_keys() == ["bn", "nf-agc"]  # the twins' default is unchanged
    assert normfree.CompareConfig(arch="resnet18").method_keys() == ["bn", "converted", "converted-agc"]
