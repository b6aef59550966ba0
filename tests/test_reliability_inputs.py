"""Reliability, session 10: build YAMLs and model folders that still broke the tools. A backend.target
TVM refuses or that is no CPU (was: a traceback, or a CUDA module written that cannot load), an input size
TVM cannot index (was: "report it" after the compile), a mod.json edited by hand (was: a TVM traceback in
vamp, every image failed in run). Real CLIs on real files, the tiny compiled model of
test_reliability_outputs. The serve cases are in test_serve.py (`_bad_requests`) and below."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from serve_client import loopback_http_server
from test_reliability import one_error, run_main
from test_reliability_outputs import photos, root, tiny  # noqa: F401 - fixtures
from tvmzoo.cli import classification_main, eval_topk_main, vamc_main, vamp_main
from tvmzoo.run.serve import http_server
from tvmzoo.run.serve.http_app import Response

pytestmark = pytest.mark.reliability


def _yaml(root: Path, tmp_path: Path, **changes) -> Path:
    """The tiny model's YAML with `changes` (dotted keys), building into tmp_path/ws."""
    cfg = yaml.safe_load((root / "tiny.yaml").read_text())
    cfg["workspace"]["path"] = str(tmp_path / "ws")
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("target, words", [
    ("cuda", ["kind 'cuda' is not a CPU target", "Leave backend.target out"]),
    ("avx512", ["kind 'avx512' is not a CPU target"]),
    ("llvm -mcpu=skylake -opt=3", ["TVM refuses it", "Unknown config option 'opt'"]),
    ({"kind": "llvm", "mcpu": "skylake", "num-cores": "four"}, ["TVM refuses it", "num-cores"]),
])
def test_a_target_tvm_refuses_or_no_cpu_is_one_error(target, words, tiny, root, tmp_path, capsys):
    proc = run_main(vamc_main, "compile", _yaml(root, tmp_path, **{"backend.target": target}), capsys=capsys)
    assert "backend.target" in one_error(proc, *words)
    assert not (tmp_path / "ws" / "tiny").exists()


def test_mattr_in_the_target_string_compiles(tiny, root, tmp_path, capsys):
    """'llvm -mcpu=... -mattr=+a,+b' (the vendor form): TVM takes mattr as a list (was: a traceback)."""
    path = _yaml(root, tmp_path, **{"backend.target": "llvm -mcpu=x86-64 -mattr=+sse4.2,+popcnt"})
    proc = run_main(vamc_main, "compile", path, capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "ws" / "tiny" / "mod.json").read_text())
    assert meta["target"]["mattr"] == ["+sse4.2", "+popcnt"]


@pytest.mark.parametrize("shape", [[1, 3, 100000, 100000], [100000, 3, 224, 224]])
def test_an_input_size_tvm_cannot_index_is_refused_before_compiling(shape, tiny, root, tmp_path, capsys):
    proc = run_main(vamc_main, "compile", _yaml(root, tmp_path, **{"frontend.shape.input": shape}), capsys=capsys)
    one_error(proc, "frontend.shape.input", "too large to compile", "input size the model was trained at")


@pytest.mark.parametrize("edit", ["batch", "image size"])
def test_a_mod_json_edited_by_hand_is_named_not_a_tvm_error(edit, tiny, photos, tmp_path, capsys):
    folder = Path(shutil.copytree(tiny.parent, tmp_path / "edited"))
    meta = json.loads((folder / "mod.json").read_text())
    meta["input"]["shape"] = [4, 3, 32, 32] if edit == "batch" else [1, 3, 64, 64]
    (folder / "mod.json").write_text(json.dumps(meta))
    words = ["mod.json says the module takes float32", "but mod.so takes R.Tensor((1, 3, 32, 32)",
             "Recompile"]
    proc = run_main(vamp_main, "-m", folder / "mod", "--iterations", "2", capsys=capsys)
    one_error(proc, *words)
    if edit == "batch":   # run preprocesses to the recorded crop (32 x 32): only the batch disagrees there
        proc = run_main(classification_main, "--file_path", photos, "--model_prefix_path", folder / "mod",
                        "--save_dir", tmp_path / "out", capsys=capsys)
        one_error(proc, *words)
        assert "failed:" not in proc.stderr and not (tmp_path / "out" / "result.txt").exists()


def test_an_error_inside_the_http_parser_gets_a_400_answer(monkeypatch):
    """A fault of ours while a request is parsed (an exception in an httptools callback other than the
    size refusals) is answered 400 with its reason, then the connection closes (was: closed, no answer)."""
    def broken_on_url(self, url: bytes) -> None:
        raise UnicodeDecodeError("utf-8", url, 0, 1, "a fault while reading the URL")

    monkeypatch.setattr(http_server.Connection, "on_url", broken_on_url)

    async def app(request) -> Response:
        return Response.json({"ok": True})

    async def exchange() -> bytes:
        async with loopback_http_server(app, 1 << 20) as address:
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 10)   # until the server closes
            writer.close()
        return answer

    answer = asyncio.run(exchange())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in head, answer
    assert "a fault while reading the URL" in json.loads(body)["error"]


