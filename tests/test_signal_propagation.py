"""`normfree.signal_propagation`: hand-computed statistics, the NF variance recurrence, hook hygiene, block
discovery."""
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.nfnet import DownsampleAvg
from torch import nn

from normfree.models.propagation import (
    average_channel_squared_mean,
    average_channel_variance,
    signal_propagation,
)
from normfree.models.small_resnets import ALPHA


def hand_stats(h):
    """float64 (squared mean, variance) over N, H, W per channel, then the mean over channels."""
    means = h.mean(dim=(0, 2, 3))
    variances = ((h - means[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    return means.square().mean().item(), variances.mean().item()


class ToyBlock(nn.Module):
    """out = shortcut(x) + alpha * conv2(relu(conv1(x))); the shortcut a 1x1 conv when the shape changes."""

    def __init__(self, cin, cout, alpha=0.5):
        super().__init__()
        self.alpha = alpha
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + self.alpha * self.conv2(F.relu(self.conv1(x)))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.blocks = nn.Sequential(ToyBlock(3, 4), ToyBlock(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def conv64(conv, h):
    return F.conv2d(h, conv.weight.double(), conv.bias.double(), padding=conv.padding)


def test_statistic_functions_match_their_formulas():
    torch.manual_seed(0)
    h = torch.randn(5, 3, 4, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0])[:, None, None] + 0.5
    squared_mean, variance = hand_stats(h)
    assert average_channel_squared_mean(h) == pytest.approx(squared_mean, rel=1e-12)
    assert average_channel_variance(h) == pytest.approx(variance, rel=1e-12)


def toy_blocks_by_hand(stem, blocks, x):
    """(squared mean, variance, residual variance) after each of `blocks` run in turn on stem(x), by hand in float64
    from the same weights."""
    h = conv64(stem, x.double())
    expected = []
    for block in blocks:
        branch = block.alpha * conv64(block.conv2, F.relu(conv64(block.conv1, h)))
        skip = h if block.shortcut is None else conv64(block.shortcut, h)
        h = skip + branch
        expected.append((*hand_stats(h), hand_stats(branch)[1]))
    return expected


def test_two_block_toy_matches_a_hand_computation_in_float64():
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(6, 2, 5, 5)
    result = signal_propagation(model, x, blocks=ToyBlock)
    expected = toy_blocks_by_hand(model.stem, model.blocks, x)
    assert [row.name for row in result.rows] == ["blocks.0", "blocks.1"]
    assert [row.index for row in result.rows] == [0, 1]
    assert [row.transition for row in result.rows] == [True, False]  # the shape changes in the first only
    for row, (squared_mean, variance, residual) in zip(result.rows, expected):
        assert row.squared_mean == pytest.approx(squared_mean, rel=1e-4)
        assert row.variance == pytest.approx(variance, rel=1e-4)
        assert row.residual_variance == pytest.approx(residual, rel=1e-4)
    assert result.source == "batch" and result.input_shape == (6, 2, 5, 5)
    # names work as types do
    by_name = signal_propagation(model, x, blocks=["blocks.1", "blocks.0"])
    assert by_name.records() == result.records()


def test_post_activation_branch_is_read_before_the_in_place_addition():
    """torchvision's BasicBlock adds the shortcut into bn2's output in place, then applies ReLU."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    first = signal_propagation(model, x, batch_stats=False).rows[0]
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        block = model.layer1[0]
        branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h)))))
        out = torch.relu(branch + h)
    assert first.residual_variance == pytest.approx(hand_stats(branch.double())[1], rel=1e-4)
    assert (first.squared_mean, first.variance) == pytest.approx(hand_stats(out.double()), rel=1e-4)


def expected_variances(rows, alpha):
    """Var_i = Var_{i-1} + alpha^2, reset to 1 + alpha^2 at each transition (arXiv 2101.08692, Sec. 4)."""
    variance, expected = 1.0, []
    for row in rows:
        variance = (1.0 if row.transition else variance) + alpha ** 2
        expected.append(variance)
    return expected


@pytest.mark.slow
def test_nf_resnet_without_skipinit_follows_the_expected_variance_recurrence():
    """nf_resnet_small (SkipInit off, alpha 0.5) on N(0, 1) noise, within 10% at every block.

    The recurrence assumes a transition's shortcut convolves the normalised input; the family's shortcut
    average-pools 2x2 first, which on white noise divides the shortcut's variance by up to 4 (see
    small_resnets), so here the pools become plain stride-2 subsampling. 64 px keeps the zero padding of
    the 3x3 convolutions (which lowers the variance at the borders) to a few percent at the last stage.
    """
    torch.manual_seed(0)
    model = timm.create_model("nf_resnet_small", in_chans=3)
    for module in model.modules():
        if isinstance(module, DownsampleAvg) and isinstance(module.pool, nn.AvgPool2d):
            module.pool = nn.AvgPool2d(1, 2)
    result = signal_propagation(model, input_shape=(8, 3, 64, 64), seed=0)
    assert [row.transition for row in result.rows] == [True, False] * 3
    expected = expected_variances(result.rows, ALPHA)
    assert expected == pytest.approx([1.25, 1.5] * 3)
    measured = [row.variance for row in result.rows]
    print("predicted", [f"{v:.3f}" for v in expected], "measured", [f"{v:.3f}" for v in measured])
    assert measured == pytest.approx(expected, rel=0.10)
    # each residual branch adds about alpha^2; the means stay near 0
    assert [row.residual_variance for row in result.rows] == pytest.approx([ALPHA ** 2] * 6, rel=0.15)
    assert all(row.squared_mean < 0.05 for row in result.rows)


def test_batchnorm_uses_batch_statistics_and_leaves_running_averages_alone():
    torch.manual_seed(0)
    model = timm.create_model("bn_resnet_tiny", in_chans=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = signal_propagation(model, input_shape=(4, 1, 16, 16))
    running = signal_propagation(model, input_shape=(4, 1, 16, 16), batch_stats=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # at initialisation the running averages (0, 1) leave the mean shift unchecked
    assert running.rows[-1].squared_mean > 3 * batch.rows[-1].squared_mean


class Boom(Exception):
    pass


def test_hooks_removed_and_training_modes_restored_when_the_forward_raises():
    model = Toy()
    model.train()
    model.blocks[1].eval()  # a mixed state, restored exactly

    def explode(module, args, output):
        raise Boom

    handle = model.head.register_forward_hook(explode)
    with pytest.raises(Boom):
        signal_propagation(model, input_shape=(2, 2, 4, 4), blocks=ToyBlock)
    handle.remove()
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert model.training and model.blocks[0].training and not model.blocks[1].training
    assert [m.training for m in model.blocks[1].modules()] == [False, False, False]
    assert model.blocks[0].conv1.training and model.stem.training


@pytest.mark.slow
@pytest.mark.parametrize("build, n_blocks, transitions", [
    (lambda: timm.create_model("nf_resnet_small"), 6, 3),
    (lambda: timm.create_model("bn_resnet_small"), 6, 3),
    (lambda: timm.create_model("nf_resnet26"), 8, 4),
    (lambda: timm.create_model("resnet18"), 8, 3),
    (lambda: timm.create_model("resnet26"), 8, 4),
    (lambda: __import__("torchvision").models.resnet18(), 8, 3),
    (lambda: __import__("torchvision").models.resnet50(), 16, 4),
    (lambda: __import__("fastai.vision.models.xresnet", fromlist=["xresnet18"]).xresnet18(), 8, 3),
    (lambda: __import__("fastai.vision.models.xresnet", fromlist=["xresnet50"]).xresnet50(), 16, 4),
], ids=["nf_resnet_small", "bn_resnet_small", "timm-nf_resnet26", "timm-resnet18", "timm-resnet26",
        "torchvision-resnet18", "torchvision-resnet50", "xresnet18", "xresnet50"])
def test_each_supported_family_finds_its_blocks(build, n_blocks, transitions):
    torch.manual_seed(0)
    model = build()
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.randn(2, channels, 32, 32)
    result = signal_propagation(model, x)
    assert len(result) == n_blocks
    assert sum(row.transition for row in result.rows) == transitions
    # each row's statistics are those of its block's output, read here by hooks on the same forward pass
    outputs, modules = {}, dict(model.named_modules())

    def keep(name):
        def hook(module, args, out):  # a copy: the next block may change its input in place
            outputs[name] = out.detach().double().clone()
        return hook

    hooks = [modules[row.name].register_forward_hook(keep(row.name)) for row in result.rows]
    model.eval()
    for module in model.modules():  # BatchNorm on the batch's own statistics, as signal_propagation runs it
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
            module.track_running_stats = False
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for row in result.rows:
        squared_mean, variance = hand_stats(outputs[row.name])
        assert row.squared_mean == pytest.approx(squared_mean, rel=1e-4) and row.variance == pytest.approx(
            variance, rel=1e-4), row.name
        assert math.isfinite(row.residual_variance), row.name


def test_no_block_found_names_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="blocks="):
        signal_propagation(model, input_shape=(2, 3, 8, 8))
    with pytest.raises(ValueError, match="no module named 'nope'"):
        signal_propagation(model, input_shape=(2, 3, 8, 8), blocks="nope")
    # a custom block whose shape changes and has no shortcut module: branch unknown
    result = signal_propagation(model, input_shape=(2, 3, 8, 8), blocks="0")
    assert math.isnan(result.rows[0].residual_variance) and result.rows[0].transition


def test_default_input_comes_from_the_model():
    result = signal_propagation(timm.create_model("nf_resnet_tiny", in_chans=1))
    assert result.input_shape == (16, 1, 32, 32) and result.source == "noise"


@pytest.mark.slow
def test_table_and_plot():
    torch.manual_seed(0)
    nf = signal_propagation(timm.create_model("nf_resnet_tiny"), input_shape=(2, 1, 16, 16), label="nf")
    bn = signal_propagation(timm.create_model("bn_resnet_tiny"), input_shape=(2, 1, 16, 16))
    frame = nf.to_frame()
    assert list(frame.columns) == ["index", "name", "transition", "squared_mean", "variance", "residual_variance"]
    assert len(frame) == 3 and frame["variance"].tolist() == [r["variance"] for r in nf.records()]
    from matplotlib.figure import Figure

    fig = Figure()
    drawn = nf.plot(bn, ax=fig.subplots(1, 3), title="t")
    assert drawn is fig
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["nf", "SmallResNet"]
    for ax, stat in zip(fig.axes, ("squared_mean", "variance", "residual_variance")):  # one line per result
        drawn = {line.get_label(): list(line.get_ydata()) for line in ax.lines if not line.get_label().startswith("_")}
        assert drawn == {"nf": [getattr(r, stat) for r in nf.rows], "SmallResNet": [getattr(r, stat) for r in bn.rows]}
        marks = [line for line in ax.lines if line.get_label().startswith("_")]  # the dotted transition lines
        assert [line.get_xdata()[0] for line in marks] == [r.index for r in nf.rows if r.transition]
    with pytest.raises(ValueError, match="labels"):
        nf.plot(bn, labels=["one"], ax=fig.subplots(1, 3))


def test_modules_import_no_plotting_library_at_import_time():
    """pyplot only inside `plot` (fastai itself imports pyplot when normfree imports it, so this checks the
    modules' own top-level imports rather than sys.modules)."""
    import ast

    import normfree.app.spp
    import normfree.models.propagation

    for module in (normfree.models.propagation, normfree.app.spp):
        tree = ast.parse(open(module.__file__).read())
        top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [alias.name for node in top for alias in node.names] + [node.module or "" for node in top
                                                                       if isinstance(node, ast.ImportFrom)]
        assert not any(name.startswith("matplotlib") for name in names), module.__name__
    assert "signal_propagation" in normfree.__all__ and "SignalPropagation" in normfree.models.__all__


@pytest.mark.bad_input
@pytest.mark.parametrize("given, argument", [
    (dict(x=torch.randn(0, 2, 5, 5)), "x"),
    (dict(x=torch.randn(1, 2, 5, 5)), "x"),
    (dict(input_shape=(0, 2, 5, 5)), "input_shape"),
    (dict(input_shape=(4, 2, 0, 5)), "input_shape"),
], ids=["empty_batch", "one_example", "empty_noise_batch", "empty_height"])
def test_a_batch_without_two_examples_is_refused_naming_the_argument(given, argument):
    """A batch of 0 gave rows of NaN; one example gives statistics over its positions only, not the batch's."""
    shape = tuple(given.get("input_shape") or given["x"].shape)
    with pytest.raises(ValueError, match=rf"^{argument}: signal propagation needs a batch of 2 or more examples .*got "
                                         rf"shape {re.escape(str(shape))}$"):
        signal_propagation(Toy(), blocks=ToyBlock, **given)


class Twice(nn.Module):
    """One block run at two depths: stem, block, block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.block = ToyBlock(3, 3)

    def forward(self, x):
        return self.block(self.block(self.stem(x)))


def test_a_block_run_twice_gives_one_row_per_call_labelled_by_call():
    torch.manual_seed(0)
    model = Twice()
    x = torch.randn(6, 2, 5, 5)
    result = signal_propagation(model, x, blocks=ToyBlock)
    expected = toy_blocks_by_hand(model.stem, [model.block, model.block], x)
    assert [(row.index, row.name) for row in result.rows] == [(0, "block (call 1)"), (1, "block (call 2)")]
    for row, (squared_mean, variance, residual) in zip(result.rows, expected):
        assert (row.squared_mean, row.variance, row.residual_variance) == pytest.approx(
            (squared_mean, variance, residual), rel=1e-4)


@pytest.mark.bad_input
def test_the_spp_command_refuses_a_batch_of_one(tmp_path, capsys):
    from normfree.app.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["spp", "--arch", "nf_resnet_tiny", "--bs", "1", "--out", str(tmp_path / "out"), "--quiet"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "normfree spp: error: --bs: must be at least 2, got 1"
    assert not (tmp_path / "out").exists()


def test_converted_last_block_branch_is_read_before_the_final_activation():
    """A converted network's last block applies the original's final ReLU to its sum: with SkipInit every branch
    adds exactly nothing, so every residual variance is 0, the last block's too (not what the ReLU removed)."""
    from torchvision.models import resnet18

    from normfree import to_normfree

    torch.manual_seed(0)
    converted = to_normfree(resnet18(num_classes=4), skipinit=True)
    result = signal_propagation(converted, input_shape=(4, 3, 32, 32))
    assert len(result) == 8
    assert [row.residual_variance for row in result.rows] == [0.0] * 8
    assert result.rows[-1].squared_mean > 0.01  # the last output is activated: ReLU of a zero-mean signal has a mean
