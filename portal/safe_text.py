"""Text is text: every string from a user, a DICOM header, a file name or a case field is escaped
before it reaches Markdown or HTML.

`plain(text)` shows the text literally: HTML special characters become entities and Markdown
punctuation is backslash-escaped, so no tag, image, link, heading or table can come out of it.
`formatted(text)` is for case text written by instructors: the same, except that `**bold**`,
`*italics*` / `_italics_` and list lines (`- item`, `* item`, `1. item`) keep working. Neither lets an
`<img>`, `<a>`, `<form>` or a style through, whatever the input.
"""

from __future__ import annotations

import html
import re

# Markdown punctuation that could start a link, image, code span, heading, quote, table or raw HTML
# anywhere in a line; list, rule and setext markers matter only at the start of a line.
_MARKDOWN_SPECIALS = re.compile(r"([\\`\[\]()!#|~>{}])")
_LINE_START = re.compile(r"^(\s*)([-+=])", re.MULTILINE)
_ORDERED = re.compile(r"^(\s*\d+)([.)])", re.MULTILINE)
_EMPHASIS = re.compile(r"([*_])")
_LIST_ITEM = re.compile(r"^(\s{0,3})(?:\\-|\\\*|(\d{1,3})\\\.)\s", re.MULTILINE)


def plain(text: object) -> str:
    """Any value as literal Markdown/HTML text (see the module docstring)."""
    escaped = _MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(str(text), quote=True))
    return _block_markers(_EMPHASIS.sub(r"\\\1", escaped))


def formatted(text: object) -> str:
    """Instructor case text with the allow-list kept: bold, italics and list items; nothing else."""
    escaped = _MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(str(text), quote=True))
    return _LIST_ITEM.sub(_list_marker, _block_markers(escaped))


def _block_markers(text: str) -> str:
    """Escape list, rule and setext markers at the start of lines ('- ', '+', '=', '1.', '1)')."""
    return _ORDERED.sub(r"\1\\\2", _LINE_START.sub(r"\1\\\2", text))


def _list_marker(match: re.Match[str]) -> str:
    indent, number = match.group(1), match.group(2)
    return f"{indent}{number}. " if number else f"{indent}- "


def html_text(text: object) -> str:
    """For HTML-only places (toasts, titles): entities only, no Markdown escaping."""
    return html.escape(str(text), quote=True)
