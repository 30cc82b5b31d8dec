"""`normfree compare --transfer`: the runs on disk, target runs that start from the pretrained weights, the
target data, resuming, the report's statistics and bad input; with a BatchNorm arch of one's own: frozen BatchNorm,
the folded and the converted model, and the lr chosen per target setting on a hold-out."""
import json
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from fastai.callback.core import Callback
from safetensors.torch import load_file
from torch import nn

import normfree
from helpers import write_fashion
from normfree.app.cli import build_parser, main
from normfree.app.compare import sweep_choice
from normfree.app.train import build_dataloaders
from normfree.app.transfer import TransferConfig, compare_transfer
from normfree.data.loaders import read_idx

SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
MODELS = {"bn": "BatchNorm", "nf-agc": "NF + AGC"}
MODES = ("fine-tune", "linear-probe", "scratch")
PER_CLASS, BATCH_SIZES, SEEDS = (2, 4), (4, 8), (0, 1)
# 2 models x 2 seeds pretrained, then 3 modes x 2 sizes x 2 batch sizes x 2 models x 2 seeds = 4 + 48 tiny runs.
GRID = ["--methods", *MODELS, "--per-class", *map(str, PER_CLASS), "--batch-sizes", *map(str, BATCH_SIZES),
        "--seeds", *map(str, SEEDS), "--source-epochs", "1", "--source-bs", "8", "--epochs", "2", "--freeze-epochs",
        "1", "--size", "8", "--lrs", "3e-3"]


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert "normfree transfer --data fashion-mnist:" in page


@pytest.mark.slow
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
    config = TransferConfig(data="digits", arch="bn_resnet_small", methods=("nf", "bn"), modes=("scratch",),
                                     source_classes=(1, 2), target_classes=(3, 4, 5), per_class=(7,), batch_sizes=(4,),
                                     seeds=(3,), source_epochs=2, source_bs=16, source_lr=0.02, epochs=4,
                                     freeze_epochs=3, lrs=(0.05, 0.1), opt="sgd", agc=0.02, size=12, limit=300,
                                     valid_pct=0.3, precision="bf16", out="elsewhere")
    _, commands = build_parser()
    args = vars(commands["transfer"].parse_args(config.command().split()[2:]))
    args = {k: v for k, v in args.items() if k not in ("command", "quiet", "overwrite")}
    assert TransferConfig(**args) == config


@pytest.mark.parametrize("argv, flag", [
    (["--target-classes", "4", "5", "6"], "--target-classes"),  # 4 is a source class too
    (["--target-classes", "5", "10"], "--target-classes"),  # Fashion-MNIST has labels 0..9
    (["--source-classes", "3"], "--source-classes"),
    (["--per-class", "0"], "--per-class"),
    (["--per-class", "2", "--batch-sizes", "16"], "--batch-sizes"),  # 10 images: not one batch of 16
    (["--epochs", "2", "--freeze-epochs", "2"], "--epochs"),
    (["--modes", "finetune"], "--modes"),
    (["--arch", "nf_resnet26"], "--arch"),  # normalizer-free, and no BatchNorm twin
])
def test_bad_input_exits_2_naming_the_option(tmp_path, monkeypatch, capsys, fashion, argv, flag):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["compare", "--transfer", "--data", f"fashion-mnist:{fashion}", *argv])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"error: {flag}" in error or f"argument {flag}" in error
    assert "Traceback" not in error and list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.bad_input
def test_per_class_beyond_the_data_is_labelled_with_the_real_count(tmp_path, fashion):
    out = tmp_path / "out"
    # 6 training images in each target class
    targets = "Sandal \\(6\\), Shirt \\(6\\), Sneaker \\(6\\), Bag \\(6\\), Ankle boot \\(6\\)"
    with pytest.warns(UserWarning, match=rf"per_class 10 is more than the training images of target class\(es\) "
                                         rf"{targets}: those train on all of theirs, so the runs at per_class 10 have "
                                         rf"6 \(asked 10\) images per class"):
        result = compare_transfer(data=f"fashion-mnist:{fashion}", methods=("nf",), modes=("scratch",),
                                           per_class=(2, 10), batch_sizes=(4,), seeds=(0,), epochs=1, size=8,
                                           out=str(out), quiet=True)
    report = (out / "report.md").read_text()
    assert "| model | mode | 2 per class, bs 4 | 6 (asked 10) per class, bs 4 |" in report
    assert "at most 2 or 6 (asked 10) training images per class" in report
    assert "10 per class" not in report and "6 (asked 10) per class" in result.table
    dls = build_dataloaders(normfree.TrainConfig.load(out / "runs" / "scratch-nf-n10-bs4-seed0"))
    assert np.bincount(dls.train_ds.tensors[1].numpy()).tolist() == [6] * len(TARGET)  # what the label says


