"""Bounded memory and no traceback for every input a user hands us (issue 19, part 1).

Each bomb runs in a child process through the real CLI or reader; the test reads that child's peak RSS
from os.wait4 (its own, not the session's) and asserts it stays under 1 GB. A data-segment limit on the
child keeps a regression from taking the shared machine down with it. docs/reliability.md tables the cases.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.reliability

BIN = Path(sys.executable).parent
GB = 1 << 30
SAFETY = 3 * GB  # RLIMIT_DATA of each child: a regression ends in MemoryError, not in the OOM killer


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (SAFETY, SAFETY))


# The script runs inside this wrapper, which prints the process's own peak (VmHWM) as it exits. ru_maxrss
# of a child would not do: Linux carries the forking parent's peak (this pytest process) into it.
_PEAK = ("import atexit, runpy, sys\n"
         "def peak():\n"
         "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
         "    sys.stderr.write(f'\\npeak_kb {line.split()[1]}\\n')\n"
         "atexit.register(peak)\n"
         "sys.argv = sys.argv[1:]\n"
         "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def measured(*cmd, timeout: float = 600) -> tuple[subprocess.CompletedProcess, int]:
    """Run a console script or a .py script; its result and its peak resident memory in bytes."""
    script = str(cmd[0]) if str(cmd[0]).endswith(".py") else str(BIN / cmd[0])
    args = [sys.executable, "-c", _PEAK, script, *map(str, cmd[1:])]
    env = {**os.environ, "TVM_NUM_THREADS": "2"}
    proc = subprocess.run(args, capture_output=True, env=env, preexec_fn=_limit, timeout=timeout)
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    peaks = [int(line.split()[1]) for line in err.splitlines() if line.startswith("peak_kb ")]
    return subprocess.CompletedProcess(args, proc.returncode, out, err), (peaks[-1] << 10) if peaks else -1


def refused(cmd, *words: str, code: int = 2, prefix: str = "error: ") -> tuple[str, int]:
    """The command ends with one `error:` line (or `prefix` line) holding every word, exit `code`, no
    traceback, no signal, peak memory under 1 GB. Returns the line and the peak."""
    proc, peak = measured(*cmd)
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Fatal Python error" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, proc.stderr[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert peak < GB, f"peak RSS {peak / GB:.2f} GB"
    case = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].removesuffix(" (call)")
    print(f"\npeak RSS {peak >> 20:4d} MB  {case}: ...{errors[0][-100:]}")
    return errors[0], peak


# ---------------------------------------------------------------------------------------------
# checkpoints through `tvmzoo export`
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _export(weights: Path, tmp_path: Path) -> list:
    return ["tvmzoo", "export", "--family", "repvgg", "--arch", "A0", "--source", "official",
            "--weights", weights, "--output", tmp_path / "out.onnx", "--input-size", "32"]


def _view_bomb(kind: str, torch, path: Path) -> int:
    """A small file whose tensors are views; returns the number of the tensor the error must give."""
    legacy = kind.endswith("legacy")
    if kind.startswith("expanded"):              # 4 KB: 400 x 16M-element views of one element (25 GB)
        one = torch.zeros(1)
        state = {f"t{i}": one.expand(1 << 24) for i in range(400)}
        first = 4                               # 256 MB + 2 x file: four 64 MB copies fit
    elif kind.startswith("shared"):             # 300 tensors over one 8 MB storage (2.4 GB)
        base = torch.zeros(2 << 20)
        state = {f"t{i}": base.view(2048, 1024) for i in range(300)}
        first = 33
    elif kind == "overlapping slices":
        base = torch.zeros(2 << 20)
        state = {f"t{i}": base[i:] for i in range(300)}
        first = 33
    elif kind == "transposed":
        base = torch.zeros(2 << 20)
        state = {f"t{i}": base.view(2048, 1024).t() for i in range(300)}
        first = 33
    elif kind == "2-D broadcast":
        one = torch.zeros(1, 1)
        state = {f"t{i}": one.expand(4096, 4096) for i in range(400)}
        first = 4
    elif kind == "bfloat16 shared":              # bfloat16 becomes float32: each copy doubles
        base = torch.zeros(4 << 20, dtype=torch.bfloat16)
        state = {f"t{i}": base.view(2048, 2048) for i in range(300)}
        first = 16
    else:
        raise AssertionError(kind)
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return first


@pytest.mark.parametrize("kind", ["expanded", "expanded legacy", "shared", "shared legacy", "overlapping slices",
                                  "transposed", "2-D broadcast", "bfloat16 shared"])
def test_view_bomb_checkpoint_refused_naming_the_tensor(kind, torch, tmp_path):
    path = tmp_path / "bomb.pth"
    first = _view_bomb(kind, torch, path)
    line, _ = refused(_export(path, tmp_path), "refusing to read checkpoint", str(path), "save real tensors")
    named = int(re.search(r"tensor 't(\d+)': it needs", line).group(1))
    assert first <= named <= first + 1, line     # the zip format also counts the storage it reads
    assert not (tmp_path / "out.onnx").exists()


def test_a_few_shared_views_still_load(torch, tmp_path):
    """Tied weights (views of one storage) within the budget load as before, values and all."""
    from tvmzoo.io.checkpoint import load_state_dict

    base = torch.arange(12, dtype=torch.float32)
    state = {"a": base.view(3, 4), "b": base.view(4, 3).t(), "c": base[2:5], "d": torch.ones(1).expand(5, 5)}
    torch.save(state, tmp_path / "tied.pth")
    got = load_state_dict(tmp_path / "tied.pth")
    for key, tensor in state.items():
        np.testing.assert_array_equal(got[key], tensor.numpy(), err_msg=key)
        assert got[key].flags.writeable and got[key].flags.c_contiguous


def test_deflated_storage_bomb_refused(torch, tmp_path):
    """A zip member that inflates to 512 MB from a 0.5 MB file is refused before it is inflated."""
    path = tmp_path / "deflate.pth"
    torch.save({"w": torch.zeros(4)}, path)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                with out.open(info.filename, "w", force_zip64=True) as member:
                    for _ in range(8):
                        member.write(bytes(64 << 20))
            else:
                out.writestr(info.filename, src.read(info.filename))
    refused(_export(bomb, tmp_path), "refusing to read checkpoint", "storage '0' needs 512.0 MiB")


@pytest.mark.parametrize("arrays, named", [
    ({"w": (80 << 20,)}, "w"),                                       # 320 MB from a 0.3 MB file
    ({"a": (32 << 20,), "b": (32 << 20,), "c": (32 << 20,)}, "c"),  # 128 MB each: the third is over
])
def test_deflated_npz_checkpoint_bomb_refused(arrays, named, tmp_path):
    path = tmp_path / "bomb.npz"
    _deflated_npz(path, arrays, np.float32, held=4 * (next(iter(arrays.values()))[0]))
    refused(_export(path, tmp_path), "refusing to read checkpoint", f"tensor '{named}'", "more than")


def _nested(kind: str, depth: int) -> bytes:
    nest = b")" + b"\x85" * depth                                   # ((((),),),) ... via TUPLE1
    pid = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ"
    return b"\x80\x02" + {
        "dict key": b"}" + nest + b"K\x01s",                            # hashing it overflowed the C stack
        "dict value": b"}X\x01\x00\x00\x00w" + nest + b"s",
        "tensor size": b"}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"K\x00" + nest
                       + b")\x89)tRs",
        "mark tuples": b"(" * (depth // 2) + b")" + b"t" * (depth // 2),
        "lists": b"]" * (depth // 2) + b"a" * (depth // 2 - 1),
        "frozenset of tuples": b"cbuiltins\nfrozenset\n" + nest + b"\x85\x85R",
    }[kind] + b"."


@pytest.mark.parametrize("kind", ["dict key", "dict value", "tensor size", "mark tuples", "lists",
                                  "frozenset of tuples"])
@pytest.mark.parametrize("container", ["zip", "pdparams"])
def test_deeply_nested_pickle_is_a_clean_error(kind, container, tmp_path):
    """1 MB of nested tuples once killed the process with SIGSEGV (C stack overflow while hashing)."""
    data = _nested(kind, 1_000_000)
    path = tmp_path / f"nested.{'pth' if container == 'zip' else 'pdparams'}"
    if container == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", data)
            zf.writestr("archive/data/0", bytes(4))
    else:
        path.write_bytes(data)
    plain_pid = container == "pdparams" and kind == "tensor size"  # refused before its nesting is reached
    refused(_export(path, tmp_path), "cannot read checkpoint",
            "unexpected persistent id" if plain_pid else "nests containers more than 100 deep")


def test_nesting_just_inside_the_bound_still_reads(tmp_path):
    from tvmzoo.io.checkpoint import load_state_dict
    from tvmzoo.limits import MAX_PICKLE_DEPTH

    inner = np.arange(3, dtype=np.float32)
    value: object = "x"
    for _ in range(MAX_PICKLE_DEPTH - 1):             # the dict around it is the last level allowed
        value = (value,)
    path = tmp_path / "deep.pdparams"
    path.write_bytes(pickle.dumps({"w": inner, "meta": value}, protocol=2))
    np.testing.assert_array_equal(load_state_dict(path)["w"], inner)
    path.write_bytes(pickle.dumps({"w": inner, "meta": (value,)}, protocol=2))
    with pytest.raises(Exception, match="nests containers more than"):
        load_state_dict(path)


@pytest.mark.parametrize("where", ["global name", "tensor name", "storage key"])
def test_control_characters_from_a_checkpoint_are_escaped(where, tmp_path, torch):
    path = tmp_path / "evil.pth"
    evil = "\x1b[2J\x1b]0;pwned\x07" + "\u2028"
    if where == "global name":
        path.write_bytes(b"\x80\x02c" + f"os{evil}\nsystem\n".encode() + b")R.")
        words = ["refusing to load", "os\\x1b[2J\\x1b]0;pwned\\x07\\u2028.system"]
    elif where == "tensor name":
        from tvmzoo.models import repvgg

        state = repvgg.random_state_dict("A0", "official", np.random.default_rng(0))
        torch.save({**{k: torch.from_numpy(v) for k, v in state.items()}, f"w{evil}": torch.zeros(1)}, path)
        words = ["unexpected key 'w\\x1b[2J\\x1b]0;pwned\\x07\\u2028'"]
    else:
        key = "\x1b[2J".encode()
        pid = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX" + len(key).to_bytes(4, "little") + key \
            + b"X\x03\x00\x00\x00cpuK\x01tQ"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
                        + pid + b"K\x00K\x01\x85K\x01\x85\x89}tRs.")
        words = ["storage '\\x1b[2J' is missing"]
    line, _ = refused(_export(path, tmp_path), *words)
    proc, _ = measured(*_export(path, tmp_path))
    assert not {"\x1b", "\x07", "\u2028"} & set(proc.stderr), proc.stderr


# ---------------------------------------------------------------------------------------------
# images through image2npz.py: the header is checked before the file is read, the read is bounded
# ---------------------------------------------------------------------------------------------
IMAGE2NPZ = ROOT / "common" / "utils" / "image2npz.py"


def _jpeg_head(width: int, height: int) -> bytes:
    sof = b"\xff\xc0\x00\x11\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big") + b"\x03" + bytes(9)
    return b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + sof


def _png_head(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") \
        + b"\x08\x02\x00\x00\x00"


def _bmp_head(width: int, height: int) -> bytes:
    return b"BM" + bytes(16) + width.to_bytes(4, "little") + height.to_bytes(4, "little") + bytes(28)


def _webp_head(width: int, height: int) -> bytes:
    return b"RIFF\x00\x00\x00\x00WEBPVP8X" + bytes(8) + (width - 1).to_bytes(3, "little") \
        + (height - 1).to_bytes(3, "little")


IMAGE_BOMBS = {  # name: (header, file size, words of the failure)
    "8 GB after a 224x224 JPEG header": (_jpeg_head(224, 224), 8 * GB, "more than a 224x224 image can take"),
    "8 GB after a 224x224 PNG header": (_png_head(224, 224), 8 * GB, "more than a 224x224 image can take"),
    "8 GB after a 224x224 BMP header": (_bmp_head(224, 224), 8 * GB, "more than a 224x224 image can take"),
    "8 GB after a 224x224 WebP header": (_webp_head(224, 224), 8 * GB, "more than a 224x224 image can take"),
    "1.5 GB after a 10000x10000 JPEG header": (_jpeg_head(10000, 10000), 3 * GB // 2,
                                               "more than a 10000x10000 image can take"),
    "JPEG header claiming 20000x20000": (_jpeg_head(20000, 20000), 1 << 20, "above the limit of 100000000 pixels"),
    "8 GB of zeros after a JPEG start": (b"\xff\xd8\xff\xe1\xff\xff", 8 * GB, "without a readable image size"),
    "100 MB of junk after a 5000x5000 JPEG header": (_jpeg_head(5000, 5000), 100 << 20, "corrupt"),
}


@pytest.mark.parametrize("case", list(IMAGE_BOMBS))
def test_image_bomb_fails_with_bounded_memory(case, tmp_path, sample_images):
    head, size, words = IMAGE_BOMBS[case]
    folder = tmp_path / "images"
    folder.mkdir()
    bomb = folder / "bomb.JPEG"
    with open(bomb, "wb") as f:
        f.write(head)
        f.truncate(size)  # sparse: the disk holds the header only
    (folder / sample_images[0].name).write_bytes(sample_images[0].read_bytes())
    datalist = tmp_path / "list.txt"
    line, _ = refused([IMAGE2NPZ, "--dataset_path", folder, "--target_path", tmp_path / "npz",
                       "--text_path", datalist], f"failed: {bomb}: cannot decode", words, code=1, prefix="failed: ")
    assert len(datalist.read_text().splitlines()) == 1   # the good photo is written all the same


def test_exif_before_the_frame_header_is_still_found(tmp_path, sample_images):
    """A JPEG whose frame header comes after 300 KB of APP segments (EXIF, ICC) decodes as before."""
    import cv2

    from tvmzoo.preprocess import read_image

    data = sample_images[0].read_bytes()
    padding = b"".join(b"\xff\xe2\xff\xfe" + bytes(0xFFFC) for _ in range(5))  # 5 x 64 KB APP2 segments
    path = tmp_path / "padded.JPEG"
    path.write_bytes(data[:2] + padding + data[2:])
    np.testing.assert_array_equal(read_image(path), cv2.imread(str(sample_images[0])))


# ---------------------------------------------------------------------------------------------
# label files and npz outputs through vamp_npz_decode.py
# ---------------------------------------------------------------------------------------------
NPZ_DECODE = ROOT / "common" / "eval" / "vamp_npz_decode.py"


def _decode_setup(tmp_path: Path, classes: int = 10) -> tuple[Path, Path]:
    """A datalist of two inputs and their vamp outputs (scores of `classes` classes)."""
    from tvmzoo.run.npz import output_path, save_npz

    items = [tmp_path / "npz" / "a.npz", tmp_path / "npz" / "b.npz"]
    datalist = tmp_path / "list.txt"
    datalist.write_text("".join(f"{p}\n" for p in items))
    out = tmp_path / "out"
    for i, item in enumerate(items):
        save_npz(output_path(out, i, item), output_0=np.eye(classes, dtype=np.float32)[i][None])
    return datalist, out


def test_npz_decode_with_good_labels(tmp_path):
    datalist, out = _decode_setup(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text(repr({i: f"class {i}" for i in range(10)}))
    proc, _ = measured(NPZ_DECODE, datalist, out, tmp_path / "result.txt", labels)
    assert proc.returncode == 0, proc.stderr
    assert "class name: class 1" in (tmp_path / "result.txt").read_text()


LABEL_BOMBS = {  # name: (file content or a size to make a sparse file of, words)
    "class 1,000,000,000": ("{1000000000: 'x'}", ["indices must be 0..0 without gaps", "largest given is 1000000000"]),
    "class 10**18 after class 0": ("{0: 'a', 1000000000000000000: 'b'}", ["0..1 without gaps", "missing e.g. [1]"]),
    "class -1": ("{-1: 'a'}", ["0..0 without gaps", "largest given is -1"]),
    "a billion as a string key": ("{'1000000000': 'x'}", ["expected a dict of class index -> name"]),
    "1,000,001 lines": ("x\n" * 1_000_001, ["names 1000001 classes, above the limit of 1000000"]),
    "100 MB file": (100 << 20, ["is 100.0 MiB, above the limit of 64.0 MiB"]),
    "nested 100000 deep": ("{0: " + "(" * 100_000 + ")" * 100_000 + "}", ["line 1: expected a dict of class"]),
    "1,000,001 entries as a dict (13 MB; the whole-file parse took 2.1 GB)": (
        "{" + ",\n".join(f"{i}: 'class {i}'" for i in range(1_000_001)) + "}",
        ["names 1000001 classes, above the limit"]),
    "dict not closed": ("{0: 'a',\n1: 'b'\n", ["does not close it with '}'"]),
    "code instead of a name": ("{0: 'a',\n1: __import__('os').system('true')}", ["line 2: expected a dict"]),
}


@pytest.mark.parametrize("case", list(LABEL_BOMBS))
def test_label_bomb_is_one_clear_error(case, tmp_path):
    content, words = LABEL_BOMBS[case]
    datalist, out = _decode_setup(tmp_path)
    labels = tmp_path / "labels.txt"
    if isinstance(content, int):
        with open(labels, "wb") as f:
            f.truncate(content)
    else:
        labels.write_text(content)
    refused([NPZ_DECODE, datalist, out, tmp_path / "result.txt", labels], str(labels), *words)
    assert not (tmp_path / "result.txt").exists()


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _damage_output(kind: str, path: Path) -> list[str]:
    if kind == "random bytes":
        path.write_bytes(os.urandom(300))
        return ["not a readable npz", "BadZipFile"]
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:150])
        return ["not a readable npz"]
    if kind == "key missing":
        np.savez(path, logits=np.zeros((1, 10), np.float32))
        return ["has no array 'output_0' (arrays: logits)"]
    if kind == "object array":
        np.savez(path, output_0=np.array([{"a": 1}], dtype=object))
        return ["holds Python objects"]
    if kind == "header claims 40 GB":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("output_0.npy", _npy_header((100_000, 100_000)) + bytes(64))
        return ["float32 of shape (100000, 100000), not the scores of up to 1000000 classes"]
    if kind == "header claims more than held":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("output_0.npy", _npy_header((1, 4000)) + bytes(64))
        return ["needs 16000 bytes, the file holds"]
    if kind == "2M scores, deflated":
        np.savez_compressed(path, output_0=np.zeros((1, 2_000_000), np.float32))
        return ["not the scores of up to 1000000 classes"]
    if kind == "other width":
        np.savez(path, output_0=np.zeros((1, 7), np.float32))
        return ["holds 7 scores", "holds 10", "different models"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["random bytes", "truncated", "key missing", "object array", "header claims 40 GB",
                                  "header claims more than held", "2M scores, deflated", "other width"])
def test_corrupt_output_npz_is_one_clear_error(kind, tmp_path):
    from tvmzoo.run.npz import output_path

    datalist, out = _decode_setup(tmp_path)
    damaged = output_path(out, 1, Path(datalist.read_text().splitlines()[1]))
    words = _damage_output(kind, damaged)
    refused([NPZ_DECODE, datalist, out, tmp_path / "result.txt"], str(damaged), *words)
    assert not (tmp_path / "result.txt").exists()


def test_datalist_not_utf8_is_read_and_its_output_named(tmp_path):
    datalist, out = _decode_setup(tmp_path)
    datalist.write_bytes(b"\xff\xfe/x.npz\n")
    refused([NPZ_DECODE, datalist, out, tmp_path / "result.txt"], "missing output", "for datalist line 1")


# ---------------------------------------------------------------------------------------------
# vamp: sizes checked against the module and the memory available; mod.json read defensively
# ---------------------------------------------------------------------------------------------
from test_reliability import compiled, root, run_main, tiny_onnx  # noqa: E402,F401  (module fixtures)


@pytest.mark.parametrize("args, words", [
    (["-b", "0"], ["-b/--batch must be an integer >= 1, got 0"]),
    (["-b", "-1"], ["-b/--batch must be an integer >= 1, got -1"]),
    (["-i", "0"], ["-i/--instance must be an integer >= 1, got 0"]),
    (["--iterations", "0"], ["--iterations must be an integer >= 1, got 0"]),
    (["--iterations", "-5"], ["--iterations must be an integer >= 1"]),
    (["--warmup", "-1"], ["--warmup must be an integer >= 0, got -1"]),
    (["-t", "0"], ["-t/--threads must be an integer >= 1, got 0"]),
    (["-s", "[3,0,224]"], ["-s/--shape must be three sizes >= 1 (C,H,W), got 3,0,224"]),
    (["-s", "0"], ["-s/--shape must be three sizes >= 1", "got 3,0,0"]),
    (["-s", "3,32,32,1"], ["-s/--shape must be three sizes"]),
    (["-s", "3,224,224"], ["-s/--shape 3,224,224 does not match the module, which takes 3,32,32"]),
    (["-b", "1000000"], ["batch 1000000 of 3x32x32 float32 inputs needs 22.9 GiB", "use a smaller -b/--batch"]),
    (["-b", "100000000"], ["batch 100000000 of 3x32x32 float32 inputs needs", "use a smaller -b/--batch"]),
    (["-b", "1000000", "-s", "3,224,224"], ["does not match the module"]),
])
def test_vamp_sizes_are_checked_first(args, words, compiled):
    refused(["vamp", "-m", compiled / "mod", "--warmup", "0", "--iterations", "2", *args], *words)


def test_vamp_datalist_batch_checked(compiled, tmp_path):
    datalist = tmp_path / "list.txt"
    datalist.write_text(f"{tmp_path / 'never_read.npz'}\n")  # -b is refused before any npz is read
    refused(["vamp", "-m", compiled / "mod", "--datalist", datalist, "--path_output", tmp_path / "out", "-b", "0"],
            "-b/--batch must be an integer >= 1, got 0")


def test_vamp_runs_on_the_module_shape_by_default(compiled):
    proc, peak = measured("vamp", "-m", compiled / "mod", "--warmup", "0", "--iterations", "2", "-b", "3")
    assert proc.returncode == 0, proc.stderr
    assert "batch size: 3" in proc.stdout and "samples: 6" in proc.stdout


def _deflated_npz(path: Path, arrays: dict[str, tuple[int, ...]], dtype=np.uint8, held: int = 64 << 20) -> None:
    """An npz whose arrays claim `arrays` shapes, each holding `held` bytes of deflated zeros."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, shape in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                member.write(_npy_header(shape, np.dtype(dtype).str))
                for _ in range(held >> 24):
                    member.write(bytes(16 << 20))


