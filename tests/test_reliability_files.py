"""Reliability, session 9: the files deployment engineers hand the tools by mistake. A label file of another
model (wrong count, a blank line, not UTF-8), an output path that names a device or a pipe (the rename would
replace it: as root, /dev/null itself), a full disk, a folder or an empty file as the ONNX, an empty image in
an npz. Real CLIs on real files, the tiny compiled model of test_reliability_outputs."""
from __future__ import annotations

import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, copy_images, run_cli
from test_reliability import one_error, run_main
from test_reliability_outputs import root, tiny  # noqa: F401 - fixtures
from tiny import build_tiny
from tvmzoo.cli import classification_main, image2npz_main, main
from tvmzoo.io.images import Labels
from tvmzoo.preprocess import read_image
from tvmzoo.preprocess.fused import fused_input
from tvmzoo.run.runtime import CompiledModel
from tvmzoo.run.serve.repository import model_labels

pytestmark = pytest.mark.reliability

DECODE = ROOT / "common" / "eval" / "vamp_npz_decode.py"
IMAGENET = ROOT / "common" / "label" / "imagenet.txt"


@pytest.fixture(scope="module")
def photos(root, sample_images) -> Path:
    return copy_images(sample_images[:3], root / "three")[0].parent


@pytest.fixture(scope="module")
def npz_route(root, tiny, photos) -> tuple[Path, Path]:
    """(datalist, vamp output folder) of the three photos through image2npz and vamp --datalist."""
    datalist = root / "three.txt"
    run_cli(ROOT / "common" / "utils" / "image2npz.py", "--dataset_path", photos,
            "--target_path", root / "three_npz", "--text_path", datalist)
    run_cli("vamp", "-m", tiny, "--datalist", datalist, "--path_output", root / "three_out")
    return datalist, root / "three_out"


def _imagenet_lines() -> list[str]:
    return IMAGENET.read_text(encoding="utf-8").splitlines()


def _label_file(path: Path, case: str) -> tuple[Path, list[str]]:
    """A label file with one realistic mistake, and the words its error must hold."""
    lines = _imagenet_lines()
    if case == "another model's (3 classes)":
        path.write_text("cat\ndog\nbird\n")
        return path, ["names 3 classes", "gives 1000 scores per image", "label file of this model"]
    if case == "a blank line":  # 1001 lines: every class after line 501 one off
        path.write_text("\n".join(lines[:500] + [""] + lines[500:]) + "\n")
        return path, ["line 501 is blank", "Remove the line"]
    if case == "a blank line, one name missing":  # still 1000 lines: only the blank line tells
        path.write_text("\n".join(lines[:500] + [""] + lines[501:]) + "\n")
        return path, ["line 501 is blank"]
    lines[5] = "café"
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return path, ["is not UTF-8 text", "byte 0xe9", "save it as UTF-8"]


@pytest.mark.parametrize("case", ["another model's (3 classes)", "a blank line", "a blank line, one name missing",
                                  "latin-1"])
def test_label_file_mistakes_are_refused_before_any_image(case, tiny, photos, tmp_path, capsys):
    labels, words = _label_file(tmp_path / "labels.txt", case)
    proc = run_main(classification_main, "--file_path", photos, "--model_prefix_path", tiny, "--label_txt", labels,
                    "--save_dir", tmp_path / "out", capsys=capsys)
    assert str(labels) in one_error(proc, *words)
    assert not (tmp_path / "out" / "result.txt").exists()


def test_npz_decode_refuses_labels_of_another_width(npz_route, tmp_path):
    labels, words = _label_file(tmp_path / "labels.txt", "another model's (3 classes)")
    datalist, outputs = npz_route
    one_error(run_cli(DECODE, datalist, outputs, tmp_path / "result.txt", labels, check=False),
              "names 3 classes", str(outputs))
    assert not (tmp_path / "result.txt").exists()


def test_serve_refuses_labels_of_another_width(tiny, tmp_path):
    labels, _ = _label_file(tmp_path / "labels.txt", "another model's (3 classes)")
    with pytest.raises(Exception, match="names 3 classes but .* gives 1000 scores"):
        model_labels(tiny.parent, 1000, labels)
    assert model_labels(tiny.parent, 1000, IMAGENET)[0] == "tench, Tinca tinca"