# A BatchNorm arch of one's own (timm's test_resnet: 0.4M parameters, BatchNorm ResNet blocks that to_normfree folds
# and converts), with the four methods of issue 24 and two lrs to choose from. 2 pretrainings, then 7 (method, mode)
# settings: 14 hold-out runs and 7 target runs.
OWN = dict(data="digits", arch="test_resnet", methods=("bn", "bn-frozen", "folded-agc", "converted-agc"),
           modes=("fine-tune", "scratch"), source_classes=(0, 1, 2), target_classes=(3, 4, 5), per_class=(4,),
           batch_sizes=(4,), seeds=(0,), lrs=(1e-3, 1e-2), source_epochs=1, source_bs=16, epochs=2, freeze_epochs=1,
           size=8, limit=150)
OWN_SETTINGS = [("fine-tune", m) for m in OWN["methods"]] + [("scratch", m) for m in ("bn", "folded-agc",
                                                                                      "converted-agc")]


@pytest.fixture(scope="module")
def own_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("own") / "out"
    argv = ["compare", "--transfer", "--out", str(out), "--quiet"]
    for option, value in OWN.items():
        argv += [f"--{option.replace('_', '-')}", *map(str, value if isinstance(value, tuple) else (value,))]
    assert main(argv) == 0
    return out


@pytest.mark.slow
def test_own_arch_grid_shares_the_batchnorm_pretraining_and_trains_each_method_its_way(own_grid):
    runs = {p.parent.name: json.loads(p.read_text())["config"] for p in (own_grid / "runs").glob("*/result.json")}
    assert set(runs) == {"pretrain-bn-seed0", "pretrain-converted-agc-seed0",
                         *(f"{mode}-{method}-n4-bs4-seed0" for mode, method in OWN_SETTINGS)}  # no scratch-bn-frozen
    bn_weights = str((own_grid / "runs" / "pretrain-bn-seed0" / "model.safetensors").resolve())
    nf_weights = str((own_grid / "runs" / "pretrain-converted-agc-seed0" / "model.safetensors").resolve())
    agc = normfree.app.config.DEFAULT_AGC
    expected = {  # method: (to_normfree, agc, freeze_batchnorm, the weights of its fine-tune)
        "bn": (None, None, False, bn_weights), "bn-frozen": (None, None, True, bn_weights),
        "folded-agc": ("fold", agc, False, bn_weights), "converted-agc": ("nf", agc, False, nf_weights),
    }
    assert {k: runs["pretrain-bn-seed0"][k] for k in ("to_normfree", "agc", "freeze_batchnorm")} == \
        {"to_normfree": None, "agc": None, "freeze_batchnorm": False}
    assert {k: runs["pretrain-converted-agc-seed0"][k] for k in ("to_normfree", "agc", "classes")} == \
        {"to_normfree": "nf", "agc": agc, "classes": [0, 1, 2]}
    for mode, method in OWN_SETTINGS:
        config = runs[f"{mode}-{method}-n4-bs4-seed0"]
        to_normfree, clipping, frozen, weights = expected[method]
        assert (config["arch"], config["to_normfree"], config["agc"], config["freeze_batchnorm"]) == \
            ("test_resnet", to_normfree, clipping, frozen)
        assert config["weights"] == (weights if mode == "fine-tune" else None)
        assert (config["classes"], config["per_class"], config["holdout"]) == ([3, 4, 5], 4, False)
    report = (own_grid / "report.md").read_text()
    for label in ("BatchNorm", "BatchNorm frozen", "BatchNorm folded + AGC", "converted to NF + AGC"):
        assert f"| {label} | fine-tune |" in report
    assert "| BatchNorm frozen | scratch |" not in report and "| BatchNorm folded + AGC | scratch |" in report
    source = report.split("## Source accuracy")[1].split("##")[0]
    assert source.count("\n| BatchNorm |") == 1 and source.count("\n| converted to NF + AGC |") == 1
    assert "| BatchNorm frozen |" not in source and "BatchNorm's serves BatchNorm, BatchNorm frozen, BatchNorm " \
                                                   "folded + AGC" in report
    assert "## Peak learning rate of the target runs, chosen on the hold-out" in report


