"""The committed studies' scripts run end to end at tiny settings (their real settings take CPU hours)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
