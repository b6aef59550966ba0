"""Write to a temporary path, then rename: a reader sees the old complete file or the new one.

A process killed at any moment (SIGKILL included) leaves at most hidden temporaries
(`.<name>.<random>.tmp`, `.<name>.<random>.old`) beside the target; readers skip hidden names and
the next `atomic_dir` of the same target removes them.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputError
from .outputs import check_file_place

log = logging.getLogger(__name__)

# a full disk, a quota, a file-size limit (ulimit -f), a read-only file system
_NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
            errno.EROFS: "the file system is read-only"}

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


@contextlib.contextmanager
def _room_to_write(path: Path) -> Iterator[None]:
    """A full disk (or the like) while writing `path` is one OutputError that says so, not a traceback."""
    try:
        yield
    except OSError as err:
        if err.errno not in _NO_ROOM:
            raise
        raise OutputError(f"cannot write {path}: {_NO_ROOM[err.errno]} ({err.strerror}); nothing was replaced. "
                          "Free some space there or write the output somewhere else.") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it replaces `path`, on error it is removed.
    `path` must be missing or a regular file (a device or a folder in its place is refused)."""
    path = Path(path)
    check_file_place(path, "output")
    with _room_to_write(path), _atomic_path(path) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files: give the usual permissions
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _stale(path: Path, suffix: str) -> list[Path]:
    # exactly mkdtemp's names (8 random characters), so that "<name>.v2"'s temporaries never match
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.{suffix}")
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir())


def _clean_stale(path: Path) -> None:
    """Under the lock, temporaries of `path` belong to killed writers: restore or remove them."""
    for stale in _stale(path, "old"):
        if not path.exists() and (stale / path.name).is_dir():  # killed between the two fallback renames
            os.replace(stale / path.name, path)
            log.warning("restored %s, left aside by an interrupted build", path)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in _stale(path, "tmp"):
        log.info("removing %s, left by an interrupted build", stale)
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` whole, in one atomic
    rename (an exchange where the old one exists).

    A lock file beside it makes a second writer of the same directory wait rather than interleave.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock, _room_to_write(path):
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another process is writing %s: waiting for it to finish", path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        _clean_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
        try:
            yield tmp
            if not path.exists():
                os.replace(tmp, path)
            elif _exchange(tmp, path):
                shutil.rmtree(tmp, ignore_errors=True)  # now holds the old directory
            else:  # two renames; _clean_stale restores the old one if a kill falls between them
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.replace(path, old / path.name)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