@pytest.mark.slow
def test_every_target_run_trains_at_the_lr_with_the_best_holdout_accuracy(own_grid):
    report = (own_grid / "report.md").read_text()
    chosen_table = report.split("## Peak learning rate")[1].split("##")[0]
    for mode, method in OWN_SETTINGS:
        holdout = {}
        for lr in OWN["lrs"]:
            folder = own_grid / "sweep" / f"{mode}-{method}-n4-bs4-lr{lr:g}"
            run = json.loads((folder / "result.json").read_text())
            assert (run["config"]["holdout"], run["config"]["seed"], run["config"]["lr"]) == (True, 0, lr)
            last = run["epochs"][-1]
            holdout[lr] = (last["accuracy"], -last["valid_loss"], -lr)  # best accuracy, then lowest loss, then lr
        best = max(holdout, key=holdout.get)
        target = json.loads((own_grid / "runs" / f"{mode}-{method}-n4-bs4-seed0" / "result.json").read_text())
        assert target["config"]["lr"] == best, (mode, method, holdout)
        label = normfree.app.transfer.TRANSFER_METHODS[method]
        assert f"| {label} | {mode} | {best:g} |" in chosen_table


def test_sweep_choice_takes_the_best_holdout_accuracy_of_each_setting():
    def run(accuracy, loss):
        return SimpleNamespace(final_accuracy=accuracy, final_valid_loss=loss)

    # hand-made hold-out results of two target settings at three lrs
    results = {("bn", "fine-tune", 10, 4, 1e-4): run(0.50, 1.0), ("bn", "fine-tune", 10, 4, 1e-3): run(0.70, 0.9),
               ("bn", "fine-tune", 10, 4, 1e-2): run(0.60, 0.5), ("nf-agc", "scratch", 10, 4, 1e-4): run(0.40, 1.2),
               ("nf-agc", "scratch", 10, 4, 1e-3): run(0.40, 1.1), ("nf-agc", "scratch", 10, 4, 1e-2): run(0.45, 1.9)}
    points, chosen = sweep_choice(list(results), list(results.values()))
    assert chosen == {("bn", "fine-tune", 10, 4): 1e-3, ("nf-agc", "scratch", 10, 4): 1e-2}
    assert [(p.setting, p.lr, p.accuracy) for p in points] == [(k[:-1], k[-1], r.final_accuracy)
                                                               for k, r in results.items()]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_holdout_is_drawn_from_the_per_class_training_images(seed):
    settings = dict(data="digits", size=8, limit=300, classes=(3, 4, 5), per_class=10, seed=seed)
    drawn = build_dataloaders(normfree.TrainConfig(**settings)).train_ds.tensors
    split = build_dataloaders(normfree.TrainConfig(**settings, holdout=True))

    def items(tensors):
        return sorted((tuple(image.flatten().tolist()), int(label)) for image, label in zip(*tensors))

    trained, held_out = items(split.train_ds.tensors), items(split.valid_ds.tensors)
    assert len(held_out) == round(0.2 * 30) and sorted(trained + held_out) == items(drawn)


class _FirstBatch(Callback):
    """Records, at the first batch of the first fit, the model's state, whether it holds BatchNorm, the batch and
    the model's pooled features (pre-logits) on it."""
    order = 100

    def __init__(self):
        self.seen = None

    def before_batch(self):
        if self.seen is None:
            model, images = self.learn.model, self.learn.xb[0].detach().clone()
            with torch.no_grad():
                features = model.forward_head(model.forward_features(images), pre_logits=True)
            self.seen = SimpleNamespace(images=images, features=features, batchnorm=any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
                state={k: v.clone() for k, v in model.state_dict().items()})


