"""The layers of docs/ARCHITECTURE.md hold: no module imports from a layer above its own, the core needs neither
fastai nor matplotlib, and `import normfree` imports neither (fastai imports pyplot)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "normfree"
LAYERS = ["utils", "models", "agc", "integrations", "data", "learner", "app"]  # bottom up
CORE = ("utils", "models", "agc")


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name inside normfree ("normfree.agc.rule" -> "agc"); None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module, at module level) for each import statement of the file at `path`, and for each name a
    ``from M import name`` takes (a submodule of a package M, or a name defined in M)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found += [(name, id(node) in top_level) for name in [target, *(f"{target}.{a.name}" for a in node.names)]]
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if layer_of(module_name(p)) is not None)


def test_every_module_is_in_a_layer():
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert flat == [], f"modules outside the layers' subpackages: {flat}"
    assert MODULES == sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)  # all the others


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_import_from_a_layer_above(path):
    own = LAYERS.index(layer_of(module_name(path)))
    above = [(target, LAYERS[LAYERS.index(layer_of(target))]) for target, _ in imports(path)
             if target.startswith("normfree.") and layer_of(target) and LAYERS.index(layer_of(target)) > own]
    assert above == [], f"{module_name(path)} imports from layers above its own: {above}"


@pytest.mark.parametrize("path", [p for p in MODULES if layer_of(module_name(p)) in CORE], ids=lambda p: module_name(p))
def test_core_imports_neither_fastai_nor_matplotlib_at_module_level(path):
    heavy = [target for target, top in imports(path) if top and target.split(".")[0] in ("fastai", "matplotlib")]
    assert heavy == []


TRAINERS = {"huggingface": "transformers", "lightning": "lightning"}  # integration module -> its trainer package


@pytest.mark.parametrize("path", [p for p in MODULES if layer_of(module_name(p)) == "integrations"],
                         ids=lambda p: module_name(p))
def test_an_integration_imports_the_core_and_its_own_trainer_only(path):
    """An adapter needs torch, normfree's core and its trainer: no fastai, no other trainer."""
    own = TRAINERS.get(path.stem)
    foreign = [target for target, _ in imports(path)
               if target.split(".")[0] in {"fastai", "matplotlib", *TRAINERS.values()} - {own}
               or (target.startswith("normfree.") and layer_of(target) not in (*CORE, "integrations"))]
    assert foreign == []


def test_the_layer_checks_can_fail():
    """The helpers see an upward import and a module-level fastai import where there is one."""
    names = [target for target, _ in imports(PACKAGE / "app" / "train.py")]
    assert "normfree.learner.nf_learner" in names and "fastai.learner" in names
    assert layer_of("normfree.app.train") == "app" and layer_of("normfree") is None


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` (module -> modules it imports) as [a, b, ..., a]; [] if it has none."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        for target in sorted(graph[module]):
            cycle = visit(target, path + [module])
            if cycle:
                return cycle
        done.add(module)
        return []

    return next(filter(None, (visit(module, []) for module in sorted(graph))), [])


def test_no_module_imports_one_that_imports_it_back():
    """However indirectly or lazily (inside a function, under TYPE_CHECKING): a cycle means two modules that cannot be
    understood, tested or moved apart. A package's __init__, which gathers its modules' names, is not counted."""
    modules = {module_name(p) for p in MODULES if p.name != "__init__.py"}
    graph = {module_name(p): {target for target, _ in imports(p) if target in modules and target != module_name(p)}
             for p in MODULES if module_name(p) in modules}
    graph = {module: targets & set(graph) for module, targets in graph.items()}
    assert import_cycle(graph) == []
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]  # it can fail


@pytest.mark.slow
@pytest.mark.parametrize("statement", ["import normfree", "import normfree.agc", "import normfree.models",
                                       "from normfree import adaptive_clip_grad_, to_normfree",
                                       "from normfree import agc_hook"])
def test_importing_the_core_loads_neither_fastai_nor_pyplot(statement):
    """Nor the trainers of normfree.integrations."""
    code = (f"{statement}; import sys; print(sorted(m for m in ('fastai', 'matplotlib', 'matplotlib.pyplot', "
            f"'transformers', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_no_test_module_imports_another():
    """Shared test code lives in helper modules (helpers.py, fastai_helpers.py, agc_reference.py), never in a test_*.py
    that another imports: a test module can then change without breaking others."""
    tests = Path(__file__).parent
    offenders = [(path.name, target) for path in sorted(tests.glob("test_*.py"))
                 for node in ast.walk(ast.parse(path.read_text()))
                 for target in ([a.name for a in node.names] if isinstance(node, ast.Import)
                                else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                 if target.split(".")[0].startswith("test_")]
    assert offenders == []
