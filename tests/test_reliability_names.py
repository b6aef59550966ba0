"""Reliability, issue 19 part 2: any file name, no silent merge, one run per result file, --resume only
with the settings the file was made with. Real photos, the real console scripts, a tiny compiled model."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ROOT, run_cli
from test_reliability import one_error, run_main
from test_reliability_outputs import root, tiny, unwritable_dir  # noqa: F401 - fixtures
from tiny import build_tiny
from tvmzoo.cli import classification_main, image2npz_main
from tvmzoo.io.images import find_images
from tvmzoo.eval.topk import evaluate_result_file
from tvmzoo.run.npz import load_input, read_datalist
from tvmzoo.preprocess import read_image
from tvmzoo.run.results import read_results

pytestmark = pytest.mark.reliability

IMAGE2NPZ = ROOT / "common" / "utils" / "image2npz.py"
DECODE = ROOT / "common" / "eval" / "vamp_npz_decode.py"
EVAL_TOPK = ROOT / "common" / "eval" / "eval_topk.py"
# every kind of name a line reader can trip on; each is a real photo of class n01440764 (tench), named or
# filed under its wnid
ODD_NAMES = [b"n01440764_\xff\xfe latin1 \xe9.JPEG", "n01440764_form\x0cfeed.JPEG", "n01440764_vt\x0btab.JPEG",
             "n01440764_line\u2028sep.JPEG", "n01440764_para\u2029sep.JPEG", "n01440764_cr\r.JPEG",
             "n01440764_nl\nname.JPEG", "n01440764_nel\x85.JPEG", "n01440764_fs\x1c.JPEG",
             'n01440764/"leading quote".JPEG', "n01440764_tab\t.JPEG", "n01440764_back\\nslash.JPEG",
             "n01440764_esc\x1b[31m.JPEG", "n01440764_plain.JPEG"]


@pytest.fixture(scope="module")
def model(tiny) -> Path:
    return tiny


@pytest.fixture(scope="module")
def tench(sample_images) -> Path:
    return next(p for p in sample_images if p.name.startswith("n01440764"))


@pytest.fixture(scope="module")
def odd_folder(root, tench) -> Path:
    folder = root / "odd"
    folder.mkdir()
    for name in ODD_NAMES:
        target = os.path.join(os.fsencode(folder), name) if isinstance(name, bytes) else folder / name
        Path(os.fsdecode(target)).parent.mkdir(exist_ok=True)
        shutil.copy(tench, target)
    return folder


def _classify(*args, capsys):
    return run_main(classification_main, *args, capsys=capsys)


def test_any_file_name_is_written_and_read_back(model, odd_folder, tmp_path, capsys):
    """Result file: every odd name written (escaped), read back exactly by read_results, eval_topk and
    --resume; one line per record for any line reader (str.splitlines too)."""
    paths = [str(p) for p in find_images(odd_folder)]
    assert len(paths) == len(ODD_NAMES)
    args = ("--file_path", odd_folder, "--model_prefix_path", model, "--save_dir", tmp_path)
    proc = _classify(*args, capsys=capsys)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    result = tmp_path / "result.txt"
    text = result.read_bytes().decode("utf-8")                           # valid UTF-8 throughout
    assert len(text.splitlines()) == 5 * len(paths)                       # no reader splits a record
    assert sorted(p.path for p in read_results(result)) == sorted(paths)
    assert "n01440764_plain.JPEG: Relay top-0" in text                    # ordinary names: vendor format as is
    score = evaluate_result_file(result)
    assert score.evaluated == len(paths) and score.skipped == 0
    topk = run_cli(EVAL_TOPK, result)
    assert topk.stdout.startswith("top1_rate: ")
    again = _classify(*args, "--resume", capsys=capsys)
    assert again.returncode == 0 and f"resumed: {len(paths)} image(s)" in again.stdout
    assert result.read_bytes().decode("utf-8") == text


def test_any_file_name_through_the_npz_route(model, odd_folder, tmp_path, capsys):
    """image2npz -> vamp --datalist -> npz decode with every odd name: nothing lost, each image's class
    equals the runner's."""
    datalist = tmp_path / "npz.txt"
    proc = run_main(image2npz_main, "--dataset_path", odd_folder, "--target_path", tmp_path / "npz",
                    "--text_path", datalist, capsys=capsys)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    items = read_datalist(datalist)
    assert len(items) == len(ODD_NAMES) and all(p.is_file() for p in items)
    assert len(datalist.read_bytes().decode("utf-8").splitlines()) == len(ODD_NAMES)
    run_cli("vamp", "-m", model, "--datalist", datalist, "--path_output", tmp_path / "out")
    run_cli(DECODE, datalist, tmp_path / "out", tmp_path / "npz_result.txt")
    decoded = read_results(tmp_path / "npz_result.txt")
    assert sorted(p.path for p in decoded) == sorted(str(p) for p in items)
    _classify("--file_path", odd_folder, "--model_prefix_path", model, "--save_dir", tmp_path, capsys=capsys)
    by_name = {Path(p.path).name: p.ids for p in read_results(tmp_path / "result.txt")}
    assert {Path(p.path).name[:-len(".npz")]: p.ids for p in decoded} == \
        {Path(name).stem: ids for name, ids in by_name.items()}


