"""The README's Python examples run as written, in order, in one namespace."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    quickstart, *others = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(others) >= 2
    namespace: dict = {}
    exec(compile(quickstart.replace("fit_one_cycle(4,", "fit_one_cycle(1,"), str(README), "exec"), namespace)
    assert 0 < namespace["learn"].adaptive_clip.history.rate() < 1
    for block in others:
        exec(compile(block, str(README), "exec"), namespace)
    assert len(namespace["learn"].adaptive_clip.exclude) == 4
    assert namespace["stats"].units.sum() > 0
