"""MkDocs hook: the Command line page's "Every option" section is each command's ``--help``, rendered from the
parsers the ``normfree`` command itself builds (`normfree.app.cli.build_parser`), so the page cannot drift from
the code."""
import os

from mkdocs.exceptions import PluginError

PAGE = "command-line.md"
MARKER = "<!-- cli-help -->"
HELP_WIDTH = "100"  # argparse wraps at the terminal's width (COLUMNS); the page should not depend on it


def on_page_markdown(markdown, page, **kwargs):
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{PAGE} lost its {MARKER} line, where the commands' help goes")
    return markdown.replace(MARKER, commands_help())


def commands_help() -> str:
    from normfree.app.cli import build_parser

    previous_width = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        parser, commands = build_parser()
        sections = [("normfree", parser), *((f"normfree {name}", command) for name, command in commands.items())]
        return "\n".join(f"### `{title}`\n\n```text\n{command.format_help()}```\n" for title, command in sections)
    finally:
        if previous_width is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous_width
