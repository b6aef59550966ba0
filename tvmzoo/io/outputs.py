"""Output places checked before the work starts: a file where a folder goes (or the reverse), a place
this user cannot write, or a folder that is not ours to replace. Found before any image runs or any
kernel compiles, not after."""
from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError, OutputError
from ..limits import SPECIAL_FILES


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_create_in(folder: Path, what: str, target: Path) -> None:
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ConfigError(f"{what} {target}: {existing} is a file, so nothing can be written under it; "
                          "choose another place.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {target}: cannot write in {existing} (permission denied or a read-only "
                          "file system); choose a folder you can write to.")
    try:   # access() says yes to root everywhere, and to anyone in /proc or /sys: try it (was: a traceback later)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {target}: cannot create a file in {existing} ({exc.strerror or exc}); "
                          "choose a folder you can write to.") from None


def check_file_place(path: Path, what: str) -> None:
    """`path` is missing or a regular file: an output is written beside it and renamed over it, which would
    replace a device (/dev/null, /dev/stdout), a pipe or a socket with a plain file (as root, for everyone)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(mode):
        raise OutputError(f"{what} {path} is a folder: give the path of a file to write.")
    if not stat.S_ISREG(mode):
        raise OutputError(f"{what} {path} is {SPECIAL_FILES.get(stat.S_IFMT(mode), 'not a regular file')}, not a "
                          "regular file: writing the output would replace it with one. Give the path of a "
                          "file to write.")


def _same_file(a: os.PathLike, b: os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)   # also through a symbolic or hard link
    except (OSError, ValueError):
        return False


def check_output_file(path: str | os.PathLike, what: str, reads: Mapping[str, os.PathLike | None] = {}) -> Path:
    """A file the work will (re)write: not a folder or a special file, writable, its folder creatable, and
    none of the files it `reads` ({what it is: path}; None: not given)."""
    path = Path(path)
    check_file_place(path, what)
    for name, source in reads.items():
        if source is not None and _same_file(path, source):   # was: the input replaced by the output
            raise ConfigError(f"{what} {path} is also the {name} this command reads: writing it would replace "
                              "that input. Give another path.")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path} exists and cannot be written (permission denied); "
                          "choose another file or fix its permissions.")
    _check_can_create_in(path.parent, what, path)
    return path


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """A folder the work writes into: not a file, and this user can create it or write in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder: give a folder (it is created if missing).")
    _check_can_create_in(path, what, path)
    return path


def check_replaceable(directory: str | os.PathLike, marker: str, what: str) -> Path:
    """A folder that is about to be replaced whole: only a missing or empty one, or an earlier build of
    ours (it holds `marker`); anything else is refused, since replacing it deletes the files in it."""
    directory = Path(directory)
    check_output_dir(directory.parent, what)
    if not directory.exists() and not directory.is_symlink():
        return directory
    if directory.is_symlink() or not directory.is_dir():
        raise ConfigError(f"{what} {directory} exists and is not a folder of an earlier build "
                          f"({'a symbolic link' if directory.is_symlink() else 'a file'}); "
                          "it would be replaced: choose another name or move it away.")
    if (directory / marker).is_file() or not any(directory.iterdir()):
        return directory
    raise ConfigError(f"{what} {directory} exists and is not an earlier build (it has no {marker}): "
                      "compiling would replace the folder and delete the files in it. Choose another "
                      "name / workspace.path, or move the folder away.")
