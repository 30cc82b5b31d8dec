"""The documentation: the README stays a short front door whose commands parse, every relative link in it and in
the documentation pages names a file that exists, and the site builds with ``mkdocs build --strict`` (a broken
link or anchor, or a docstring mkdocstrings cannot read, fails it), with each command's help and each public
name of normfree on its pages."""
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import normfree
from normfree.app.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 200
PAGES = [README, ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "docs").rglob("*.md"))]
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)  # fenced blocks and inline code hold no links
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def relative_links(page: Path) -> list[str]:
    targets = LINK.findall(CODE.sub("", page.read_text()))
    return [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_readme_is_a_short_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move the detail into docs/"
    first_screen = "\n".join(lines[:15])
    assert "make demo" in first_screen and "make test" in first_screen


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_name_existing_files(page):
    links = relative_links(page)
    missing = [link for link in links if not (page.parent / link.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_link_check_sees_links():
    """The README links into the docs; a pattern that found none would pass every page above."""
    assert "docs/agc.md" in relative_links(README)


def test_readme_commands_parse():
    parser, _ = build_parser()
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = [shlex.split(line, comments=True) for block in blocks for line in block.splitlines()]
    normfree_commands = [argv[1:] for argv in commands if argv[:1] == ["normfree"]]
    assert normfree_commands
    for argv in normfree_commands:
        assert parser.parse_args(argv).command == argv[0]


def test_readme_make_targets_are_the_makefiles():
    named = set(re.findall(r"`?make ([a-z][a-z-]*)", README.read_text()))
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    assert {"demo", "test", "test-fast", "lint", "bench", "docs"} <= named
    assert named <= targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed: pip install -e '.[docs]' (make test installs it)")
def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    command_line = (site / "command-line" / "index.html").read_text()
    _, commands = build_parser()
    for command in commands.values():  # each command's --help, rendered from the parser at build time
        assert f"usage: {command.prog}" in command_line
    api = (site / "api" / "index.html").read_text()
    subpackages = [f"normfree.{package}" for package in ("agc", "models", "data", "learner", "utils")]
    public = [importlib.import_module(name) for name in
              ["normfree", *subpackages, *(f"normfree.app.{module}" for module in normfree.app.__all__)]]
    undocumented = [f"{module.__name__}.{name}" for module in public for name in module.__all__
                    if not re.search(rf'id="[\w.]*\.{name}"', api)]
    assert not undocumented, f"public names missing from the API reference: {undocumented}"
    assert (site / "quickstart" / "index.html").is_file()
