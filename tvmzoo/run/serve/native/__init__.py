"""The native data path of `tvmzoo serve --native`: C++ sources (every *.cc here: the engine, the HTTP pump)
built into one module at first use with apache-tvm-ffi's own builder (`tvm_ffi.cpp.load`: the C++ compiler
and ninja), linked only against libtvm_ffi, and cached per user in a folder named by the sources' hash
($XDG_CACHE_HOME/tvmzoo/native/<hash>): a second start loads it in milliseconds, and two servers starting at
once build it once (tvm_ffi holds a file lock on the folder while it builds). The default of `tvmzoo serve`
when it builds here (`choose`); else the Python path serves, with one warning saying why."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

from ....errors import ConfigError

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
MODULE_NAME = "tvmzoo_native"
CFLAGS = ["-std=c++17", "-O3", "-fPIC", "-pthread"]   # -O3: the NaN / Inf scan vectorized
_loaded = None
_lock = threading.Lock()


class Unavailable(ConfigError):
    """The module cannot be built here: `reason` (what and why) and `fix` (how to get it)."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"--native: {reason}. {fix}, or serve without --native.")
        self.reason, self.fix = reason, fix


def choose(requested: bool | None) -> tuple[bool, str]:
    """Whether the native path serves, and why. --native (True): it must build (else Unavailable);
    --no-native (False): the Python path; default (None): native when the module builds here, else the
    Python path with one warning saying why and how to get the native one."""
    if requested is False:
        return False, "started with --no-native"
    try:
        load()
    except Unavailable as exc:
        if requested:
            raise
        log.warning("the native data path cannot be built here (%s): serving on the Python path, which takes more "
                    "CPU per request (docs/serving.md). For the native path: %s; --no-native skips this check",
                    exc.reason, exc.fix[0].lower() + exc.fix[1:])
        return False, f"the native module cannot be built here: {exc.reason}"
    return True, "started with --native" if requested else "the default; --no-native: the Python path"


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.cc"))


def content_hash(paths: list[Path], flags: list[str]) -> str:
    """Of the files (names and contents), the compiler and `flags`: a changed file, another compiler or other
    flags are a new build folder."""
    digest = hashlib.sha256(" ".join([os.environ.get("CXX", "c++"), *flags]).encode() + b"\0")
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def source_hash() -> str:
    """Of every source and header here and the compiler."""
    return content_hash(sorted([*SOURCE_DIR.glob("*.cc"), *SOURCE_DIR.glob("*.h")]), CFLAGS)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tvmzoo" / "native" / source_hash()


def _ninja_on_path() -> None:
    """tvm_ffi runs `ninja` from PATH; the PyPI ninja (the serve extra) sits next to this interpreter, which
    is not on PATH when the venv's `tvmzoo` is run without activating it."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def load():
    """The built module (built now if this version of the sources has no build yet); ConfigError when it
    cannot be built, saying why and how to fix it."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _build()
        return _loaded


def _build():
    return build(MODULE_NAME, "the native engine", sources(), cache_dir())


def build(module_name: str, what: str, files: list[Path], folder: Path, cflags: list[str] = CFLAGS,
          ldflags: list[str] | None = None, include: list[Path] | None = None):
    """tvm_ffi.cpp.load of `files` into `folder` (`what` it builds, for the messages); Unavailable, saying why and
    how to fix it, when the compiler or ninja is missing, the folder cannot be made or the compiler fails."""
    import tvm_ffi.cpp

    _ninja_on_path()
    compiler = os.environ.get("CXX", "c++")
    missing = [tool for tool in ("ninja", compiler.split()[0]) if shutil.which(tool) is None]
    if missing:
        raise Unavailable(f"cannot build {what} ({', '.join(p.name for p in files)}): {' and '.join(missing)} not "
                          "found", "Install a C++ compiler and "
                          "ninja (Debian: apt-get install g++ ninja-build; or pip install ninja)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Unavailable(f"cannot create its build folder {folder} ({exc.strerror})",
                          "Make XDG_CACHE_HOME (default ~/.cache) a writable folder") from None
    try:
        return tvm_ffi.cpp.load(module_name, sources=[str(p) for p in files], build_directory=str(folder),
                                extra_cflags=cflags, extra_ldflags=ldflags,
                                extra_include_paths=[str(p) for p in include or []])
    except Exception as exc:  # noqa: BLE001 - the builder raises RuntimeError with the compiler's output
        lines = str(exc).splitlines()
        errors = [line.strip() for line in lines if " error:" in line or line.startswith("error:")][:3]
        reason = " | ".join(errors) or "the compiler stopped with an error and printed none"
        raise Unavailable(f"building {what} in {folder} with {compiler} failed ({reason})",
                          "Check the C++ compiler (CXX; g++ 9 or newer)") from None


def sources_names() -> list[str]:
    return [p.name for p in sources()]