def test_a_byte_order_mark_is_not_part_of_the_first_name(tiny, photos, tmp_path, capsys):
    labels = tmp_path / "bom.txt"
    labels.write_bytes(b"\xef\xbb\xbf" + IMAGENET.read_bytes())  # Notepad's "UTF-8"
    assert Labels.load(labels).names[0] == "tench, Tinca tinca"
    proc = run_main(classification_main, "--file_path", photos, "--model_prefix_path", tiny, "--label_txt", labels,
                    "--save_dir", tmp_path / "out", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert "\ufeff" not in (tmp_path / "out" / "result.txt").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# output places: a device or a pipe is never replaced by a file; a folder is refused before any work
# ---------------------------------------------------------------------------------------------
def _fifo(tmp_path: Path) -> Path:
    """A named pipe where the output goes: what /dev/null, /dev/full or /dev/stdout are, without touching them."""
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("tool", ["classification", "npz decode", "image2npz", "export", "reparam"])
def test_a_pipe_in_the_outputs_place_stays_a_pipe(tool, tiny, photos, npz_route, tmp_path, capsys):
    pipe = _fifo(tmp_path)
    if tool == "classification":
        proc = run_main(classification_main, "--file_path", photos, "--model_prefix_path", tiny,
                        "--save_dir", tmp_path, "--save_result_txt", pipe.name, capsys=capsys)
    elif tool == "npz decode":
        proc = run_cli(DECODE, *npz_route, pipe, check=False)
    elif tool == "image2npz":
        proc = run_main(image2npz_main, "--dataset_path", photos, "--target_path", tmp_path / "npz",
                        "--text_path", pipe, capsys=capsys)
    else:  # the output is checked before the (here missing) weights are read
        proc = run_main(main, tool, "--family", "repvgg", "--arch", "A0", "--source", "official",
                        "--weights", tmp_path / "no.pth", "--output", pipe, capsys=capsys)
    one_error(proc, str(pipe), "is a named pipe, not a regular file")
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_export_to_a_folder_is_refused_before_reading_weights(tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    proc = run_main(main, "export", "--family", "repvgg", "--arch", "A0", "--source", "official",
                    "--weights", tmp_path / "no.pth", "--output", folder, capsys=capsys)
    one_error(proc, str(folder), "is a folder")
    assert list(folder.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# a full disk: one error, nothing half-written (a file-size limit gives the same failed write as ENOSPC)
# ---------------------------------------------------------------------------------------------
def _with_tiny_disk(*args) -> subprocess.CompletedProcess:
    """Run a CLI whose files may hold at most 200 bytes (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a longer
    write fails with EFBIG as a full disk fails with ENOSPC)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
    first = str(args[0])
    program = [sys.executable, first] if first.endswith(".py") else [str(Path(sys.executable).parent / first)]
    return subprocess.run([*program, *map(str, args[1:])], capture_output=True, text=True, timeout=300,
                          preexec_fn=limit, env={**os.environ, "TVM_NUM_THREADS": "2"})


@pytest.mark.parametrize("tool", ["classification", "npz decode"])
def test_a_full_disk_is_one_error_and_leaves_nothing(tool, tiny, photos, npz_route, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    if tool == "classification":
        proc = _with_tiny_disk("tvmzoo", "run", "--file_path", photos, "--model_prefix_path", tiny, "--save_dir", out)
    else:
        proc = _with_tiny_disk(DECODE, *npz_route, out / "result.txt")
    one_error(proc, f"cannot write {out / 'result.txt'}", "ulimit -f", "nothing was replaced")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name == "result.txt"]


# ---------------------------------------------------------------------------------------------
# the ONNX a build YAML names: a folder, an empty file
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, words", [("a folder", ["is a folder", "set it to the deploy .onnx file"]),
                                         ("an empty file", ["holds no ONNX graph (0 bytes)", "Re-export it"])])
def test_onnx_that_is_a_folder_or_empty_is_one_error(case, words, root, tiny, tmp_path):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.mkdir() if case == "a folder" else onnx_path.write_bytes(b"")
    cfg = yaml.safe_load((root / "tiny.yaml").read_text())
    cfg["frontend"]["checkpoint"] = str(onnx_path)
    cfg["workspace"]["path"] = str(tmp_path / "ws")
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(cfg))
    one_error(run_cli("vamc", "compile", path, check=False), str(onnx_path), *words)
    assert not (tmp_path / "ws" / cfg["name"]).exists()


def test_an_empty_image_in_an_npz_names_the_file(tiny, tmp_path):
    npz = tmp_path / "empty.npz"
    np.savez(npz, input_0=np.zeros((3, 0, 32), np.uint8))
    (tmp_path / "list.txt").write_text(f"{npz}\n")
    one_error(run_cli("vamp", "-m", tiny, "--datalist", tmp_path / "list.txt", "--path_output", tmp_path / "out",
                      check=False), f"cannot read {npz}", "shape (3, 0, 32)", "written by image2npz.py")


# ---------------------------------------------------------------------------------------------
# library callers: an input of the wrong kind is refused, never truncated into the module's dtype
# ---------------------------------------------------------------------------------------------
def test_a_float_input_into_a_uint8_module_is_refused_not_truncated(root, tiny, sample_images):
    fused = CompiledModel.load(build_tiny(root, "fused", preprocess="fused"))
    images = np.stack([fused_input(fused.preprocessing, read_image(p)) for p in sample_images[:2]])
    assert images.dtype == np.uint8
    want = fused.run(images)
    for call in (lambda x: fused.stage([x]), fused.run):
        with pytest.raises(ValueError, match="takes uint8 input .*got float32"):
            call(images.astype(np.float32) + 0.7)   # truncated, this would have run as `images`
    np.testing.assert_array_equal(fused.run(fused.stage([images])), want)

    host = CompiledModel.load(tiny)                 # float32: float64 and uint8 inputs convert exactly as before
    x = np.random.default_rng(0).standard_normal((2, *host.input_shape[1:]))
    np.testing.assert_array_equal(host.run(x), host.run(x.astype(np.float32)))
    np.testing.assert_array_equal(host.run(host.stage([x])), host.run(x.astype(np.float32)))
    with pytest.raises(ValueError, match="takes float32 input, got complex128"):
        host.run(x + 1j)


def test_quant_report_of_an_fp32_yaml_uses_the_int8_defaults(root, tiny, photos, tmp_path):
    """An fp32 YAML has no backend.quantize (was: AttributeError traceback): the report quantizes as its int8
    build would, with the default settings."""
    proc = run_cli("tvmzoo", "quant-report", root / "tiny.yaml", "--set", f"dataset.path={photos}",
                   "--output", tmp_path / "report", check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = (tmp_path / "report" / "quant_report.csv").read_text().splitlines()
    assert len(rows) > 2 and "percentile" in (tmp_path / "report" / "quant_report.md").read_text()


def test_eval_limit_below_one_says_so(root, tiny, photos):
    """Was: `no images found at <folder>` for a folder full of images."""
    one_error(run_cli("tvmzoo", "eval", root / "tiny.yaml", "--images", photos, "--precisions", "fp32", "--limit", 0,
                      check=False), "--limit must be at least 1", "got 0")


def test_an_empty_datalist_is_one_error_at_each_step(tiny, tmp_path, capsys):
    """An empty image folder (the wrong --dataset_path) was an empty datalist, exit 0; then vamp wrote nothing
    (exit 0) and npz decode died with `ValueError: need at least one array to stack`."""
    (tmp_path / "empty").mkdir()
    one_error(run_main(image2npz_main, "--dataset_path", tmp_path / "empty", "--target_path", tmp_path / "npz",
                       "--text_path", tmp_path / "list.txt", capsys=capsys), "no images found at", "empty")
    assert not (tmp_path / "list.txt").exists()
    (tmp_path / "list.txt").write_text("")
    one_error(run_cli(DECODE, tmp_path / "list.txt", tmp_path / "out", tmp_path / "result.txt", check=False),
              "lists no npz files")
    one_error(run_cli("vamp", "-m", tiny, "--datalist", tmp_path / "list.txt", "--path_output", tmp_path / "out",
                      check=False), "lists no npz files")
    assert not (tmp_path / "result.txt").exists() and not (tmp_path / "out").exists()
