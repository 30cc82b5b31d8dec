"""Errors that name the option the user must change: every device option is checked by the one device check (the
same message for train's and spp's --device and compare's --devices), and compare names --arch for an arch its
methods cannot train, saying which archs and methods go together."""
import pytest
import torch

from helpers import refusal_line

QUICK_GRID = ["--methods", "nf-agc", "--batch-sizes", "16", "--seeds", "0", "--epochs", "1", "--size", "8", "--limit",
              "64", "--lrs", "0.01"]


@pytest.mark.bad_input
@pytest.mark.parametrize("device", [
    "tpu",  # not a device torch knows
    f"cuda:{torch.cuda.device_count()}",  # one GPU more than this machine has (none on a CPU machine)
    pytest.param("mps", marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
])
def test_every_device_option_is_one_check_with_one_message(tmp_path, capsys, device):
    train = refusal_line(["train", "--device", device, "--out", str(tmp_path / "run")], capsys)
    spp = refusal_line(["spp", "--arch", "nf_resnet_tiny", "--device", device, "--out", str(tmp_path / "spp")], capsys)
    compare = refusal_line(["compare", *QUICK_GRID, "--devices", "cpu", device, "--out", str(tmp_path / "grid")],
                           capsys)
    reason = train.removeprefix("normfree train: error: --device: ")
    assert reason != train and f"{device!r}" in reason and "use cpu" in reason
    assert spp == f"normfree spp: error: --device: {reason}"
    assert compare == f"normfree compare: error: --devices: {reason}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.bad_input
@pytest.mark.parametrize("arch, option, reason", [
    ("densenet121", "--arch", "densenet121 cannot be converted"),  # its own default methods: bn, converted*
    ("nf_resnet26", "--arch", "nf_resnet26 is normalizer-free already"),
])
def test_compare_names_the_arch_its_methods_cannot_convert_and_what_goes_together(tmp_path, capsys, arch, option,
                                                                                  reason):
    error = refusal_line(["compare", "--arch", arch, "--out", str(tmp_path / "grid")], capsys)
    assert error.startswith(f"normfree compare: error: {option}: {reason}"), error
    assert ("the small ResNets (nf_/bn_resnet_tiny/small/base) go with the methods bn, nf, nf-agc" in error
            and "(torchvision and timm ResNets such as resnet18) with bn, converted and converted-agc" in error)
    assert list(tmp_path.iterdir()) == []
