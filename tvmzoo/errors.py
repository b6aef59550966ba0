"""Errors a user can fix. The message is the whole story: what, where, how to fix."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class TvmzooError(Exception):
    """Base class: the CLIs print str(error) on one line and exit with code 2."""

    exit_code = 2


class ConfigError(TvmzooError):
    """A build YAML, vdsp JSON or command-line value is wrong."""


class CheckpointError(TvmzooError):
    """A checkpoint cannot be read, is unsafe, or does not fit the architecture."""


class ImageError(TvmzooError):
    """An image cannot be decoded or is out of the supported range."""


class OutputError(TvmzooError):
    """An output cannot be written there: a special file in its place, a full disk."""


class ModuleError(TvmzooError):
    """A compiled module is missing, corrupt or was built for another machine or version."""


def printable(text: object, limit: int = 200) -> str:
    """`text` safe for one terminal line: control, format and separator characters (escape
    sequences, line and page breaks, bidi overrides) escaped as \\xNN / \\uNNNN; cut at `limit`."""
    import unicodedata

    out = "".join(c if c == " " or unicodedata.category(c)[0] not in "CZ" else
                  (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                  for c in str(text)[:limit])
    return out if len(str(text)) <= limit else out + "..."


def did_you_mean(name: object, choices: Iterable[object], *, prefix: str = "", cutoff: float = 0.6) -> str:
    """" Did you mean 'x'?" for the choice closest to `name` ('' when none is close)."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=cutoff)
    return f" Did you mean '{prefix}{close[0]}'?" if close else ""


def in_context(exc: TvmzooError, context: object) -> TvmzooError:
    """The same kind of error with where it happened (a file, a key) in front of its message:
    `raise in_context(exc, path) from None`."""
    return type(exc)(f"{context}: {exc}")
