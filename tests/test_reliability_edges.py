"""Reliability, session 11: inputs at the edges that still broke a step, none needing a TVM build. A build
YAML with a key given twice (was: the last kept silently, a second `backend:` section replacing the first),
tabs, Latin-1, a symbolic batch (was: refused as "expected an integer" while the compiler spoke of "-1 for
any"); result files joined, cut or with a bad number (was: a traceback, or scored); ground-truth files with
an image twice; serve flags that start a server that cannot work; an npz checkpoint of Python objects."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import ROOT
from test_reliability import one_error, run_main
from tvmzoo.cli import eval_topk_main, main, vamc_main
from tvmzoo.config import load_build_config
from tvmzoo.errors import CheckpointError, ConfigError
from tvmzoo.io.checkpoint import load_state_dict
from tvmzoo.io.images import Labels, default_labels, load_ground_truth_file
from tvmzoo.preprocess.vdsp import read_vdsp
from tvmzoo.run.results import predictions, write_results

pytestmark = pytest.mark.reliability

YAML = """\
name: tiny
frontend: {shape: {input: [1, 3, 32, 32]}, type: onnx, checkpoint: tiny.onnx}
backend:
  type: tvm
  dtype: fp32
workspace: {path: ws}
"""


@pytest.mark.parametrize("case, words", [
    ("a section twice", ["line 7", "'backend' is given twice in one mapping (first at line 3)", "remove one"]),
    ("a key twice", ["'dtype' is given twice in one mapping (first at line 5)", "remove one"]),
    ("a tab", ["found character '\\t'", "YAML indents with spaces, never tabs"]),
    ("Latin-1", ["is not UTF-8 text (byte 0xe9 at offset 9)", "save it as UTF-8"]),
    ("UTF-16", ["is not UTF-8 text (byte 0xff at offset 0)"]),
    ("batch -1", ["frontend.shape.input[0]: the batch must be a size, got -1", "one model per batch size"]),
    ("batch N", ["frontend.shape.input[0]: the batch must be a size, got 'N'", "15x slower"]),
    ("batch '?'", ["got '?'"]),
    ("batch null", ["got None"]),
])
def test_build_yaml_mistakes_are_one_error(case, words, tmp_path, capsys, monkeypatch):
    text = YAML
    if case == "a section twice":   # a second backend section pasted below (was: int8 built, silently)
        text += "backend:\n  type: tvm\n  dtype: int8\n"
    elif case == "a key twice":
        text = text.replace("  dtype: fp32\n", "  dtype: fp32\n  dtype: fp16\n")
    elif case == "a tab":
        text = text.replace("  type: tvm", "\ttype: tvm")
    elif case.startswith("batch"):   # how ONNX tools write a batch of any size
        text = text.replace("[1, 3, 32, 32]", f"[{case.split()[1]}, 3, 32, 32]")
    path = tmp_path / "build.yaml"
    if case == "Latin-1":
        path.write_bytes(text.replace("tiny", "café", 1).encode("latin-1"))
    elif case == "UTF-16":
        path.write_bytes(text.encode("utf-16"))
    else:
        path.write_text(text)
    monkeypatch.chdir(tmp_path)
    one_error(run_main(vamc_main, "compile", path, capsys=capsys), str(path), *words)
    assert not (tmp_path / "ws").exists()


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    """`<<: *defaults` then a key of its own is YAML's way to override, not a key given twice."""
    path = tmp_path / "build.yaml"
    path.write_text(YAML.replace("backend:\n  type: tvm\n  dtype: fp32\n",
                                         "backend:\n  <<: &b {type: tvm, dtype: fp32}\n  dtype: fp16\n"))
    assert load_build_config(path).backend.dtype == "fp16"
    with pytest.raises(ConfigError, match="given twice"):   # the same key twice inside a flow mapping too
        path.write_text(YAML.replace("  type: tvm", "  type: tvm\n  x: {a: 1, a: 2}"))
        load_build_config(path)


def _results(path, images: int = 3) -> str:
    """A real five-line result file of `images` photos of class 0 (tench), scored 100 %."""
    scores = np.random.default_rng(0).standard_normal((images, 1000))
    scores[:, 0] += 10
    write_results(path, predictions([f"/val/n01440764/img{i}.JPEG" for i in range(images)], scores),
                  default_labels().names)
    return path.read_text()


@pytest.mark.parametrize("case, words", [
    ("a prob that is no number", ["result.txt:1: not a result line", "prob: abc"]),
    ("two runs joined", ["result.txt:16: /val/n01440764/img0.JPEG has a top-0 line already (line 1)",
                         "joined files?"]),
    ("a line missing", ["img0.JPEG has the lines top-0, top-2, top-3, top-4", "lines are missing"]),
    ("empty", ["holds no results (it is empty)"]),
])
def test_result_files_that_cannot_be_scored_are_one_error(case, words, tmp_path, capsys):
    """(was: a ValueError traceback; joined runs scored as one, each image's top-5 holding its top-3 twice;
    a missing line shifting the ranks; an empty file: 'no image has a ground truth')."""
    result = tmp_path / "result.txt"
    text = _results(result)
    text = {"a prob that is no number": text.replace("prob: 0.", "prob: abc", 1), "two runs joined": text + text,
            "a line missing": "".join(text.splitlines(keepends=True)[:1] + text.splitlines(keepends=True)[2:]),
            "empty": ""}[case]
    result.write_text(text)
    one_error(run_main(eval_topk_main, result, capsys=capsys), *words)


