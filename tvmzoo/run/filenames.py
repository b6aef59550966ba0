"""Image paths in the line-based files (the five-line result file, the npz datalist), whatever the name.

Linux file names are bytes: Python holds the bytes that are not UTF-8 as lone surrogates
(os.fsdecode), which cannot be written as UTF-8, and a name may hold a line feed, a form feed or a
Unicode line separator, which every line reader splits on. A path is written as is when it is plain:
no control character, line or paragraph separator or undecodable byte, and no leading double quote.
Any other path is written as a JSON string with ASCII escapes ("\\f", "\\u2028", "\\udcff" for the
byte 0xff), which `unquote_path` reads back to the very same path. Ordinary names stay byte-for-byte
the vendor format.
"""
from __future__ import annotations

import json
import unicodedata

_ESCAPED = {"Cc", "Cs", "Zl", "Zp"}   # control characters (\n \r \v \f \x1c-\x1f \x85 ...), surrogates, U+2028/9


def is_plain(path: str) -> bool:
    return not path.startswith('"') and not any(unicodedata.category(c) in _ESCAPED for c in path)


def quote_path(path: str) -> str:
    """`path` as one line of text that reads back exactly (see the module docstring)."""
    return path if is_plain(path) else json.dumps(path)


def unquote_path(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, str):
            return value
    return text


def read_lines(path) -> list[str]:
    """The lines of a text file split on line feeds only (a stray \\r at the end dropped): a form feed or a
    line separator inside a vendor file's name does not cut it. Bytes that are not UTF-8 read back as the
    same surrogates os.fsdecode gives a file name."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        text = f.read().removeprefix("\ufeff")   # a byte-order mark (Windows editors) is not part of a path
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
