"""MkDocs hook: the API reference page lists every name of ``normfree.__all__``, each rendered by mkdocstrings
from the module that defines it, so the page follows the public API as it changes. A public class or function
without a docstring fails the build."""
import importlib
import inspect
import re
import sys

from mkdocs.exceptions import PluginError

PAGE = "api.md"
MARKER = "<!-- api-reference -->"


def on_page_markdown(markdown, page, **kwargs):
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{PAGE} lost its {MARKER} line, where the reference goes")
    normfree = importlib.import_module("normfree")
    return markdown.replace(MARKER, "\n\n".join(f"::: {identifier(normfree, name)}" for name in normfree.__all__))


def identifier(normfree, name: str) -> str:
    """The dotted path of the module member that ``normfree.NAME`` is (mkdocstrings reads the source there)."""
    value = getattr(normfree, name)
    if inspect.isclass(value) or inspect.isfunction(value):
        if not inspect.getdoc(value):
            raise PluginError(f"normfree.{name} is public but has no docstring")
        return f"{value.__module__}.{value.__qualname__}"
    # a constant: the normfree module whose source assigns it
    assignment = re.compile(rf"^{re.escape(name)}\b[^=\n]*=", re.M)
    for module_name, module in sorted(sys.modules.items()):
        if module_name.startswith("normfree.") and vars(module).get(name) is value:
            if assignment.search(inspect.getsource(module)):
                return f"{module_name}.{name}"
    raise PluginError(f"cannot find the module that defines normfree.{name}")