def test_a_result_file_saved_with_a_byte_order_mark_scores_all_images(tmp_path, capsys):
    """A result file re-saved by a Windows editor (was: 75 %: the first image's top-0 line read as another image)."""
    result = tmp_path / "result.txt"
    text = _results(result)
    result.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    proc = run_main(eval_topk_main, result, capsys=capsys)
    assert proc.returncode == 0 and "top1_rate: 100.000 top5_rate: 100.000" in proc.stdout, proc


def test_a_ground_truth_file_giving_an_image_two_classes_is_refused(tmp_path):
    gt = tmp_path / "val_gt.txt"
    gt.write_text("a.JPEG 3\nb.JPEG 5\nval/a.JPEG 3\n")   # the same image and class twice: fine
    assert load_ground_truth_file(gt) == {"a.JPEG": 3, "b.JPEG": 5}
    gt.write_text("a.JPEG 3\nb.JPEG 5\na.JPEG 7\n")        # (was: the last kept silently)
    with pytest.raises(ConfigError, match=r"line 3 gives a.JPEG class 7 but line 1 gave it class 3"):
        load_ground_truth_file(gt)
    gt.write_text("a.JPEG \u00b2\n")                        # isdigit() but not int() (was: ValueError)
    with pytest.raises(ConfigError, match="line 1: expected '<file name> <class index>'"):
        load_ground_truth_file(gt)


@pytest.mark.parametrize("text, words", [
    ("{0: 'tench', 0: 'goldfish', 1: 'shark'}\n", "class 0 is named twice ('tench' and 'goldfish'): keep one"),
    ("n01440764\ttench\nn01443537\tgoldfish\nn01440764\tshark\n",
     "wnid n01440764 is given to class 0 and class 2 (lines 1 and 3)"),
])
def test_a_label_file_naming_a_class_twice_is_refused(text, words, tmp_path):
    """A dict literal giving one index two names, a synset list giving one wnid two classes (was: the last kept
    silently; every image of that synset then scored against the wrong class)."""
    path = tmp_path / "labels.txt"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        Labels.load(path)
    assert str(path) in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("flags, words", [
    (["--drain-seconds", "-1"], ["--drain-seconds must be 0..86400", "got -1.0"]),
    (["--drain-seconds", "nan"], ["--drain-seconds must be 0..86400", "got nan"]),
    (["--labels", "FOLDER"], ["label file", "is a folder: give the file itself"]),
    (["--labels", "MISSING"], ["label file", "does not exist"]),
    (["--labels", "LATIN1"], ["is not UTF-8 text"]),
    (["--max-batch", "8"], ["unrecognized arguments: --max-batch"]),
    (["REPO=FILE"], ["model repository", "is a file: give a folder of compiled builds"]),
    (["REPO=MOD.JSON"], ["is a file (it names part of the build", "give that folder"]),
    (["REPO=PREFIX"], ["does not exist (it names part of the build"]),
])
def test_serve_flags_that_cannot_work_are_refused_before_any_model_loads(flags, words, tmp_path, capsys):
    """(was: --drain-seconds -1 accepted; --labels <folder> started the server with every model not ready;
    --max-batch named builds with a dynamic batch, which vamc compile does not make; a file as the repository
    was a NotADirectoryError traceback)."""
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "repo" / "build").mkdir(parents=True)   # never a repository that starts: a regression would serve
    (tmp_path / "repo" / "build" / "mod.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    where = {"FOLDER": tmp_path, "MISSING": tmp_path / "labels.txt", "LATIN1": tmp_path / "latin1.txt"}
    repository = {"REPO=FILE": tmp_path / "latin1.txt", "REPO=MOD.JSON": tmp_path / "repo" / "build" / "mod.json",
                  "REPO=PREFIX": tmp_path / "repo" / "build" / "mod"}.get(flags[0], tmp_path / "empty")
    args = [str(where.get(flag, flag)) for flag in flags if flag not in ("REPO=FILE", "REPO=MOD.JSON", "REPO=PREFIX")]
    try:
        proc = run_main(main, "serve", repository, "--http-port", "0", "--grpc-port", "0", *args, capsys=capsys)
    except SystemExit as exc:   # argparse: an unknown flag
        assert exc.code == 2
        assert all(word in capsys.readouterr().err for word in words)
        return
    one_error(proc, *words)


def test_an_npz_checkpoint_of_python_objects_says_so(tmp_path):
    """(was: '... holds Python objects, which are never loaded. The file is truncated or corrupt')."""
    path = tmp_path / "obj.npz"
    np.savez(path, w=np.zeros((2, 2), np.float32), meta=np.array([{"arch": "A0"}], dtype=object))
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "tensor 'meta'" in message and "holds Python objects" in message and "numeric arrays" in message
    assert "truncated" not in message


@pytest.mark.parametrize("case", ["a key twice", "a folder", "Latin-1"])
def test_vdsp_json_mistakes_are_named(case, tmp_path):
    """A key pasted beside the old one (was: the last kept silently: here a 999-wide crop became 224 again, or
    the other way round), a folder, a Latin-1 file (was: `[Errno 21]` / a codec message)."""
    shipped = (ROOT / "tvmzoo" / "build_in" / "vdsp_params" / "official-repvgg_a0-vdsp_params.json").read_text()
    path = tmp_path / "vdsp.json"
    if case == "a key twice":
        path.write_text(shipped.replace('"OimageWidth": 224', '"OimageWidth": 999, "OimageWidth": 224'))
    elif case == "Latin-1":
        path.write_bytes(shipped.replace('"RGB_PLANAR"', '"RGB_PLANARé"').encode("latin-1"))
    else:
        path.mkdir()
    words = {"a key twice": "'OimageWidth' is given twice in one object", "a folder": "is a folder: give the .json",
             "Latin-1": "is not UTF-8 text (byte 0xe9"}[case]
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        read_vdsp(path)
