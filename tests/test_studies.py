"""The committed studies' scripts run end to end at tiny settings (their real settings take CPU hours)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_recipe_ablation_writes_its_table(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "docs/convert/recipe_ablation.py"), "--tiny", "--out", str(tmp_path)],
                   check=True, capture_output=True, cwd=ROOT)
    table = (tmp_path / "ablation.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| torchvision:resnet18 |")]
    assert [row.split(" | ")[1] for row in rows] == ["BatchNorm", "converted + AGC, papers", "converted + AGC, open"]
    for row in rows:
        accuracy = float(row.split(" | ")[2].split(" ± ")[0])
        assert 0 <= accuracy <= 100
    assert (tmp_path / "torchvision-resnet18" / "open" / "report.md").exists()


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "docs/convert" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_calibrated_standardisation_keeps_the_weight_minus_its_mean():
    import torch
    from torch import nn

    from normfree.models.standardization import standardized_weight

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    weights = [m.weight.detach().double().clone() for m in model if isinstance(m, nn.Conv2d)]
    images = torch.rand(16, 3, 8, 8)
    with torch.no_grad():
        features_before = model[:-1](images)
    change = _script("fold_ws_study").calibrated_standardisation(model, images)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2
    for conv, weight in zip(convs, weights):
        expected = weight - weight.mean(dim=(1, 2, 3), keepdim=True)  # float64 reference
        assert torch.allclose(standardized_weight(conv).double(), expected, atol=1e-5)
    with torch.no_grad():
        features_after = model[:-1](images)
    reference = float((features_after - features_before).norm() / features_before.norm())
    assert abs(change - reference) < 1e-5
    assert abs(float((features_after - features_before).mean())) < 0.05 * float(features_before.abs().mean())


@pytest.mark.slow
def test_fold_ws_study_writes_its_table(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "docs/convert/fold_ws_study.py"), "--tiny", "--out", str(tmp_path)],
                   check=True, capture_output=True, cwd=ROOT)
    table = (tmp_path / "results.md").read_text()
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| 10 per class")]
    assert [row[1] for row in rows] == ["BatchNorm", "folded + AGC", "folded + WS + AGC"]
    assert float(rows[2][5].rstrip(" |")) > 0  # the calibration's feature change is reported


@pytest.mark.slow
def test_recipe_spp_writes_its_plot_and_table(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "docs/convert/recipe_spp.py"), "--tiny", "--out", str(tmp_path)],
                   check=True, capture_output=True, cwd=ROOT)
    assert (tmp_path / "spp.png").stat().st_size > 0
    import csv

    with open(tmp_path / "spp.csv") as file:
        rows = list(csv.DictReader(file))
    assert {row["model"] for row in rows} == {"BatchNorm", "converted, papers", "converted, open"}
    assert len(rows) == 3 * 8  # resnet18: 8 residual blocks per model
    papers = [float(row["residual_variance"]) for row in rows if row["model"] == "converted, papers"]
    assert papers == [0.0] * 8  # SkipInit: every branch starts switched off


@pytest.mark.slow
def test_agc_find_study_writes_its_table(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "docs/agc-find/agc_find_study.py"), "--tiny", "--out", str(tmp_path)],
                   check=True, capture_output=True, cwd=ROOT)
    table = (tmp_path / "results.md").read_text()
    row = next(line.split(" | ") for line in table.splitlines() if line.startswith("| digits, bs 16, adam, twin"))
    assert len(row) == 9  # setting, lr, two lambdas, auto, chosen, gap, rank, goal
    assert float(row[5]) > 0  # the lambda agc_find chose
    assert row[-1].rstrip(" |") in ("met", "missed")
    assert "Goal met in" in table