@pytest.mark.slow
def test_folded_agc_starts_as_the_pretrained_batchnorm_model_in_eval_mode(own_grid, tmp_path):
    config = normfree.TrainConfig.load(own_grid / "runs" / "fine-tune-folded-agc-n4-bs4-seed0")
    first = _FirstBatch()
    normfree.train(config, out=str(tmp_path / "folded"), quiet=True, save_plots=False, cbs=[first])
    pretrained = load_file(config.weights)
    reference = timm.create_model("test_resnet", num_classes=3, in_chans=1)  # the source model, without normfree
    reference.load_state_dict(pretrained)
    features = {}
    for mode in ("eval", "train"):
        getattr(reference, mode)()
        with torch.no_grad():
            features[mode] = reference.forward_head(reference.forward_features(first.seen.images), pre_logits=True)
    assert not first.seen.batchnorm
    assert torch.allclose(first.seen.features, features["eval"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first.seen.features, features["train"], rtol=1e-2, atol=1e-2)  # the check can fail


@pytest.mark.slow
def test_converted_agc_starts_from_its_own_pretraining(own_grid, tmp_path):
    config = normfree.TrainConfig.load(own_grid / "runs" / "fine-tune-converted-agc-n4-bs4-seed0")
    first = _FirstBatch()
    normfree.train(config, out=str(tmp_path / "converted"), quiet=True, save_plots=False, cbs=[first])
    pretrained = load_file(config.weights)
    assert set(pretrained) == set(first.seen.state) and not first.seen.batchnorm
    assert [k for k in pretrained if not torch.equal(pretrained[k], first.seen.state[k])] == ["fc.bias", "fc.weight"]


@pytest.mark.slow
def test_frozen_batchnorm_stays_bit_identical_through_fine_tune(own_grid, tmp_path):
    weights = own_grid / "runs" / "pretrain-bn-seed0" / "model.safetensors"
    pretrained = load_file(weights)
    settings = dict(data="digits", arch="test_resnet", weights=str(weights), new_head=True, fine_tune=True, epochs=1,
                    freeze_epochs=1, agc=None, classes=(3, 4, 5), per_class=4, bs=4, lr=1e-2, size=8, limit=150,
                    quiet=True, save_plots=False)
    trained = {}
    for frozen in (True, False):
        result = normfree.train(**settings, freeze_batchnorm=frozen, out=str(tmp_path / str(frozen)))
        model = result.learner.model
        batchnorm = {f"{name}.{key}" for name, m in model.named_modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm) for key in m.state_dict()}
        convolutions = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        trained[frozen] = {k: v for k, v in model.state_dict().items()}
    assert batchnorm and convolutions
    assert all(torch.equal(trained[True][k], pretrained[k]) for k in batchnorm)  # statistics, weight, bias
    assert all(not torch.equal(trained[True][k], pretrained[k]) for k in convolutions)
    # without the option, fastai's fine_tune changes them (the comparison above can fail)
    assert not any(torch.equal(trained[False][k], pretrained[k]) for k in batchnorm if "running" in k)


@pytest.mark.bad_input
@pytest.mark.parametrize("argv, flag", [
    (["--methods", "folded-agc"], "--methods"),  # a small ResNet's BatchNorm twin cannot be folded
    (["--methods", "bn", "converted-agc"], "--methods"),  # ... nor converted
    (["--arch", "resnet18", "--methods", "bn", "nf-agc"], "--methods"),  # resnet18 has no NF twin
    (["--arch", "nf_resnet26", "--methods", "bn-frozen"], "--arch"),  # no BatchNorm model at all
    (["--methods", "bn", "bn-frozen", "--modes", "scratch"], "--modes"),  # frozen BatchNorm starts pretrained
    (["--lrs", "1e-3", "1e-3"], "--lrs"),
    (["--lrs"], "--lrs"),
    (["--lrs", "1e-3", "0"], "--lrs"),
    (["--per-class", "1", "--target-classes", "5", "6"], "--valid-pct"),  # 2 images: none to hold out
])
def test_bad_transfer_settings_exit_2_naming_the_option(tmp_path, monkeypatch, capsys, fashion, argv, flag):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["compare", "--transfer", "--data", f"fashion-mnist:{fashion}", *argv])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"error: {flag}" in error or f"argument {flag}" in error, error
    assert "invalid choice" not in error  # every method is one normfree knows: the check refuses the combination
    assert "Traceback" not in error and list(tmp_path.iterdir()) == []


@pytest.mark.bad_input
@pytest.mark.parametrize("options", [dict(lrs=()), dict(lrs=[3e-3, 3e-3])])
def test_transfer_lrs_must_be_distinct_values(options):
    with pytest.raises(normfree.ConfigError, match=r"^lrs: must be one or more distinct learning rates"):
        TransferConfig(**options)


@pytest.mark.bad_input
@pytest.mark.parametrize("argv", [["--arch", "nf_resnet_tiny"], ["--arch", "resnet18", "--to-normfree", "fold"]])
def test_freeze_batchnorm_without_batchnorm_exits_2(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as stopped:
        main(["train", *argv, "--freeze-batchnorm", "--out", str(tmp_path / "run")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "error: --freeze-batchnorm: " in error and "has no BatchNorm layer to freeze" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.bad_input
def test_converted_weights_without_their_conversion_exit_2(own_grid, tmp_path, capsys):
    weights = own_grid / "runs" / "pretrain-converted-agc-seed0" / "model.safetensors"
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--data", "digits", "--arch", "test_resnet", "--weights", str(weights), "--size", "8",
              "--limit", "50", "--out", str(tmp_path / "run")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "error: --weights: " in error and "converted by to_normfree with {'mode': 'nf'}" in error