@pytest.mark.parametrize("damage", ["truncated", "not JSON", "workload of another kind", "missing folder"])
def test_tuning_records_that_cannot_be_read_are_named(damage, tiny, root, tmp_path, capsys):
    """A damaged records folder (was: `TVM could not compile the model … Try another backend.dtype`), a
    tuning.records path with a typo (was: an untuned build, without a word)."""
    shipped = ROOT / "tvmzoo" / "build_in" / "tuning" / "repvgg-a0" / "llvm-sapphirerapids" / "fp32-b1-224x224"
    records = tmp_path / "records"
    if damage != "missing folder":
        shutil.copytree(shipped, records)
        workloads, tuned = records / "database_workload.json", records / "database_tuning_record.json"
        if damage == "truncated":   # a copy cut short
            tuned.write_bytes(tuned.read_bytes()[:500])
        elif damage == "not JSON":
            workloads.write_text("<html>404</html>\n")
        else:
            workloads.write_text("[1, 2]\n")
    words = ["tuning.records", str(records)]
    words += ["does not exist", "vamc tune"] if damage == "missing folder" else ["cannot be read", "corrupt"]
    proc = run_main(vamc_main, "compile", _yaml(root, tmp_path, **{"tuning": {"records": str(records)}}),
                    capsys=capsys)
    one_error(proc, *words)
    assert not (tmp_path / "ws" / "tiny").exists()


@pytest.mark.parametrize("flags", [["vamp", "-i", "1000000"], ["vamp", "-t", "100000"],
                                   ["tvmzoo", "run", "--infer_mode", "async", "--instances", "100000"],
                                   ["tvmzoo", "serve", "--instances", "100000"]])
def test_instances_or_threads_far_beyond_the_cores_are_refused_at_once(flags, tiny, photos, tmp_path):
    """Each instance is a loaded model and a thread (was: the process hung loading a million of them)."""
    where = {"vamp": ["-m", tiny, "--iterations", "1"],
             "run": ["--file_path", photos, "--model_prefix_path", tiny, "--save_dir", tmp_path / "out"],
             "serve": [tiny.parent, "--http-port", "0", "--grpc-port", "0"]}[flags[1] if flags[0] == "tvmzoo" else "vamp"]
    program = str(Path(sys.executable).parent / flags[0])
    proc = subprocess.run([program, *flags[1:], *map(str, where)], capture_output=True, text=True, timeout=120)
    assert "cores this process may use" in one_error(proc, "Use at most")


@pytest.mark.parametrize("key", ["frontend.checkpoint", "dataset.path"])
def test_a_path_beside_the_yaml_run_from_elsewhere_is_pointed_at(key, tiny, root, photos, tmp_path, monkeypatch,
                                                                capsys):
    """Paths in a build YAML are read from the current folder; run from elsewhere, the message said only
    'does not exist. Export it first' (the file was there, beside the YAML). Now it names where it is."""
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(root / "tiny.onnx", folder / "tiny.onnx")
    shutil.copytree(photos, folder / "calib")
    cfg = yaml.safe_load((root / "tiny.yaml").read_text())
    cfg["frontend"]["checkpoint"] = "tiny.onnx" if key == "frontend.checkpoint" else str(folder / "tiny.onnx")
    cfg["dataset"]["path"] = "calib"
    cfg["backend"]["dtype"] = "int8" if key == "dataset.path" else "fp32"
    cfg["workspace"]["path"] = str(tmp_path / "ws")
    (folder / "build.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    proc = run_main(vamc_main, "compile", "model/build.yaml", capsys=capsys)
    wanted = folder / ("tiny.onnx" if key == "frontend.checkpoint" else "calib")
    one_error(proc, key, "read from the current folder", f"{wanted} is beside the YAML")
    monkeypatch.chdir(folder)
    assert run_main(vamc_main, "compile", "build.yaml", capsys=capsys).returncode == 0


def test_a_ground_truth_file_of_other_images_is_refused(tiny, photos, tmp_path, capsys):
    """eval_topk --gt naming none of the results' images (was: a top-1 from the wnids in the file names,
    exit 0, as if the ground-truth file had been used)."""
    result = tmp_path / "result.txt"
    assert run_main(classification_main, "--file_path", photos, "--model_prefix_path", tiny,
                    "--save_result_txt", result, capsys=capsys).returncode == 0
    gt = tmp_path / "val_gt.txt"
    gt.write_text("ILSVRC2012_val_00000001.JPEG 65\nILSVRC2012_val_00000002.JPEG 970\n")
    proc = run_main(eval_topk_main, result, "--gt", gt, capsys=capsys)
    one_error(proc, str(gt), "names none of the 6 images", "ground-truth file of these images")


@pytest.mark.parametrize("edit, said", [
    ({"preprocess": "fused"}, "'preprocess' is 'fused' but the input is float32 NCHW"),
    ({"input": {"dtype": "uint8"}}, "'preprocess' is 'host' but the input is uint8 NCHW"),
    ({"input": {"dtype": "float16"}}, "'preprocess' is 'host' but the input is float16 NCHW"),
])
def test_a_mod_json_whose_preprocessing_contradicts_its_input_is_refused(edit, said, tiny, photos, tmp_path,
                                                                        capsys):
    """`preprocess: fused` written into a host-preprocessed build's mod.json (was: every image failed with a
    TVM shape error, exit 1); `input.dtype: uint8` there (was: every image failed, `takes uint8 input`)."""
    folder = Path(shutil.copytree(tiny.parent, tmp_path / "edited"))
    meta = json.loads((folder / "mod.json").read_text())
    meta.update({k: {**meta[k], **v} if isinstance(v, dict) else v for k, v in edit.items()})
    (folder / "mod.json").write_text(json.dumps(meta))
    proc = run_main(classification_main, "--file_path", photos, "--model_prefix_path", folder / "mod",
                    "--save_dir", tmp_path / "out", capsys=capsys)
    one_error(proc, "is not a tvmzoo module description", said, "float32 NCHW")
    assert "failed:" not in proc.stderr
