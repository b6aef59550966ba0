"""The native gRPC front's module (front.cc), built apart from the engine's: it links the system's libgrpc++
(`pkg-config grpc++`; Debian: libgrpc++-dev), which the engine and the HTTP pump do without. Built at first use
with tvm_ffi.cpp.load like the engine, cached in a folder named by its sources, the engine's headers and the
compiler and grpc++ flags. `load` raises Unavailable (saying why) where it cannot be built; the server then
keeps the Python gRPC server."""
from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

from .. import CFLAGS, SOURCE_DIR, Unavailable, build, content_hash
from .. import cache_dir as engine_cache_dir

HERE = Path(__file__).resolve().parent
MODULE_NAME = "tvmzoo_native_grpc"


def _pkg_config(*args: str) -> list[str]:
    if shutil.which("pkg-config") is None:
        raise Unavailable("pkg-config not found", "Debian: apt-get install pkg-config libgrpc++-dev")
    run = subprocess.run(["pkg-config", *args, "grpc++"], capture_output=True, text=True)
    if run.returncode != 0:
        raise Unavailable("libgrpc++ not found by pkg-config", "Debian: apt-get install libgrpc++-dev")
    return run.stdout.split()


def engine_library() -> Path:
    """The engine module's shared library: the front finds the engines in it (tvmzoo::EngineFromHandle)."""
    return engine_cache_dir() / "tvmzoo_native.so"


@functools.cache
def load():
    """The built module (built once per process; the server asks from its main thread); Unavailable when it
    cannot be built."""
    cflags, ldflags = _pkg_config("--cflags"), _pkg_config("--libs")
    sources = sorted(HERE.glob("*.cc"))
    digest = content_hash([*sources, *sorted(SOURCE_DIR.glob("*.h"))], [*CFLAGS, *cflags, *ldflags])
    return build(MODULE_NAME, "the native gRPC front", sources, engine_cache_dir().parent / f"grpc-{digest}",
                 [*CFLAGS, *cflags], ldflags, [SOURCE_DIR])
