"""docs/quickstart.ipynb is stored without outputs and runs, at tiny settings, against this checkout's normfree."""
import ast
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "quickstart.ipynb"


def tiny_parameters(out: Path) -> str:
    return f"""
ARCH = "nf_resnet_tiny"
SIZE = 16
BS = 16
LIMIT = 64
PRETRAIN_EPOCHS = 1
PER_CLASS = 4
FINE_TUNE_EPOCHS = 1
PER_SAMPLE_EPOCHS = 1
COMPARE_BATCH_SIZES = [16]
COMPARE_SIZE = 8
COMPARE_LIMIT = 32
COMPARE_LRS = [1e-2, 3e-2]
BN_ARCH = "resnet18"
FOLD_PER_CLASS = 10
TARGET_TRAIN_PER_CLASS = 4
SMALL_BS = 4
OUT = {str(out)!r}
"""


def assigned_names(source: str) -> set[str]:
    return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def output_text(cell) -> str:
    """What a cell showed: printed text and the richest text form of each displayed value."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream" and output.name == "stdout":
            parts.append(output.text)
        elif "data" in output:
            data = output.data
            parts.append(data.get("text/markdown") or data.get("text/plain", ""))
    return "".join(parts)


def cell_running(notebook, snippet: str):
    (cell,) = [cell for cell in code_cells(notebook) if snippet in cell.source]
    return cell


def number_after(label: str, text: str) -> float:
    match = re.search(rf"{label} ([0-9.]+)(%?)", text)
    assert match, (label, text)
    return float(match[1]) / (100 if match[2] else 1)


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in code_cells(notebook):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.slow
def test_notebook_runs_at_tiny_settings(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = code_cells(notebook)[0]
    assert "parameters" in parameters.metadata.get("tags", [])
    out = tmp_path / "out"
    tiny = tiny_parameters(out)
    assert assigned_names(tiny) == assigned_names(parameters.source)  # every knob made tiny, none unknown here
    parameters.source = tiny
    # which normfree and which Python the kernel ran, checked below
    notebook.cells.append(
        nbformat.v4.new_code_cell("import sys, normfree\nprint(sys.executable)\nprint(normfree.__file__)"))
    # The kernel is a subprocess: it must import this checkout's normfree, whatever is installed. One torch
    # thread unless asked otherwise: on a shared 2-core machine two threads on tiny tensors ran 3x slower.
    env = {"OMP_NUM_THREADS": "1", **os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute(env=env)

    executable, module = output_text(notebook.cells[-1]).split()
    assert Path(executable) == Path(sys.executable)  # the python3 kernelspec ran the test's interpreter
    assert Path(module).is_relative_to(ROOT / "normfree")

    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing written outside OUT
    pretrained = cell_running(notebook, "learn.adaptive_clip.plot()")
    assert 0 <= number_after("AGC clipped", output_text(pretrained)) <= 1
    assert any("image/png" in output.get("data", {}) for output in pretrained.outputs)
    accuracy = number_after("validation accuracy:", output_text(cell_running(notebook, "get_preds")))
    assert 0 <= accuracy <= 1
    assert re.search(r"true class \d, predicted \d with probability [01]\.\d\d",
                     output_text(cell_running(notebook, "learn.predict")))
    per_sample = output_text(cell_running(notebook, "per_sample=True"))
    assert 0 <= number_after("per-sample AGC clipped", per_sample) <= 1
    compared = output_text(cell_running(notebook, "normfree.compare("))
    assert "| BatchNorm | bs 16 |" in compared and "| NF + AGC | bs 16 |" in compared
    assert f"report: {out / 'compare' / 'report.html'}" in compared
    assert (out / "compare" / "report.html").is_file() and (out / "digits_nf.safetensors").is_file()
    folded = output_text(cell_running(notebook, 'mode="fold"'))
    difference = re.search(r"max \|folded - BatchNorm\| logit difference: ([0-9.e+-]+) \(logits up to ([0-9.]+)\)",
                           folded)
    assert difference and float(difference[1]) < 1e-4 < float(difference[2]), folded  # the eval outputs kept
    before = re.search(r"BatchNorm layers: (\d+) before folding, 0 after", folded)
    assert before and int(before[1]) > 0, folded
    fine_tuned = output_text(cell_running(notebook, "fine_tuned = {}"))
    for method in ("with BatchNorm", "folded + AGC"):
        assert 0 <= number_after(re.escape(f"fine-tuned {method}: validation accuracy"), fine_tuned) <= 1
