"""`normfree compare --transfer`: the runs on disk, target runs that start from the pretrained weights, the
target data, resuming, the report's statistics and bad input."""
import json
import statistics

import numpy as np
import pytest
import torch
from helpers import write_fashion
from safetensors.torch import load_file
from torch import nn

import normfree
from normfree.app.cli import build_parser, main
from normfree.app.train import build_dataloaders
from normfree.data.loaders import read_idx

SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
MODELS = {"bn": "BatchNorm", "nf-agc": "NF + AGC"}
MODES = ("fine-tune", "linear-probe", "scratch")
PER_CLASS, BATCH_SIZES, SEEDS = (2, 4), (4, 8), (0, 1)
# 2 models x 2 seeds pretrained, then 3 modes x 2 sizes x 2 batch sizes x 2 models x 2 seeds = 4 + 48 tiny runs.
GRID = ["--methods", *MODELS, "--per-class", *map(str, PER_CLASS), "--batch-sizes", *map(str, BATCH_SIZES),
        "--seeds", *map(str, SEEDS), "--source-epochs", "1", "--source-bs", "8", "--epochs", "2", "--freeze-epochs",
        "1", "--size", "8"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: a second thread only adds synchronisation, which costs seconds per epoch
    when the machine's other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """Tiny Fashion-MNIST IDX files: 6 training and 3 test images of each of the 10 classes."""
    return write_fashion(tmp_path_factory.mktemp("fashion") / "fm", n_train=60, n_valid=30)


@pytest.fixture(scope="module")
def grid(tmp_path_factory, fashion):
    out = tmp_path_factory.mktemp("transfer") / "out"
    argv = ["compare", "--transfer", "--data", f"fashion-mnist:{fashion}", *GRID, "--out", str(out)]
    return out, argv, main(argv)


def results(out):
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))}


def final(result):
    return result["epochs"][-1]["accuracy"]


def test_the_runs_on_disk_are_the_grid(grid):
    out, _, status = grid
    assert status == 0
    runs = results(out)
    assert set(runs) == ({f"pretrain-{m}-seed{s}" for m in MODELS for s in SEEDS}
                         | {f"{mode}-{m}-n{n}-bs{bs}-seed{s}" for mode in MODES for m in MODELS for n in PER_CLASS
                            for bs in BATCH_SIZES for s in SEEDS})
    for model in MODELS:
        model_settings = {"arch": "bn_resnet_tiny" if model == "bn" else "nf_resnet_tiny",
                          "agc": normfree.app.config.DEFAULT_AGC if model == "nf-agc" else None}
        for seed in SEEDS:
            pretrained = (out / "runs" / f"pretrain-{model}-seed{seed}").resolve()
            config = runs[pretrained.name]["config"]
            assert config == {**config, **model_settings, "classes": list(SOURCE), "per_class": None, "bs": 8,
                              "seed": seed, "weights": None}
            assert (pretrained / "model.safetensors").is_file()
            for mode in MODES:
                for n in PER_CLASS:
                    for bs in BATCH_SIZES:
                        run = runs[f"{mode}-{model}-n{n}-bs{bs}-seed{seed}"]
                        config = run["config"]
                        assert config == {**config, **model_settings, "classes": list(TARGET), "per_class": n, "bs": bs,
                                          "seed": seed, "fine_tune": mode == "fine-tune"}
                        if mode == "scratch":
                            assert config["weights"] is None
                        else:
                            assert config["weights"] == str(pretrained / "model.safetensors") and config["new_head"]
                        if mode == "fine-tune":  # 1 epoch frozen + 1 with everything: the budget of the others
                            assert config["freeze_epochs"] == 1 and config["epochs"] == 1
                        assert len(run["epochs"]) == 2
    assert {p.name for p in out.iterdir()} == {"runs", "transfer.json", "report.md", "report.html", "runs.csv",
                                               "summary.csv", "accuracy_vs_images_per_class.png"}


def test_a_linear_probe_trains_the_new_classifier_on_the_pretrained_body(grid, tmp_path):
    out, _, _ = grid
    for model in MODELS:
        probe = out / "runs" / f"linear-probe-{model}-n4-bs4-seed1"
        config = normfree.TrainConfig.load(probe)
        again = normfree.train(config, out=str(tmp_path / model), quiet=True, save_plots=False)  # with its weights
        assert again.final_accuracy == final(json.loads((probe / "result.json").read_text()))  # the same run
        pretrained, probed = load_file(config.weights), load_file(again.files["weights"])
        changed = {name for name in pretrained if not torch.equal(pretrained[name], probed[name])}
        batchnorm = {f"{name}.{key}" for name, module in again.learner.model.named_modules()
                     if isinstance(module, nn.modules.batchnorm._BatchNorm) for key in module.state_dict()}
        classifier = {"head.fc.weight", "head.fc.bias"}
        assert set(pretrained) == set(probed) and classifier <= changed <= classifier | batchnorm
        # fastai's freeze keeps BatchNorm trainable and its running statistics adapt; the NF body is as pretrained
        assert bool(changed & batchnorm) == (model == "bn")


