"""The C++ runner (deploy/cpp): where the installed TVM wheel keeps what it builds against, as cmake
arguments, and a build helper. Finding the files never imports TVM (it only locates the packages)."""
from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "cpp"   # in a source checkout
PROGRAM = "tvmzoo_classify"
TOOLS = ("cmake", "c++")


@dataclass(frozen=True)
class TvmPaths:
    include_dirs: tuple[Path, ...]   # tvm/include, tvm_ffi/include, dlpack's include
    runtime_library: Path            # libtvm_runtime.so
    ffi_library: Path                # libtvm_ffi.so

    def cmake_args(self) -> list[str]:
        return [f"-DTVM_INCLUDE_DIRS={';'.join(map(str, self.include_dirs))}",
                f"-DTVM_RUNTIME_LIBRARY={self.runtime_library}", f"-DTVM_FFI_LIBRARY={self.ffi_library}"]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the Python package '{name}' is not installed: pip install apache-tvm apache-tvm-ffi "
                          f"(the C++ runner builds against the wheel's headers and libraries).")
    return Path(next(iter(spec.submodule_search_locations)))


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConfigError(f"{path} is missing: the installed {what} wheel has no C++ {path.name}; "
                          f"reinstall it (pip install --force-reinstall {what}).")
    return path


def tvm_paths() -> TvmPaths:
    """The headers and shared libraries of the installed apache-tvm and apache-tvm-ffi wheels."""
    tvm, ffi = _package_dir("tvm"), _package_dir("tvm_ffi")
    includes = (_existing(tvm / "include", "apache-tvm"), _existing(ffi / "include", "apache-tvm-ffi"),
                _existing(ffi / "3rdparty" / "dlpack" / "include", "apache-tvm-ffi"))
    return TvmPaths(includes, _existing(tvm / "lib" / "libtvm_runtime.so", "apache-tvm"),
                    _existing(ffi / "lib" / "libtvm_ffi.so", "apache-tvm-ffi"))


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def build(build_dir: Path, source_dir: Path = SOURCE_DIR, jobs: int = 2) -> Path:
    """Configure and build deploy/cpp into `build_dir` (incremental); the program's path."""
    missing = missing_tools()
    if missing:
        raise ConfigError(f"cannot build the C++ runner: {', '.join(missing)} not found. Install a C++ compiler, "
                          f"CMake and OpenCV / OpenSSL development files (Debian: apt-get install g++ cmake "
                          f"libopencv-dev libssl-dev).")
    if not (source_dir / "CMakeLists.txt").is_file():
        raise ConfigError(f"{source_dir} holds no CMakeLists.txt: the C++ runner's sources ship in tvmzoo's source "
                          f"tree (deploy/cpp), not in the installed package; build from a checkout.")
    configure = ["cmake", "-S", str(source_dir), "-B", str(build_dir), *tvm_paths().cmake_args()]
    for cmd in (configure, ["cmake", "--build", str(build_dir), "-j", str(jobs)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise ConfigError(f"building the C++ runner failed ({' '.join(cmd[:2])}): " + " | ".join(tail))
    log.info("built %s", build_dir / PROGRAM)
    return build_dir / PROGRAM
