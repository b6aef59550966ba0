"""Reliability, issue 19 part 2: nothing is lost or deleted. Compile replaces only an earlier build, every
output place is checked before the work starts, `tvmzoo eval` checks every input it will need before its
first compile, and --set is read once and accepted wherever a build YAML is. Real CLIs on real files."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from conftest import copy_images, run_cli
from test_reliability import one_error
from tiny import build_tiny

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def tiny(root) -> Path:
    """root/ws/tiny/mod, its YAML at root/tiny.yaml (dataset.path: root, fp32)."""
    return build_tiny(root, "tiny")


@pytest.fixture(scope="module")
def photos(root, sample_images) -> Path:
    copy_images(sample_images[:6], root / "photos")
    return root / "photos"


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder this user cannot write in: chmod 555 (root ignores it: then a read-only /proc/sys)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    if Path("/proc/sys").is_dir() and not os.access("/proc/sys", os.W_OK):
        return Path("/proc/sys")
    pytest.skip("no place this user cannot write to (root, and /proc/sys is writable)")


def _yaml_with(root: Path, tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((root / "tiny.yaml").read_text())
    data.update(changes)
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------------------------
# vamc compile replaces only an earlier build
# ---------------------------------------------------------------------------------------------
def _user_folder(path: Path) -> dict[str, str]:
    path.mkdir(parents=True)
    files = {"notes.txt": "my notes", "sub/data.csv": "1,2,3"}
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return files


def test_compile_refuses_a_folder_that_is_not_a_build(root, tiny, tmp_path):
    ws = tmp_path / "ws"
    files = _user_folder(ws / "tiny")
    path = _yaml_with(root, tmp_path, workspace={"path": str(ws)})
    one_error(run_cli("vamc", "compile", path, check=False), str(ws / "tiny"), "is not an earlier build",
              "has no mod.json", "delete the files in it")
    assert {n: (ws / "tiny" / n).read_text() for n in files} == files
    assert sorted(p.name for p in ws.iterdir()) == ["tiny"]          # no lock, no temporary, nothing built


@pytest.mark.parametrize("kind", ["file", "symlink to a folder", "symlink to a build"])
def test_compile_refuses_a_file_or_link_in_the_builds_place(kind, root, tiny, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    target = tmp_path / "elsewhere"
    if kind == "file":
        (ws / "tiny").write_text("keep me")
    elif kind == "symlink to a folder":
        _user_folder(target)
        (ws / "tiny").symlink_to(target)
    else:
        import shutil
        shutil.copytree(tiny.parent, target)
        (ws / "tiny").symlink_to(target)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    path = _yaml_with(root, tmp_path, workspace={"path": str(ws)})
    one_error(run_cli("vamc", "compile", path, check=False), str(ws / "tiny"), "not a folder of an earlier build")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "build.yaml"} == \
        {p: b for p, b in before.items()}


def test_compile_replaces_an_empty_folder_and_an_earlier_build(root, tiny, tmp_path):
    ws = tmp_path / "ws"
    (ws / "tiny").mkdir(parents=True)
    path = _yaml_with(root, tmp_path, workspace={"path": str(ws)})
    run_cli("vamc", "compile", path)
    run_cli("vamc", "compile", path, "--set", "backend.dtype=fp16")             # over the earlier build
    assert '"precision": "fp16"' in (ws / "tiny" / "mod.json").read_text()


@pytest.mark.parametrize("case", ["workspace is a file", "workspace under a file", "workspace unwritable"])
def test_compile_checks_the_workspace_first(case, root, tiny, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    ws = {"workspace is a file": blocker, "workspace under a file": blocker / "ws",
          "workspace unwritable": None}[case]
    if ws is None:
        ws = unwritable_dir(tmp_path) / "ws"
    path = _yaml_with(root, tmp_path, workspace={"path": str(ws)})
    start = time.monotonic()
    words = ["cannot write in"] if case == "workspace unwritable" else ["is a file"]
    one_error(run_cli("vamc", "compile", path, check=False), str(path), *words)
    assert blocker.read_text() == "a file"
    assert time.monotonic() - start < 60


# ---------------------------------------------------------------------------------------------
# tvmzoo eval: every input checked before the first compile; --set everywhere
# ---------------------------------------------------------------------------------------------
EVAL_CASES = {
    "calibration folder missing": (["--set", "dataset.path=/no/such/calib"],
                                   ["dataset.path /no/such/calib does not exist", "--set dataset.path="]),
    "calibration folder without images": (["--set", "dataset.path={empty}"], ["has no '*.JPEG' images"]),
    "calibration path is a file": (["--set", "dataset.path={file}"], ["is a file", "folder of calibration"]),
    "onnx missing, no model section": (["--set", "frontend.checkpoint=/no/such.onnx"],
                                       ["frontend.checkpoint /no/such.onnx does not exist"]),
    "weights missing": (["--set", "frontend.checkpoint=/no/fresh.onnx", "--set",
                         "model={family: repvgg, arch: A0, source: official, weights: /no/w.pth}"],
                        ["model: checkpoint not found: /no/w.pth"]),
    "int8 build place taken by a user folder": ([], ["tiny-eval-int8", "is not an earlier build"]),
    "workspace is a file": (["--workspace", "{file}"], ["is a file"]),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_checks_every_input_before_the_first_compile(case, root, tiny, photos, tmp_path):
    args, words = EVAL_CASES[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    args = [a.replace("{empty}", str(tmp_path / "empty")).replace("{file}", str(tmp_path / "file")) for a in args]
    ws = tmp_path / "ws"
    if case.startswith("int8 build place"):
        _user_folder(ws / "tiny-eval-int8")
        args = ["--set", f"dataset.path={photos}"]
    if "--workspace" not in args:
        args += ["--workspace", str(ws)]
    start = time.monotonic()
    proc = run_cli("tvmzoo", "eval", root / "tiny.yaml", "--images", photos, "--precisions", "fp32,int8",
                   *args, check=False)
    one_error(proc, *words)
    assert not (ws / "tiny-eval-fp32").exists()                           # nothing compiled first
    assert time.monotonic() - start < 60


def test_eval_takes_set_for_calibration(root, tiny, photos, tmp_path):
    """The int8 evaluation's calibration images come from --set (no YAML edit); fp32 and int8 both run."""
    proc = run_cli("tvmzoo", "eval", root / "tiny.yaml", "--images", photos, "--precisions", "fp32,int8",
                   "--set", f"dataset.path={photos}", "--set", "dataset.sampler.get_data_num=4",
                   "--workspace", tmp_path / "ws")
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| fp32", "| int8"))]
    assert len(rows) == 2 and all("| 6 |" in row for row in rows), proc.stdout
    assert (tmp_path / "ws" / "tiny-eval-int8" / "calib.json").is_file()


@pytest.mark.parametrize("command", ["compile", "tune", "quant-report", "eval", "info"])
def test_every_yaml_command_takes_set(command, root, tiny, photos, tmp_path):
    """--set reaches the config in each command: a bad value is reported naming the key."""
    extra = ["--images", str(photos)] if command == "eval" else []
    proc = run_cli("tvmzoo", command, root / "tiny.yaml", *extra, "--set", "frontend.shape.input=[1,3",
                   check=False)
    one_error(proc, "frontend.shape.input", "expected a list")
    if command == "info":                                   # and a quoted value stays a string
        assert run_cli("tvmzoo", "info", root / "tiny.yaml", "--set", "name='010'").stdout.startswith("model: 010\n")
        one_error(run_cli("tvmzoo", "info", "repvgg:A0", "--set", "name=x", check=False), "Drop --set")
