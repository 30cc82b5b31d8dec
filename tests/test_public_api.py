"""The top level is small and imports quietly: `import normfree` installs no warnings filter and changes no
fastai class; `import normfree.learner` (or the first use of a fastai-level name) installs the fastai integration.
Each check runs in a fresh interpreter, where nothing has imported normfree yet."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import normfree

ROOT = Path(__file__).resolve().parents[1]

INTEGRATION = ["agc", "agc_find", "to_mixed_precision"]  # the methods normfree.learner adds to fastai's Learner
# Learner's members that normfree defines (fastai's own modules patch Learner too: fit_one_cycle, to_fp16, ...)
NORMFREE_MEMBERS = ("def normfree_members(cls):\n"
                    "    return [n for n in sorted(dir(cls)) if (getattr(getattr(cls, n), '__module__', None) or '')"
                    ".startswith('normfree')]\n")


def run_python(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", NORMFREE_MEMBERS + code], capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stdout.split()


@pytest.mark.slow
def test_import_normfree_leaves_warnings_filters_and_fastai_learner_untouched():
    # the libraries normfree imports come first: importing timm adds sympy's own filter
    code = ("import warnings, timm; from fastai.learner import Learner\n"
            "filters, fit = list(warnings.filters), Learner.fit\n"
            "import normfree\n"
            "print(warnings.filters == filters, Learner.fit is fit, normfree_members(Learner) == [])")
    assert run_python(code) == ["True", "True", "True"]


@pytest.mark.slow
def test_importing_normfree_learner_installs_the_fastai_integration():
    code = ("from fastai.learner import Learner; fit = Learner.fit\n"
            "import normfree.learner\n"
            "print(*normfree_members(Learner), Learner.fit is not fit, Learner.fit.__wrapped__ is fit)")
    assert run_python(code) == INTEGRATION + ["True", "True"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["AGC", "train"])  # one of normfree.learner, one of normfree.app
def test_fastai_level_names_load_fastai_on_first_use_and_install_the_integration(name):
    code = (f"import sys, normfree; print('fastai' in sys.modules, {name!r} in dir(normfree)); normfree.{name}\n"
            "from fastai.learner import Learner; print(*normfree_members(Learner))")
    assert run_python(code) == ["False", "True"] + INTEGRATION


def test_the_top_level_is_what_a_user_calls():
    assert 10 <= len(normfree.__all__) <= 20 and normfree.__all__ == sorted(set(normfree.__all__))
    for name in normfree.__all__:  # each one the same object as in the subpackage that keeps it
        module = importlib.import_module(normfree._PUBLIC[name])
        assert name in module.__all__ and getattr(normfree, name) is getattr(module, name), name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        normfree.not_a_name  # noqa: B018 (the attribute access is what is tested)


@pytest.mark.parametrize("name, module", [("digits_dataloaders", "normfree.data"), ("read_idx", "normfree.data"),
                                          ("PerSampleClipper", "normfree.agc"), ("SmallResNet", "normfree.models"),
                                          ("ClipRate", "normfree.learner"), ("CompareConfig", "normfree.app.compare"),
                                          ("compare_transfer", "normfree.app.transfer"),
                                          ("write_spp", "normfree.app.spp"), ("PeakMemory", "normfree.utils.memory")])
def test_the_rest_is_importable_from_its_subpackage_only(name, module):
    assert name in importlib.import_module(module).__all__
    assert name not in normfree.__all__ and name not in dir(normfree)
    with pytest.raises(AttributeError):
        getattr(normfree, name)


def test_type_checkers_see_the_top_level_names():
    """normfree/__init__.py's ``if TYPE_CHECKING:`` imports (what mypy reads) are `_PUBLIC`, name for name."""
    tree = ast.parse((ROOT / "normfree" / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    imported = {alias.name: f"normfree.{node.module}" for node in block.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert imported == normfree._PUBLIC


def test_mypy_checks_the_modules_of_the_public_api():
    """pyproject.toml's mypy `files` hold normfree/__init__.py and every module a top-level name comes from or is
    defined in, so a new public name is type checked."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    files = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"])
    modules = {"normfree", *normfree._PUBLIC.values(),
               *(getattr(normfree, name).__module__ for name in normfree.__all__)}
    paths = {str(Path(*m.split(".")) / "__init__.py") if (ROOT / Path(*m.split("."))).is_dir()
             else str(Path(*m.split("."))) + ".py" for m in modules}
    assert sorted(paths - files) == []