def test_the_target_data_is_per_class_images_of_the_target_classes_only(grid, fashion):
    out, _, _ = grid
    originals = {split: (torch.from_numpy(read_idx(fashion / f"{split}-images-idx3-ubyte.gz")),
                         read_idx(fashion / f"{split}-labels-idx1-ubyte.gz")) for split in ("train", "t10k")}
    for name, n, classes in (("fine-tune-nf-agc-n4-bs8-seed1", 4, TARGET), ("scratch-bn-n2-bs4-seed0", 2, TARGET),
                             ("pretrain-bn-seed0", 6, SOURCE)):
        dls = build_dataloaders(normfree.TrainConfig.load(out / "runs" / name))
        for ds, split, count in ((dls.train_ds, "train", n), (dls.valid_ds, "t10k", 3)):
            images, labels = ds.tensors
            assert np.bincount(labels.numpy()).tolist() == [count] * len(classes), (name, split)
            all_images, all_labels = originals[split]
            for image, label in zip(images, labels):
                same = [i for i in range(len(all_images)) if torch.equal(all_images[i], image[0])]
                assert [all_labels[i] for i in same] == [classes[label]]


def test_report_rows_are_mean_and_std_of_the_runs_on_disk(grid):
    out, _, _ = grid
    runs = results(out)
    report = (out / "report.md").read_text()
    columns = [f"{n} per class, bs {bs}" for n in PER_CLASS for bs in BATCH_SIZES]
    assert f"| model | mode | {' | '.join(columns)} |" in report
    for model, label in MODELS.items():
        for mode in MODES:
            cells = []
            for n in PER_CLASS:
                for bs in BATCH_SIZES:
                    finals = [100 * final(runs[f"{mode}-{model}-n{n}-bs{bs}-seed{s}"]) for s in SEEDS]
                    cells.append(f"{statistics.mean(finals):.1f} ± {statistics.stdev(finals):.1f}")
            assert f"| {label} | {mode} | {' | '.join(cells)} |" in report
        source = [100 * final(runs[f"pretrain-{model}-seed{s}"]) for s in SEEDS]
        assert f"| {label} | {statistics.mean(source):.1f} ± {statistics.stdev(source):.1f} |" in report
    page = (out / "report.html").read_text()
    assert 'src="data:image/png;base64,' in page and "train_bn=True" in page
    assert "normfree compare --transfer --data fashion-mnist:" in page


def test_resume_reuses_the_finished_runs(grid, capsys):
    out, argv, _ = grid
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    redo = out / "runs" / "linear-probe-nf-agc-n2-bs8-seed1" / "result.json"
    redo.unlink()  # as if Ctrl-C had stopped the grid there
    capsys.readouterr()
    assert main(argv) == 0
    after = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    assert {p for p in after if after[p] != before.get(p)} == {redo}
    assert capsys.readouterr().out.count("(done before)") == len(before) - 1


def test_command_line_round_trips():
    config = normfree.TransferConfig(data="digits", arch="bn_resnet_small", methods=("nf", "bn"), modes=("scratch",),
                                     source_classes=(1, 2), target_classes=(3, 4, 5), per_class=(7,), batch_sizes=(4,),
                                     seeds=(3,), source_epochs=2, source_bs=16, source_lr=0.02, epochs=4,
                                     freeze_epochs=3, lr=0.05, opt="sgd", agc=0.02, size=12, limit=300, valid_pct=0.3,
                                     precision="bf16", out="elsewhere")
    _, commands = build_parser()
    args = vars(commands["compare --transfer"].parse_args(config.command().split()[2:]))
    args = {k: v for k, v in args.items() if k not in ("command", "quiet", "overwrite")}
    assert normfree.TransferConfig(**args) == config


@pytest.mark.parametrize("argv, flag", [
    (["--target-classes", "4", "5", "6"], "--target-classes"),  # 4 is a source class too
    (["--target-classes", "5", "10"], "--target-classes"),  # Fashion-MNIST has labels 0..9
    (["--source-classes", "3"], "--source-classes"),
    (["--per-class", "0"], "--per-class"),
    (["--per-class", "2", "--batch-sizes", "16"], "--batch-sizes"),  # 10 images: not one batch of 16
    (["--epochs", "2", "--freeze-epochs", "2"], "--epochs"),
    (["--modes", "finetune"], "--modes"),
    (["--arch", "resnet18"], "--arch"),
])
def test_bad_input_exits_2_naming_the_option(tmp_path, monkeypatch, capsys, fashion, argv, flag):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["compare", "--transfer", "--data", f"fashion-mnist:{fashion}", *argv])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"error: {flag}" in error or f"argument {flag}" in error
    assert "Traceback" not in error and list(tmp_path.iterdir()) == []


@pytest.mark.bad_input
def test_per_class_beyond_the_data_is_labelled_with_the_real_count(tmp_path, fashion):
    out = tmp_path / "out"
    # 6 training images in each target class
    targets = "Sandal \\(6\\), Shirt \\(6\\), Sneaker \\(6\\), Bag \\(6\\), Ankle boot \\(6\\)"
    with pytest.warns(UserWarning, match=rf"per_class 10 is more than the training images of target class\(es\) "
                                         rf"{targets}: those train on all of theirs, so the runs at per_class 10 have "
                                         rf"6 \(asked 10\) images per class"):
        result = normfree.compare_transfer(data=f"fashion-mnist:{fashion}", methods=("nf",), modes=("scratch",),
                                           per_class=(2, 10), batch_sizes=(4,), seeds=(0,), epochs=1, size=8,
                                           out=str(out), quiet=True)
    report = (out / "report.md").read_text()
    assert "| model | mode | 2 per class, bs 4 | 6 (asked 10) per class, bs 4 |" in report
    assert "at most 2 or 6 (asked 10) training images per class" in report
    assert "10 per class" not in report and "6 (asked 10) per class" in result.table
    dls = build_dataloaders(normfree.TrainConfig.load(out / "runs" / "scratch-nf-n10-bs4-seed0"))
    assert np.bincount(dls.train_ds.tensors[1].numpy()).tolist() == [6] * len(TARGET)  # what the label says