@pytest.mark.parametrize("kind, words", [
    ("20000x20000 claimed", ["40000x20000 pixels is above the limit"]),
    ("8000x8000 claimed, 64 MB held", ["needs 192000000 bytes, the file holds 67108992"]),
    ("float64 input", ["'input_0' is float64 of shape (3, 32, 32)"]),
    ("random bytes", ["not a readable npz"]),
])
def test_vamp_datalist_bad_input_npz(kind, words, compiled, tmp_path):
    item = tmp_path / "a.npz"
    if kind == "20000x20000 claimed":
        _deflated_npz(item, {"input_0": (3, 20000, 40000)})
    elif kind == "8000x8000 claimed, 64 MB held":
        _deflated_npz(item, {"input_0": (3, 8000, 8000)})
    elif kind == "float64 input":
        np.savez(item, input_0=np.zeros((3, 32, 32)))
    else:
        item.write_bytes(os.urandom(1000))
    datalist = tmp_path / "list.txt"
    datalist.write_text(f"{item}\n")
    refused(["vamp", "-m", compiled / "mod", "--datalist", datalist, "--path_output", tmp_path / "out"],
            f"cannot read {item}", *words)


META_CASES = {
    "shape of strings": (lambda m: m["input"].update(shape=["1", "3", "32", "32"]), "'input.shape' must be four"),
    "shape of booleans": (lambda m: m["input"].update(shape=[True, 3, 32, 32]), "'input.shape' must be four"),
    "negative size": (lambda m: m["input"].update(shape=[1, 3, -32, 32]), "three sizes >= 1"),
    "symbolic batch": (lambda m: m["input"].update(shape=[-1, 3, 32, 32]), "vamc compile fixes the batch"),
    "unknown dtype": (lambda m: m["input"].update(dtype="float33"), "'input.dtype' must be a numeric dtype"),
    "dtype a list": (lambda m: m["input"].update(dtype=[1]), "'input.dtype' must be a numeric dtype"),
    "cpu feature a number": (lambda m: m.update(cpu_features=[1]), "'cpu_features' must be a list of strings"),
    "checksum a number": (lambda m: m.update(module_sha256=5), "'module_sha256' must be a str"),
    "tvm version a list": (lambda m: m.update(tvm_version=[0, 27]), "'tvm_version' must be a str"),
    "preprocessing a string": (lambda m: m.update(preprocessing="x"), "'preprocessing' must be a dict"),
    "preprocessing unknown key": (lambda m: m["preprocessing"].update(bogus=1), "'preprocessing': "),
    "preprocessing bad size": (lambda m: m["preprocessing"].update(resize="ab"), "'preprocessing': "),
    "nested 100000 deep": (lambda m: m.update(extra="NEST"), "nests 100001 levels deep, above the limit of 64"),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_mod_json_with_wrong_types(case, compiled, tmp_path, capsys):
    import shutil

    from tvmzoo.cli import vamp_main

    change, words = META_CASES[case]
    directory = tmp_path / "tiny"
    shutil.copytree(compiled, directory)
    meta = json.loads((directory / "mod.json").read_text())
    change(meta)
    text = json.dumps(meta).replace('"NEST"', "[" * 100_000 + "]" * 100_000)
    (directory / "mod.json").write_text(text)
    proc = run_main(vamp_main, "-m", directory / "mod", "--iterations", "1", "--warmup", "0", capsys=capsys)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and words in proc.stderr and "recompile" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# nesting: build YAML through vamc, vdsp JSON through classification.py
# ---------------------------------------------------------------------------------------------
YAML_NESTS = {
    "flow lists 100000 deep": "name: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "flow mappings 5000 deep": "name: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
    "block lists 3000 deep": "name:\n" + "".join("  " * i + "-\n" for i in range(1, 3000)),
    "block mappings 3000 deep": "name:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 3000)),
    "65 levels": "name: " + "[" * 64 + "]" * 64 + "\n",
}


@pytest.mark.parametrize("case", list(YAML_NESTS))
def test_deep_yaml_is_one_clear_error(case, tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text(YAML_NESTS[case])
    refused(["vamc", "compile", path], str(path), "nested more than 64 levels deep")


def test_deep_set_value_is_one_clear_error(tmp_path):
    path = tmp_path / "any.yaml"
    path.write_text("name: x\n")
    refused(["vamc", "compile", path, "--set", "frontend.shape.input=" + "[" * 30_000 + "]" * 30_000],
            "frontend.shape.input", "expected a list, got a string")


def test_yaml_within_the_nesting_bound_reaches_the_schema(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("name: " + "[" * 63 + "]" * 63 + "\n")
    line, _ = refused(["vamc", "compile", path], str(path), "name")
    assert "nested more than" not in line                     # a schema error, not a nesting one


VDSP_NESTS = {
    "lists 100000 deep": "[" * 100_000 + "]" * 100_000,
    "objects 10000 deep": '{"a": ' * 10_000 + "1" + "}" * 10_000,
    "deep inside OpConfig": '{"OpType": "x", "OpConfig": ' + "[" * 5000 + "]" * 5000 + "}",
}


@pytest.mark.parametrize("case", list(VDSP_NESTS))
def test_deep_vdsp_json_is_one_clear_error(case, compiled, tmp_path, sample_images):
    path = tmp_path / "vdsp.json"
    path.write_text(VDSP_NESTS[case])
    refused([ROOT / "common" / "vsx" / "classification.py", "--file_path", sample_images[0], "--model_prefix_path",
             compiled / "mod", "--vdsp_params_info", path, "--save_dir", tmp_path], str(path),
            "levels deep, above the limit of 64")
    assert not (tmp_path / "result.txt").exists()


def test_brackets_inside_json_strings_are_not_nesting():
    from tvmzoo.limits import json_depth

    assert json_depth('{"a": "[[[[{{{{\\"]]", "b": [1, {"c": []}]}') == 4
