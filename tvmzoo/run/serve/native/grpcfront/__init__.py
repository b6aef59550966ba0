"""The native gRPC front's module (front.cc), built apart from the engine's: it links the system's libgrpc++
(`pkg-config grpc++`; Debian: libgrpc++-dev), which the engine and the HTTP pump do without. Built at first use
with tvm_ffi.cpp.load like the engine, cached in a folder named by its sources, the engine's headers and the
compiler and grpc++ flags. `load` raises Unavailable (saying why) where it cannot be built; the server then
keeps the Python gRPC server."""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from .. import CFLAGS, SOURCE_DIR, _ninja_on_path
from .. import cache_dir as engine_cache_dir

HERE = Path(__file__).resolve().parent
MODULE_NAME = "tvmzoo_native_grpc"


class Unavailable(Exception):
    """The gRPC front cannot be built here (the message says why)."""


def _pkg_config(*args: str) -> list[str]:
    if shutil.which("pkg-config") is None:
        raise Unavailable("pkg-config not found (Debian: apt-get install pkg-config libgrpc++-dev)")
    run = subprocess.run(["pkg-config", *args, "grpc++"], capture_output=True, text=True)
    if run.returncode != 0:
        raise Unavailable("libgrpc++ not found by pkg-config (Debian: apt-get install libgrpc++-dev)")
    return run.stdout.split()


def engine_library() -> Path:
    """The engine module's shared library: the front finds the engines in it (tvmzoo::EngineFromHandle)."""
    return engine_cache_dir() / "tvmzoo_native.so"


@functools.cache
def load():
    """The built module (built once per process; the server asks from its main thread); Unavailable when it
    cannot be built."""
    import tvm_ffi.cpp

    cflags, ldflags = _pkg_config("--cflags"), _pkg_config("--libs")
    _ninja_on_path()
    compiler = os.environ.get("CXX", "c++")
    missing = [tool for tool in ("ninja", compiler.split()[0]) if shutil.which(tool) is None]
    if missing:
        raise Unavailable(f"{' and '.join(missing)} not found")
    sources = sorted(HERE.glob("*.cc"))
    digest = hashlib.sha256(" ".join([compiler, *CFLAGS, *cflags, *ldflags]).encode() + b"\0")
    for path in [*sources, *sorted(SOURCE_DIR.glob("*.h"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    folder = engine_cache_dir().parent / f"grpc-{digest.hexdigest()[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return tvm_ffi.cpp.load(MODULE_NAME, sources=[str(p) for p in sources], build_directory=str(folder),
                                extra_cflags=[*CFLAGS, *cflags], extra_ldflags=ldflags,
                                extra_include_paths=[str(SOURCE_DIR)])
    except Exception as exc:  # noqa: BLE001 - the builder raises RuntimeError with the compiler's output
        errors = [line.strip() for line in str(exc).splitlines() if " error:" in line or line.startswith("error:")]
        raise Unavailable(f"building {folder} with {compiler} failed ({' | '.join(errors[:3]) or 'no message'})") \
            from None
