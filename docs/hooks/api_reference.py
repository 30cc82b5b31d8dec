"""MkDocs hook: the API reference page lists ``normfree.__all__`` (the top level), then each subpackage's
``__all__`` (`normfree.agc`, `normfree.models`, ...; where a subpackage's ``__all__`` names modules, as
`normfree.app`'s does, each of those modules' ``__all__``). Each name is rendered once, by mkdocstrings, from
the module that defines it, under the first section that lists it; so the page follows the public API as it
changes. A public class or function without a docstring fails the build."""
import importlib
import inspect
import pkgutil
import re
import sys
from types import ModuleType

from mkdocs.exceptions import PluginError

PAGE = "api.md"
MARKER = "<!-- api-reference -->"


def on_page_markdown(markdown, page, **kwargs):
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{PAGE} lost its {MARKER} line, where the reference goes")
    rendered: set[str] = set()
    parts = []
    for module in public_modules(importlib.import_module("normfree")):
        identifiers = [identifier(module, name) for name in module.__all__]
        new = [path for path in identifiers if path not in rendered]
        rendered.update(new)
        listed_above = sorted(name for name, path in zip(module.__all__, identifiers) if path not in new)
        note = f"\n\nAnd, listed above: {', '.join(f'`{name}`' for name in listed_above)}." if listed_above else ""
        parts.append(f"## `{module.__name__}`{note}\n\n" + "\n\n".join(f"::: {path}" for path in new))
    return markdown.replace(MARKER, "\n\n".join(parts))


def public_modules(normfree: ModuleType) -> list[ModuleType]:
    """The top level, then each subpackage, or the modules its ``__all__`` names."""
    modules = [normfree]
    for package in sorted(info.name for info in pkgutil.iter_modules(normfree.__path__) if info.ispkg):
        subpackage = importlib.import_module(f"normfree.{package}")
        if not hasattr(subpackage, "__all__"):
            raise PluginError(f"normfree.{package} has no __all__: list its public names (or modules) there")
        named_modules = [name for name in subpackage.__all__ if not hasattr(subpackage, name)
                         or isinstance(getattr(subpackage, name), ModuleType)]
        if named_modules:
            modules += [importlib.import_module(f"{subpackage.__name__}.{name}") for name in named_modules]
        else:
            modules.append(subpackage)
    return modules


def identifier(module: ModuleType, name: str) -> str:
    """The dotted path of the member that ``module.NAME`` is, in the module that defines it (mkdocstrings reads
    the source there)."""
    value = getattr(module, name)
    if inspect.isclass(value) or inspect.isfunction(value):
        if not inspect.getdoc(value):
            raise PluginError(f"{module.__name__}.{name} is public but has no docstring")
        return f"{value.__module__}.{value.__qualname__}"
    # a constant: the normfree module whose source assigns it
    assignment = re.compile(rf"^{re.escape(name)}\b[^=\n]*=", re.M)
    for module_name, candidate in sorted(sys.modules.items()):
        if module_name.startswith("normfree.") and vars(candidate).get(name) is value:
            if assignment.search(inspect.getsource(candidate)):
                return f"{module_name}.{name}"
    raise PluginError(f"cannot find the module that defines {module.__name__}.{name}")
