"""Every bound tvmzoo puts on what a user hands it, written once (docs/reliability.md lists them).

Each limit is far above what a real input needs and far below what would exhaust memory or the C
stack: a file that passes them is read with memory that follows its real content, not its claims.
"""
from __future__ import annotations

import os
import re
import stat
from typing import Any

import yaml

MAX_NESTING = 64             # YAML / JSON nesting depth; a build YAML nests 5 deep, a vdsp JSON 3
MAX_PICKLE_DEPTH = 100       # containers inside containers in a checkpoint pickle; a state dict: about 6
CHECKPOINT_COPY_SLACK = 256 << 20  # bytes of tensor copies a checkpoint may cause beyond twice its file size
MAX_CLASSES = 1_000_000      # classes in a label file (ImageNet-21k has 21841)
MAX_TEXT_BYTES = 64 << 20    # label, wnid and ground-truth files, build YAML and vdsp JSON read whole
IMAGE_BYTES_PER_PIXEL = 8    # most an encoded pixel can take: 16-bit RGBA stored uncompressed
IMAGE_EXTRA_BYTES = 16 << 20  # bytes an image file may hold beyond its pixels (EXIF, ICC profile, thumbnails)
IMAGE_HEADER_BYTES = 1 << 20  # how far into a file its size must be found (JPEG EXIF / ICC segments first)
MAX_NPZ_ARRAY_BYTES = 1 << 30  # one array read from an npz (an image2npz input at the pixel limit: 300 MB)
PER_CORE = 8                 # model instances, or threads per instance, per usable core (-i, -t, --instances)
MEMORY_SHARE = 0.5           # share of the memory available now that vamp's input buffers may take

_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def json_depth(text: str) -> int:
    """Bracket nesting of JSON text, counted before parsing (strings skipped): json.loads recurses."""
    depth = deepest = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


def json_nesting_problem(text: str) -> str | None:
    """Why JSON text must not be parsed (json.loads recurses per level), or None."""
    depth = json_depth(text)
    return f"it nests {depth} levels deep, above the limit of {MAX_NESTING}" if depth > MAX_NESTING else None


class _DepthLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing nesting deeper than MAX_NESTING: PyYAML composes nodes recursively, so
    a document nested a few thousand deep ends in RecursionError."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_NESTING} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        """A key given twice in one mapping is refused (PyYAML keeps the last silently: a second `backend:`
        section replaced the first). Keys merged in with `<<` may still be overridden."""
        first: dict = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice in one mapping (first at line {first[key] + 1}); "
                        "YAML would keep only the last: remove one or merge them", key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """yaml.safe_load with nesting bounded by MAX_NESTING (raises yaml.YAMLError above it)."""
    return yaml.load(text, Loader=_DepthLoader)


def available_memory() -> int | None:
    """Bytes the kernel reports available now (MemAvailable), or None where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def gib(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):.1f} GiB" if nbytes >= 1 << 30 else f"{nbytes / (1 << 20):.1f} MiB"


SPECIAL_FILES = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a named pipe",
                 stat.S_IFSOCK: "a socket"}


def special_file(path: os.PathLike) -> str | None:
    """What `path` is ("a named pipe", ...) when it exists and is neither a regular file nor a folder, else None.
    Such a file is refused before it is opened: opening a pipe nobody writes to waits forever."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return SPECIAL_FILES.get(stat.S_IFMT(mode), "a special file")


def not_regular_message(path: os.PathLike, what: str, kind: str) -> str:
    return (f"{what} {path} is {kind}, not a regular file: reading it would wait for a writer forever (or never "
            "end). Give the path of a file.")


def check_not_special(path: os.PathLike, what: str) -> None:
    from .errors import ConfigError

    kind = special_file(path)
    if kind is not None:
        raise ConfigError(not_regular_message(path, what, kind))


def check_text_size(path: os.PathLike, what: str) -> None:
    """Refuse a text file that is to be read whole when it is above MAX_TEXT_BYTES (a wrong path,
    a device, a dataset archive given as a label file) or not a regular file; a missing file is left
    to the reader."""
    from .errors import ConfigError

    check_not_special(path, what)
    try:
        size = os.stat(path).st_size
    except OSError:
        return
    if size > MAX_TEXT_BYTES:
        raise ConfigError(f"{what} {path} is {gib(size)}, above the limit of {gib(MAX_TEXT_BYTES)} for a "
                          f"{what}: check that this is the right file.")


def read_text_file(path: os.PathLike, what: str, missing: str = "check the path",
                   folder: str = "give the file itself", encoding: str = "utf-8") -> str:
    """A user's text file read whole (bounded by MAX_TEXT_BYTES), each way it can fail one ConfigError:
    `{what} {path} does not exist: {missing}.`, `is a folder: {folder}.`, `is not UTF-8 text (byte …)`."""
    from .errors import ConfigError

    check_text_size(path, what)
    try:
        with open(path, encoding=encoding) as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist: {missing}.") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder: {folder}.") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                          f"{err.start}): save it as UTF-8.") from None
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err}.") from None
