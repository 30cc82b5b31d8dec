"""`normfree train` and `normfree.train`: outputs, reproducibility, Ctrl-C checkpoints, precision, bad input."""
import argparse
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import load_learner
from fastai.torch_core import default_device
from safetensors.torch import load_file

import normfree
from fastai_helpers import GradientsBeforeAGC, reference_step_rates
from helpers import (
    EXPECTED_FILES,
    QUICK,
    QUICK_OPTIONS,
    InterruptAt,
    LossesSeen,
    read_rows,
    smoothed_loss,
    validation_accuracy,
    with_callback,
    without_timing,
)
from normfree.app.cli import build_parser, main
from normfree.data import digits_dataloaders, write_digits_image_folder
from normfree.data.registry import parse_data_spec

PNG = b"\x89PNG\r\n\x1a\n"


def digits_validation_accuracy(weights_path, size=8, limit=64, seed=0):
    """Accuracy of the saved weights on the validation split, computed outside normfree's training code."""
    model = timm.create_model("nf_resnet_tiny", num_classes=10, in_chans=1)
    model.load_state_dict(load_file(weights_path))
    model.eval()
    dls = digits_dataloaders(bs=16, size=size, seed=seed, limit=limit, device="cpu")
    correct = total = 0
    with torch.no_grad():
        for x, y in dls.valid:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`normfree train` through main(argv), run from an empty working directory."""
    work = tmp_path_factory.mktemp("work")
    cwd = Path.cwd()
    gradients = GradientsBeforeAGC()  # what AGC was given at each step, for the clip rate's reference
    try:
        import os
        os.chdir(work)
        with pytest.MonkeyPatch.context() as patched:
            with_callback(patched, gradients)
            status = main(["train", *QUICK, "--out", "run"])
    finally:
        os.chdir(cwd)
    return work, status, gradients


@pytest.mark.slow
def test_cli_train_writes_every_output_into_out_and_nothing_elsewhere(cli_run):
    work, status = cli_run[:2]
    assert status == 0
    assert [p.name for p in work.iterdir()] == ["run"]
    out = work / "run"
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    for png in ("curves.png", "agc_clip_rates.png"):
        assert (out / png).read_bytes()[:8] == PNG


@pytest.mark.slow
def test_cli_train_metrics_are_the_saved_models_accuracy(cli_run):
    out = cli_run[0] / "run"
    rows = read_rows(out / "metrics.csv")
    assert len(rows) == 1
    assert {"epoch", "train_loss", "valid_loss", "accuracy", "agc_clip", "seconds", "images_per_s"} <= set(rows[0])
    assert rows[0]["epoch"] == "1"
    assert float(rows[0]["accuracy"]) == pytest.approx(digits_validation_accuracy(out / "model.safetensors"), abs=1e-6)
    steps = cli_run[2].steps  # 64 images in batches of 16
    clipped = sorted(steps[0].keys() - {"head.fc.weight"})  # all parameters but the classifier weight
    expected = reference_step_rates(steps, clipped, normfree.app.config.DEFAULT_AGC)
    assert len(steps) == 4 and float(rows[0]["agc_clip"]) == pytest.approx(sum(expected) / 4, abs=1e-6)
    result = json.loads((out / "result.json").read_text())
    assert result["interrupted"] is False
    assert result["summary"]["final_accuracy"] == pytest.approx(float(rows[0]["accuracy"]))


@pytest.mark.slow
def test_cli_train_config_records_the_settings_and_versions(cli_run):
    out = cli_run[0] / "run"
    content = json.loads((out / "config.json").read_text())
    config = content["config"]
    assert (config["data"], config["arch"], config["size"], config["limit"], config["bs"], config["epochs"]) == (
        "digits", "nf_resnet_tiny", 8, 64, 16, 1)
    assert (config["agc"], config["seed"], config["precision"], config["accum"]) == (
        normfree.app.config.DEFAULT_AGC, 0, "fp32", 1)
    assert config["out"] == str(out.resolve())
    for package in ("torch", "fastai", "timm"):
        assert content["versions"][package] == metadata.version(package)


@pytest.mark.slow
def test_exported_learner_of_tensor_data_loads_and_predicts_like_the_weights(cli_run):
    out = cli_run[0] / "run"
    learn = load_learner(out / "learner.pkl")
    assert [cb.clipping for cb in learn.cbs if isinstance(cb, normfree.AGC)] == [normfree.app.config.DEFAULT_AGC]
    dls = digits_dataloaders(bs=16, size=8, limit=64, device="cpu")
    images, _ = dls.valid.dataset.tensors
    with learn.no_bar():
        preds, _ = learn.get_preds(dl=learn.dls.valid.new(dls.valid.dataset))  # its own standardisation
    model = timm.create_model("nf_resnet_tiny", num_classes=10, in_chans=1)
    model.load_state_dict(load_file(out / "model.safetensors"))
    with torch.no_grad():
        expected = torch.softmax(model.eval()(dls.valid.after_batch((images, None))[0]), 1)
    assert torch.allclose(preds, expected, atol=1e-5)


@pytest.mark.slow
def test_same_seed_same_metrics_also_when_repeated_from_config_json(cli_run, tmp_path):
    first = cli_run[0] / "run"
    assert main(["train", "--config", str(first / "config.json"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert without_timing(read_rows(tmp_path / "again" / "metrics.csv")) == without_timing(
        read_rows(first / "metrics.csv"))
    other = normfree.train(**QUICK_OPTIONS, seed=1, quiet=True, save_model=False, save_plots=False,
                           out=tmp_path / "seed1")
    assert [r["train_loss"] for r in other.epochs] != [float(r["train_loss"]) for r in read_rows(first / "metrics.csv")]


@pytest.mark.slow
def test_an_existing_run_is_not_overwritten_without_asking(cli_run, capsys):
    out = cli_run[0] / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["train", *QUICK, "--out", str(out)])
    assert stopped.value.code == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_leaves_a_usable_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    result = normfree.train(**{**QUICK_OPTIONS, "epochs": 3}, precision="bf16", quiet=True, out=out,
                            cbs=[InterruptAt(epoch=1, batch=2)])
    assert result.interrupted
    assert not torch.is_autocast_enabled("cpu")  # the interrupted bf16 forward pass did not leave autocast on
    message = capsys.readouterr().err
    assert "Interrupted" in message and "model.safetensors" in message
    assert {"config.json", "metrics.csv", "model.safetensors", "result.json"} <= {p.name for p in out.iterdir()}
    assert "learner.pkl" not in {p.name for p in out.iterdir()}
    assert [row["epoch"] for row in read_rows(out / "metrics.csv")] == ["1"]
    assert json.loads((out / "result.json").read_text())["interrupted"] is True
    saved = load_file(out / "model.safetensors")
    for name, tensor in result.learner.model.state_dict().items():
        assert torch.equal(saved[name], tensor.cpu()), name
    again = normfree.train(**QUICK_OPTIONS, weights=str(out / "model.safetensors"), fine_tune=True, quiet=True,
                           save_model=False, save_plots=False, out=tmp_path / "from-checkpoint")
    assert again.final_accuracy == pytest.approx(validation_accuracy(again.learner))


class PredDtype(Callback):
    order = MixedPrecision.order - 5

    def after_pred(self):
        self.dtype = self.learn.pred.dtype


@pytest.mark.slow
@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_mixed_precision_runs_on_the_cpu(tmp_path, precision, dtype):
    probe, losses = PredDtype(), LossesSeen()
    result = normfree.train(**QUICK_OPTIONS, precision=precision, quiet=True, save_model=False, save_plots=False,
                            out=tmp_path / precision, cbs=[probe, losses])
    assert probe.dtype == dtype
    assert result.epochs[0]["train_loss"] == pytest.approx(smoothed_loss(losses.losses), rel=1e-5)
    assert result.final_accuracy == pytest.approx(validation_accuracy(result.learner))


class BatchDevice(Callback):
    def after_pred(self):
        self.devices = {self.learn.xb[0].device, self.learn.pred.device, next(self.learn.model.parameters()).device}


@pytest.mark.slow
def test_without_a_device_the_run_trains_on_fastais_default_device(tmp_path):
    """Not on the CPU by accident: with no device named, the data (and so the model) go to the GPU when there is
    one. (DataLoaders built with device=None stay on the CPU, and fastai then trains the model there too.)"""
    probe = BatchDevice()
    result = normfree.train(**QUICK_OPTIONS, quiet=True, save_model=False, save_plots=False, out=tmp_path / "run",
                            cbs=[probe])
    assert result.config.device is None
    assert result.learner.dls.device == default_device()
    assert probe.devices == {default_device()}


@pytest.mark.slow
def test_accum_k_steps_once_every_k_batches(tmp_path):
    result = normfree.train(**{**QUICK_OPTIONS, "bs": 8}, accum=4, quiet=True, save_model=False, save_plots=False,
                            out=tmp_path / "accum")
    # 64 training images in batches of 8 = 8 batches, stepping after every 4th: 2 optimizer steps
    assert len(result.learner.adaptive_clip.history) == 2


@pytest.mark.slow
def test_per_sample_agc_run(tmp_path):
    losses = LossesSeen()
    result = normfree.train(**QUICK_OPTIONS, per_sample=True, quiet=True, save_model=False, save_plots=False,
                            out=tmp_path / "per-sample", cbs=[losses])
    assert result.learner.adaptive_clip.per_sample
    assert result.epochs[0]["train_loss"] == pytest.approx(smoothed_loss(losses.losses), rel=1e-5)
    assert result.final_accuracy == pytest.approx(validation_accuracy(result.learner))


@pytest.mark.parametrize("argv, flag", [
    (["--bs", "0"], "--bs"),
    (["--accum", "0"], "--accum"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--data", "no-such-data"], "--data"),
    (["--data", "fashion-mnist:/no/such/folder"], "--data"),
    (["--arch", "nf_resnet_tine"], "--arch"),
    (["--agc", "-1"], "--agc"),
    (["--no-agc", "--per-sample"], "--per-sample"),
    (["--arch", "bn_resnet_tiny", "--per-sample"], "--per-sample"),
    (["--size", "4"], "--size"),
    (["--weights", "missing.safetensors"], "--weights"),
    (["--valid-pct", "1.5"], "--valid-pct"),
    (["--bs", "many"], "--bs"),
    (["--fp16", "--bf16"], "--bf16"),
    (["--opt", "lamb"], "--opt"),
    (["--steps", "0"], "--steps"),
    (["--steps", "5", "--fine-tune"], "--steps"),
    (["--classes", "3", "3"], "--classes"),
    (["--classes", "3", "12"], "--classes"),
    (["--classes", "-1", "2"], "--classes"),
    (["--per-class", "0"], "--per-class"),
    (["--holdout", "--per-class", "1", "--classes", "1", "2"], "--holdout"),
    (["--skipinit", "--arch", "bn_resnet_tiny"], "--skipinit"),
    (["--skipinit", "--arch", "test_nfnet"], "--skipinit"),
    (["--new-head"], "--new-head"),
    (["--size", "100000"], "--size"),  # an 8 TB batch
    (["--epochs", "1000000000000000000000"], "--epochs"),  # overflowed fastai's schedule, left a config.json
    (["--epochs", "1e21"], "--epochs"),
    (["--steps", "10000000000"], "--steps"),
    (["--freeze-epochs", "1000000000"], "--freeze-epochs"),
    (["--accum", "5"], "--accum"),  # 64 images in batches of 16: 4 batches, so no optimizer step
    (["--fine-tune"], "--fine-tune"),  # a frozen epoch on a random body
])
def test_bad_input_is_a_clear_error_with_status_2(tmp_path, monkeypatch, capsys, argv, flag):
    monkeypatch.chdir(tmp_path)
    base = [a for a in QUICK if a != "--quiet"]
    with pytest.raises(SystemExit) as stopped:
        main(["train", *base, *argv, "--out", "run"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"error: {flag}" in error or f"argument {flag}" in error
    assert "Traceback" not in error
    assert list(tmp_path.iterdir()) == []


def test_limit_on_an_image_folder_names_the_option(tmp_path, capsys):
    folder = write_digits_image_folder(tmp_path / "images", size=8, per_class=2)
    with pytest.raises(SystemExit):
        main(["train", "--data", str(folder), "--limit", "5", "--out", str(tmp_path / "run")])
    assert "error: --limit: works with in-memory data sets" in capsys.readouterr().err


def test_data_spec_parsing(tmp_path):
    folder = write_digits_image_folder(tmp_path / "images", size=8, per_class=1)
    (tmp_path / "a.npz").write_bytes(b"")
    (tmp_path / "a.csv").write_text("path,label\n")
    (tmp_path / "a.txt").write_text("")
    assert parse_data_spec("digits").kind == "digits"
    assert parse_data_spec(f"fashion-mnist:{tmp_path}") == normfree.data.registry.DataSpec("fashion-mnist", tmp_path)
    assert parse_data_spec(folder).kind == "image-folder"
    assert parse_data_spec(tmp_path / "a.npz").kind == "medmnist"
    assert parse_data_spec(tmp_path / "a.csv").kind == "csv"
    with pytest.raises(ValueError, match="not data normfree reads"):
        parse_data_spec(tmp_path / "a.txt")


def noise_dataloaders(bs: int = 64, size: int = 12, seed: int = 0, limit: int | None = None, device=None):
    """A data kind that normfree does not have: the digits under another name and default size."""
    return digits_dataloaders(bs, size, seed=seed, limit=limit, device=device)


def test_the_registry_is_the_one_list_of_data_kinds(tmp_path, monkeypatch):
    """A kind added to DATA_KINDS is parsed, accepted by TrainConfig (limit included) and listed in the help; a kind
    taken out is refused everywhere: no other module keeps its own list."""
    from normfree.app.cli import build_parser
    from normfree.data.registry import DATA_KINDS, DataKind, data_spec_help

    monkeypatch.setitem(DATA_KINDS, "noise", DataKind("noise", noise_dataloaders, "noise", "noise", named=True))
    monkeypatch.delitem(DATA_KINDS, "csv")
    (tmp_path / "a.csv").write_text("path,label\n")
    assert parse_data_spec("noise") == normfree.data.registry.DataSpec("noise")
    config = normfree.TrainConfig(data="noise", limit=3).resolved()
    assert (config.data, config.size, config.limit) == ("noise", 12, 3)
    with pytest.raises(normfree.ConfigError, match="data: .*a.csv: a .csv file is not data normfree reads"):
        normfree.TrainConfig(data=str(tmp_path / "a.csv"))
    expected = "digits, fashion-mnist[:DIR], a MedMNIST .npz file, an image folder, or noise"
    assert data_spec_help() == expected
    helps = {action.dest: " ".join(action.help.split()) for action in build_parser()[1]["train"]._actions}
    assert helps["data"] == expected
    assert helps["size"].endswith("(default: the data's own: digits 32, fashion-mnist 28, .npz native, folders 64, "
                                  "noise 12)")
    assert "(digits, fashion-mnist, .npz, noise; default: all)" in helps["limit"]
    with pytest.raises(normfree.ConfigError, match=r"^holdout: works with in-memory data sets \(digits, "
                                                   r"fashion-mnist, \.npz, noise\) only, not image-folder data"):
        normfree.TrainConfig(data=str(write_digits_image_folder(tmp_path / "f", size=8, per_class=1)),
                             holdout=True)


def test_no_module_of_the_app_or_data_spells_a_list_of_data_kinds():
    """Messages and help that list kinds build the list from the registry (docstrings may describe them)."""
    import ast
    import re

    kind = r"(digits|fashion-mnist|\.npz|\.csv)"
    listed = re.compile(rf"{kind}\S*( \d+)?,? (or |and )?\S*{kind}")  # "digits, fashion-mnist", "digits 32, ..."
    assert listed.search("in-memory data (digits, fashion-mnist, .npz)") and listed.search("digits 32, .npz native")
    assert not listed.search("--data digits --arch nf_resnet_tiny ... --data fashion-mnist")
    package = Path(normfree.__file__).parent
    for path in sorted([*(package / "app").glob("*.py"), *(package / "data").glob("*.py")]):
        if path.name == "registry.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert not listed.search(node.value), (path.name, node.lineno, node.value)


@pytest.mark.parametrize("option, value, message", [
    ("bs", 0, "bs: must be a whole number >= 1, got 0"),
    ("bs", 2.5, "bs: must be a whole number >= 1, got 2.5"),
    ("valid_pct", 1.0, "valid_pct: must be between 0 and 1 (exclusive), got 1.0"),
    ("limit", 0, "limit: must be a whole number >= 1, got 0"),
])
def test_a_bad_value_is_refused_by_one_check_from_the_config_and_the_builder(option, value, message):
    with pytest.raises(normfree.ConfigError) as from_config:
        normfree.TrainConfig(**{option: value})
    with pytest.raises(normfree.ConfigError) as from_builder:
        digits_dataloaders(**{option: value})
    assert str(from_config.value) == str(from_builder.value) == message
    assert from_config.value.option == from_builder.value.option == option


def test_the_clip_rate_figure_is_made_without_pyplot():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from normfree.agc.clip import ClipStats
    from normfree.agc.history import ClipHistory

    history = ClipHistory([["stem.weight", "stem.bias"], ["head.weight"]])
    for clipped in ([1, 0, 2], [3, 1, 0]):  # units clipped per parameter, of 4, 2 and 2 units
        history.record([ClipStats(torch.tensor(clipped[:2]), torch.zeros(2), torch.tensor([4, 2])),
                        ClipStats(torch.tensor(clipped[2:]), torch.zeros(1), torch.tensor([2]))])
    open_before = plt.get_fignums()
    figure = history.plot()
    assert type(figure) is Figure and plt.get_fignums() == open_before
    top, heat, _ = figure.axes
    lines = {line.get_label(): list(line.get_ydata()) for line in top.get_lines()}
    assert lines["all"] == pytest.approx([3 / 8, 4 / 8]) and lines["group 1"] == pytest.approx([1.0, 0.0])
    assert heat.images[0].get_array().ravel().tolist() == pytest.approx([1 / 6, 4 / 6, 1.0, 0.0])  # stem, head


@pytest.mark.slow
def test_help_shows_every_default_through_a_real_subprocess():
    done = subprocess.run([sys.executable, "-m", "normfree", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    text = " ".join(done.stdout.split())
    for expected in ("--bs BS batch size of one forward/backward pass (default: 64)", "(default: nf_resnet_tiny)",
                     "(default: digits)", "before training (default: 0.04)",
                     "--no-agc train without AGC (default: with AGC)",
                     "(default: float32)", "(default: 8)", "one-cycle schedule (default: 0.01)", "(default: adam)",
                     "(default: normfree-run)"):
        assert expected in text, expected
    described = done.stdout.split("options:")[1].split("examples:")[0]
    blocks = described.split("\n  -")[1:]  # one per option
    actions = [a for a in build_parser()[1]["train"]._actions if a.help != argparse.SUPPRESS]
    assert len(blocks) == len(actions)  # --help and each option of the train parser
    for block in blocks:
        assert "default" in block or block.startswith("h, --help"), block


@pytest.mark.bad_input
@pytest.mark.parametrize("agc", [np.float32(0.02), torch.tensor(0.02)], ids=["numpy-float32", "0-d-tensor"])
def test_a_lambda_given_as_numpy_or_tensor_is_stored_as_the_float_it_holds(agc, tmp_path):
    config = normfree.TrainConfig(agc=agc, out=str(tmp_path))
    assert type(config.agc) is float and config.agc == pytest.approx(0.02, rel=1e-6)
    assert json.loads(json.dumps(config.to_dict()))["agc"] == config.agc  # config.json is written as JSON


@pytest.mark.bad_input
def test_batch_of_one_through_a_one_by_one_batchnorm_is_refused_naming_bs(tmp_path, capsys):
    # torch stops such a step with "Expected more than 1 value per channel when training" and a traceback
    with pytest.raises(SystemExit) as stop:
        main(["train", "--arch", "resnet18", "--bs", "1", "--size", "16", "--limit", "20", "--epochs", "1",
              "--out", str(tmp_path / "run")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--bs: 1 cannot train resnet18: its BatchNorm layer3.0.bn1 sees one value per channel at batch 1" in err
    assert "--to-normfree" in err and "Traceback" not in err
