"""`normfree spp`: the files it writes, trained weights, a real batch, and one-line errors for bad input."""
import pytest
import timm
import torch

import normfree
from helpers import read_rows
from normfree.app.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--arch", "nf_resnet_tiny", "bn_resnet_tiny", "--size", "16", "--bs", "4", "--quiet"]


@pytest.mark.slow
def test_writes_the_plot_and_one_csv_row_per_model_and_block(tmp_path, capsys):
    out = tmp_path / "spp"
    assert main(["spp", *TINY[:-1], "--out", str(out)]) == 0
    assert (out / "spp.png").read_bytes().startswith(PNG)
    rows = read_rows(out / "spp.csv")
    assert list(rows[0]) == ["model", "block", "name", "transition", "squared_mean", "variance", "residual_variance",
                             "arch", "weights", "input"]
    assert [(r["model"], r["block"], r["name"]) for r in rows] == [
        (model, str(i), f"stages.{i}.0") for model in ("nf_resnet_tiny", "bn_resnet_tiny") for i in range(3)]
    assert all(r["transition"] == "True" and r["input"] == "N(0, 1) noise" for r in rows)
    # the same numbers as the Python call with the same seed
    torch.manual_seed(0)
    expected = normfree.signal_propagation(normfree.build_model("nf_resnet_tiny", 10, 3), input_shape=(4, 3, 16, 16))
    assert [float(r["variance"]) for r in rows[:3]] == pytest.approx([row.variance for row in expected.rows])
    printed = capsys.readouterr().out
    assert "nf_resnet_tiny" in printed and "last block" in printed and "spp.csv" in printed
    assert sorted(p.name for p in out.iterdir()) == ["spp.csv", "spp.png"]  # no temporary files left


@pytest.mark.slow
def test_trained_weights_and_a_real_batch(tmp_path):
    torch.manual_seed(1)
    trained = timm.create_model("nf_resnet_tiny", in_chans=1, num_classes=10)
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(3.0)
    weights = normfree.save_weights(trained, tmp_path / "w.safetensors", "nf_resnet_tiny")
    out = tmp_path / "out"
    assert main(["spp", *TINY, "--weights", str(weights), "none", "--data", "digits", "--out", str(out)]) == 0
    rows = read_rows(out / "spp.csv")
    assert {r["model"] for r in rows} == {"nf_resnet_tiny (w.safetensors)", "bn_resnet_tiny"}
    assert {r["input"] for r in rows} == {"batch of digits"}
    assert rows[0]["weights"] == str(weights) and rows[3]["weights"] == ""


@pytest.mark.parametrize("argv, option", [
    (["--arch", "nf_resnet_tinyy"], "--arch"),
    (["--arch", "nf_resnet_tiny", "--weights", "a.safetensors", "b.safetensors"], "--weights"),
    (["--arch", "nf_resnet_tiny", "--weights", "missing.safetensors"], "--weights"),
    (["--arch", "nf_resnet_tiny", "--size", "0"], "--size"),
    (["--arch", "nf_resnet_tiny", "--data", "no-such-data"], "--data"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, option):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        main(["spp", *argv, "--out", str(out), "--quiet"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"normfree spp: error: {option}"), error
    assert not out.exists()  # nothing written, no folder left


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as stopped:
        main(["spp", *TINY, "--out", str(blocker)])
    assert stopped.value.code == 2
    assert "error: --out" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_help_lists_spp(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "spp" in capsys.readouterr().out