def test_image2npz_keeps_same_names_in_different_folders(root, sample_images, tmp_path, capsys):
    """a/cat.JPEG and b/cat.JPEG (different photos) stay two npz files; cat.JPEG and cat.png of one folder too."""
    data = tmp_path / "data"
    sources = {"a/cat.JPEG": sample_images[0], "b/cat.JPEG": sample_images[1], "c/dog.JPEG": sample_images[2],
               "c/dog.png": sample_images[3], "c/sub/dog.JPEG": sample_images[4]}
    for rel, src in sources.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".png"):
            cv2.imwrite(str(data / rel), cv2.imread(str(src)))
        else:
            shutil.copy(src, data / rel)
    datalist = tmp_path / "npz.txt"
    proc = run_main(image2npz_main, "--dataset_path", data, "--target_path", tmp_path / "npz", "--text_path",
                    datalist, capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    items = read_datalist(datalist)
    names = sorted(str(p.relative_to(tmp_path / "npz")) for p in items)
    assert names == ["a/cat.npz", "b/cat.npz", "c/dog.JPEG.npz", "c/dog.png.npz", "c/sub/dog.npz"]
    for rel in sources:                                   # each npz holds its own image
        npz = tmp_path / "npz" / next(n for n in names if n.startswith(rel.rsplit(".", 1)[0])
                                      and (n.count(".") == 1 or n.startswith(rel)))
        np.testing.assert_array_equal(load_input(npz), read_image(data / rel))


def test_image2npz_refuses_a_name_still_taken_and_writes_the_rest(sample_images, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("x.JPEG", "x.png.JPEG", "y.JPEG"):
        shutil.copy(sample_images[0], data / name)
    cv2.imwrite(str(data / "x.png"), cv2.imread(str(sample_images[1])))
    long_name = "n01440764_" + "l" * 240 + ".JPEG"                        # fits; its npz temporary does not
    shutil.copy(sample_images[2], data / long_name)
    datalist = tmp_path / "npz.txt"
    proc = run_main(image2npz_main, "--dataset_path", data, "--target_path", tmp_path / "npz", "--text_path",
                    datalist, capsys=capsys)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2, proc.stderr
    assert any("x.png.JPEG" in line and "is also the name of" in line for line in failed)
    assert any(long_name in line and "cannot write its npz" in line for line in failed)
    assert sorted(p.name for p in read_datalist(datalist)) == ["x.JPEG.npz", "x.png.npz", "y.npz"]


# ---------------------------------------------------------------------------------------------
# output places checked first; one run per result file; --resume only with the same settings
# ---------------------------------------------------------------------------------------------
def _place(case: str, tmp_path: Path) -> tuple[list[str], list[str]]:
    blocker = tmp_path / "blocker"
    blocker.write_text("keep")
    (tmp_path / "folder").mkdir()
    if case == "save_dir is a file":
        return ["--save_dir", str(blocker)], ["is a file"]
    if case == "save_dir under a file":
        return ["--save_dir", str(blocker / "out")], ["is a file"]
    if case == "result file is a folder":
        return ["--save_dir", str(tmp_path), "--save_result_txt", "folder"], ["is a folder"]
    return ["--save_dir", str(unwritable_dir(tmp_path) / "out")], ["cannot write in"]


@pytest.mark.parametrize("case", ["save_dir is a file", "save_dir under a file", "result file is a folder",
                                  "save_dir unwritable"])
def test_runner_checks_its_output_before_any_image(case, model, odd_folder, tmp_path, capsys):
    args, words = _place(case, tmp_path)
    proc = _classify("--file_path", odd_folder, "--model_prefix_path", model, *args, capsys=capsys)
    one_error(proc, *words)
    assert "images in" not in proc.stdout and (tmp_path / "blocker").read_text() == "keep"


@pytest.mark.parametrize("tool", ["image2npz target", "image2npz list", "vamp path_output", "npz decode result"])
def test_npz_tools_check_their_output_first(tool, model, odd_folder, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep")
    datalist = tmp_path / "npz.txt"
    if tool.startswith("image2npz"):
        target, text = (blocker, datalist) if tool.endswith("target") else (tmp_path / "npz", tmp_path)
        proc = run_main(image2npz_main, "--dataset_path", odd_folder, "--target_path", target, "--text_path",
                        text, capsys=capsys)
        one_error(proc, "--target_path" if tool.endswith("target") else "--text_path")
        assert not (tmp_path / "npz").exists()
        return
    run_main(image2npz_main, "--dataset_path", odd_folder, "--target_path", tmp_path / "npz", "--text_path",
             datalist, capsys=capsys)
    if tool == "vamp path_output":
        one_error(run_cli("vamp", "-m", model, "--datalist", datalist, "--path_output", blocker, check=False),
                  "--path_output", "is a file")
    else:
        run_cli("vamp", "-m", model, "--datalist", datalist, "--path_output", tmp_path / "out")
        one_error(run_cli(DECODE, datalist, tmp_path / "out", tmp_path, check=False), "is a folder")
    assert blocker.read_text() == "keep"


def test_a_second_run_into_one_result_file_fails_clearly(model, sample_images, tmp_path):
    """Run A holds the result file; run B into the same place stops at once with a message; A's results
    are all there. Then, the lock released, B runs."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for src in sample_images[:120]:
        shutil.copy(src, photos / src.name)
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "tvmzoo"), "run", "--file_path", str(photos),
           "--model_prefix_path", str(model), "--save_dir", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / ".result.txt.lock"
    deadline = time.monotonic() + 120
    held = False
    while not held and first.poll() is None and time.monotonic() < deadline:
        if lock.exists():
            with open(lock) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                except BlockingIOError:
                    held = True
        time.sleep(0.02)
    second = run_cli(*cmd[:1], *cmd[1:], check=False) if held else None
    out_a, err_a = first.communicate(timeout=600)
    assert first.returncode == 0, err_a
    if second is None:
        pytest.skip("run A finished before its lock could be observed (a very fast or loaded machine)")
    one_error(second, "another run is writing", str(out / "result.txt"), "another --save_dir")
    assert len(read_results(out / "result.txt")) == 120
    run_cli(*cmd[:1], *cmd[1:])                                            # the place is free again


def test_run_into_a_held_result_file_changes_nothing(model, odd_folder, tmp_path, capsys):
    (tmp_path / "result.txt").write_text("previous\n")
    with open(tmp_path / ".result.txt.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        proc = _classify("--file_path", odd_folder, "--model_prefix_path", model, "--save_dir", tmp_path,
                         capsys=capsys)
    one_error(proc, "another run is writing")
    assert (tmp_path / "result.txt").read_text() == "previous\n"


@pytest.fixture(scope="module")
def other_model(root) -> Path:
    return build_tiny(root, "tiny_logits", softmax=False)


@pytest.mark.parametrize("change", ["preprocessing", "module", "labels", "same"])
def test_resume_refuses_a_result_file_of_other_settings(change, model, other_model, odd_folder, root, tmp_path,
                                                        capsys):
    common = ("--file_path", odd_folder, "--save_dir", tmp_path)
    proc = _classify(*common, "--model_prefix_path", model, capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    result = tmp_path / "result.txt"
    lines = result.read_text(encoding="utf-8").splitlines(keepends=True)
    result.write_text("".join(lines[:15]), encoding="utf-8")             # three images done
    before = result.read_bytes()
    extra: list = ["--model_prefix_path", model]
    if change == "preprocessing":
        vdsp = tmp_path / "vdsp.json"
        meta = json.loads((model.parent / "mod.json").read_text())
        from tvmzoo.preprocess import Preprocessing
        pre = Preprocessing.from_meta(meta["preprocessing"])
        vdsp.write_text(json.dumps(Preprocessing(resize_hw=(48, 48), crop_hw=pre.crop_hw).to_vdsp()))
        extra += ["--vdsp_params_info", vdsp]
    elif change == "module":
        extra = ["--model_prefix_path", other_model]
    elif change == "labels":
        labels = tmp_path / "labels.txt"
        labels.write_text("".join(f"class {i}\n" for i in range(1000)))
        extra += ["--label_txt", labels]
    proc = _classify(*common, *extra, "--resume", capsys=capsys)
    if change == "same":
        assert proc.returncode == 0 and "resumed: 3 image(s)" in proc.stdout
        assert result.read_text(encoding="utf-8") == "".join(lines)
        return
    key = {"preprocessing": "preprocessing", "module": "module_sha256", "labels": "labels_sha256"}[change]
    one_error(proc, "--resume", "was made with other settings", key, "Run without --resume")
    assert result.read_bytes() == before                                  # nothing mixed in, nothing lost
    proc = _classify(*common, *extra, capsys=capsys)                      # a fresh run replaces both
    assert proc.returncode == 0
    recorded = json.loads((tmp_path / "result.txt.settings.json").read_text())
    assert len(read_results(result)) == len(ODD_NAMES) and recorded[key] is not None
