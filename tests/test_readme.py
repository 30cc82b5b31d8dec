"""The Python examples of the README and of the documentation pages run as written: the README's in one
namespace, the pages' in another, each in the order a reader meets them (the pages in the site's order). A block
fenced with a title (```python title="...") is a script for a multi-process launch; the page names the test that
runs it."""
import re
from pathlib import Path

import pytest

from agc_reference import units_of

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS_IN_ORDER = [ROOT / "docs" / page for page in
                 ("getting-started.md", "agc.md", "models.md", "command-line.md")]
SHORTER = {"fit_one_cycle(4,": "fit_one_cycle(1,", "fine_tune(2,": "fine_tune(1,"}  # the test's budget


def run_examples(pages: list[Path]) -> dict:
    namespace: dict = {}
    for page in pages:
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
            for long, short in SHORTER.items():
                block = block.replace(long, short)
            exec(compile(block, str(page), "exec"), namespace)
    return namespace


def assert_units_counted(namespace: dict):
    clipped = [p for p in namespace["model"].parameters() if p.grad is not None]  # what the example clipped
    assert int(namespace["stats"].units.sum()) == sum(len(units_of(p)) for p in clipped) > 0


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_examples([README])
    assert 0 < namespace["learn"].adaptive_clip.history.rate() < 1
    assert_units_counted(namespace)


@pytest.mark.slow
def test_docs_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write files
    blocks = sum(len(re.findall(r"```python\n", page.read_text())) for page in DOCS_IN_ORDER)
    assert blocks >= 10
    namespace = run_examples(DOCS_IN_ORDER)
    assert (tmp_path / "digits_png" / "digits_nfnet.pkl").is_file()
    assert namespace["learn"].model.get_classifier().out_features == 10
    assert_units_counted(namespace)
