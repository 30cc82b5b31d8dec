"""The README's Python examples run as written, in order, in one namespace."""
import re
from pathlib import Path

from agc_reference import units_of

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write files
    quickstart, *others = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(others) >= 4
    namespace: dict = {}
    exec(compile(quickstart.replace("fit_one_cycle(4,", "fit_one_cycle(1,"), str(README), "exec"), namespace)
    assert 0 < namespace["learn"].adaptive_clip.history.rate() < 1
    for block in others:
        exec(compile(block.replace("fine_tune(2,", "fine_tune(1,"), str(README), "exec"), namespace)
    assert (tmp_path / "digits_png" / "digits_nfnet.pkl").is_file()
    assert namespace["learn"].model.get_classifier().out_features == 10
    clipped = [p for p in namespace["model"].parameters() if p.grad is not None]  # what the example clipped
    assert int(namespace["stats"].units.sum()) == sum(len(units_of(p)) for p in clipped) > 0
