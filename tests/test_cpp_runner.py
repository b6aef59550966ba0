"""The C++ runner (deploy/cpp): built with the installed TVM wheel, it writes the same result file as
classification.py on real photos for fp32 (Pillow resize), int8 and fused builds, with Python out of reach,
and refuses bad modules / images with one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE_DIR, copy_images, run_cli
from tiny import build_tiny
from tvmzoo.run import cpp_runner

LABELS = ROOT / "tvmzoo" / "data" / "imagenet.txt"


@pytest.fixture(scope="session")
def program(tmp_path_factory) -> Path:
    missing = cpp_runner.missing_tools()
    if missing:
        if os.environ.get("CI"):   # .ci/run installs the toolchain: a missing one is a CI bug, not a skip
            pytest.fail(f"CI lacks {', '.join(missing)} for the C++ runner (see .ci/run)")
        pytest.skip(f"no C++ toolchain here ({', '.join(missing)} not found): apt-get install g++ cmake "
                    f"libopencv-dev libssl-dev")
    return cpp_runner.build(tmp_path_factory.mktemp("cpp_build"))


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"{SAMPLE_DIR} is not here")
    root = tmp_path_factory.mktemp("cpp_models")
    copy_images(sorted(SAMPLE_DIR.glob("*.JPEG"))[:8], root)   # int8 calibration images
    return {"fp32": build_tiny(root, "fp32", resize_short=40, interpolation="pillow"),
            "int8": build_tiny(root, "int8", resize_short=40, dtype="int8"),
            "fused": build_tiny(root, "fused", resize_short=40, preprocess="fused")}


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    copy_images(sorted(SAMPLE_DIR.glob("*.JPEG"))[::25], folder / "imagenet")   # 20 photos
    copy_images([p for p in (ROOT / "tvmzoo" / "data" / "images").iterdir() if p.suffix != ".md"], folder)
    return folder


def run_program(program: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env if env is not None else {**os.environ, "TVM_NUM_THREADS": "2"})


def no_python_env(tmp_path: Path) -> dict:
    """PATH holds an empty folder only, no PYTHON* or virtualenv variables: no interpreter is reachable."""
    empty = tmp_path / "empty_bin"
    empty.mkdir(exist_ok=True)
    return {"PATH": str(empty), "TVM_NUM_THREADS": "2", "HOME": str(tmp_path)}


@pytest.mark.parametrize("build", ["fp32", "int8", "fused"])
def test_same_result_file_as_classification_py_without_python(program, models, photos, tmp_path, build):
    env = no_python_env(tmp_path)
    assert shutil.which("python3", path=env["PATH"]) is None and shutil.which("python", path=env["PATH"]) is None
    proc = run_program(program, "--file_path", photos, "--model_prefix_path", models[build], "--label_txt", LABELS,
                       "--save_dir", tmp_path / "cpp", "--save_result_txt", "result.txt", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("24 images in ")
    run_cli("common/vsx/classification.py", "--file_path", photos, "--model_prefix_path", models[build],
            "--save_dir", tmp_path / "py", "--save_result_txt", "result.txt", cwd=ROOT)
    cpp, py = (tmp_path / "cpp" / "result.txt").read_text(), (tmp_path / "py" / "result.txt").read_text()
    assert len(cpp.splitlines()) == 5 * 24 and cpp == py


def test_program_links_no_python(program):
    libs = subprocess.run(["ldd", str(program)], capture_output=True, text=True).stdout
    assert "libtvm_runtime.so" in libs and "libpython" not in libs


def test_unreadable_images_are_listed_and_the_others_classified(program, models, photos, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(photos, folder)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    jpeg = next((photos / "imagenet").iterdir()).read_bytes()
    (folder / "cut.JPEG").write_bytes(jpeg[: len(jpeg) // 2])
    proc = run_program(program, "--file_path", folder, "--model_prefix_path", models["fp32"], "--label_txt", LABELS,
                       "--save_dir", tmp_path, "--save_result_txt", "r.txt")
    assert proc.returncode == 1
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 3 and all("cannot decode" in line for line in failed)
    assert any("cut.JPEG" in line and "truncated" in line for line in failed)
    assert len((tmp_path / "r.txt").read_text().splitlines()) == 5 * 24


def _copy_model(prefix: Path, dest: Path) -> Path:
    shutil.copytree(prefix.parent, dest)
    return dest / "mod"


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("libpng warning")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_bad_modules_are_refused_with_one_line(program, models, photos, tmp_path):
    def run(prefix):
        return run_program(program, "--file_path", photos, "--model_prefix_path", prefix, "--label_txt", LABELS,
                           "--save_dir", tmp_path, "--save_result_txt", "r.txt")

    _one_line_error(run(tmp_path / "nowhere" / "mod"), "mod.json is missing", "vamc compile")

    corrupt = _copy_model(models["fp32"], tmp_path / "corrupt")
    data = bytearray((corrupt.parent / "mod.so").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt.parent / "mod.so").write_bytes(bytes(data))
    _one_line_error(run(corrupt), "checksum differs")

    (corrupt.parent / "mod.so").write_bytes(b"\x7fELF truncated")   # and no checksum to catch it first
    meta = json.loads((corrupt.parent / "mod.json").read_text())
    meta.pop("module_sha256")
    (corrupt.parent / "mod.json").write_text(json.dumps(meta))
    _one_line_error(run(corrupt), "cannot load", "recompile")

    foreign = _copy_model(models["fp32"], tmp_path / "foreign")
    meta = json.loads((foreign.parent / "mod.json").read_text())
    meta["cpu_features"].append("avx10_9_future")
    (foreign.parent / "mod.json").write_text(json.dumps(meta))
    _one_line_error(run(foreign), "avx10_9_future", "illegal instruction")

    meta["tvm_version"] = "0.99.0"
    (foreign.parent / "mod.json").write_text(json.dumps(meta))
    _one_line_error(run(foreign), "built with TVM 0.99.0", "recompile")

    (foreign.parent / "mod.json").write_text("{ not json")
    _one_line_error(run(foreign), "corrupt")
    assert not (tmp_path / "r.txt").exists()


def test_tvmzoo_prints_the_cmake_arguments():
    out = run_cli("tvmzoo", "deploy-cpp", "--cmake-args").stdout.split()
    args = dict(a[2:].split("=", 1) for a in out)
    assert set(args) == {"TVM_INCLUDE_DIRS", "TVM_RUNTIME_LIBRARY", "TVM_FFI_LIBRARY"}
    assert all(Path(p, "tvm").is_dir() or Path(p, "dlpack").is_dir() for p in args["TVM_INCLUDE_DIRS"].split(";"))
    assert Path(args["TVM_RUNTIME_LIBRARY"]).is_file() and Path(args["TVM_FFI_LIBRARY"]).is_file()
