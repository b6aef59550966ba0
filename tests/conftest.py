"""Shared fixtures: the real photos in ../shared/data, and running the real CLIs as a user would."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE_DIR = SHARED_DATA / "imagenet-sample"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """Tests never read or write the user's cache (~/.cache/tvmzoo: the bf16 probe's answers)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield Path(os.environ["XDG_CACHE_HOME"])
    patch.undo()


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"{SAMPLE_DIR} is not here")
    return sorted(SAMPLE_DIR.glob("*.JPEG"))


@pytest.fixture(scope="session")
def serve_repo(tmp_path_factory) -> Path:
    """A model repository for `tvmzoo serve` (tests/serve_client.py names the builds): the tiny model at batch 4
    with host preprocessing, at batch 1 fused, a damaged copy and one built for a CPU feature this host lacks."""
    from serve_client import BROKEN, FUSED, HOST, OTHER_CPU
    from tiny import build_tiny

    root = tmp_path_factory.mktemp("serve")
    build_tiny(root, HOST, resize_short=40, batch=4)
    build_tiny(root, FUSED, resize_short=40, preprocess="fused")
    broken = shutil.copytree(root / "ws" / HOST, root / "ws" / BROKEN)
    data = bytearray((broken / "mod.so").read_bytes())
    data[len(data) // 2] ^= 0xFF               # a damaged copy: the checksum in mod.json no longer fits
    (broken / "mod.so").write_bytes(bytes(data))
    other = shutil.copytree(root / "ws" / FUSED, root / "ws" / OTHER_CPU)   # built for a CPU with a feature
    meta = json.loads((other / "mod.json").read_text())                    # this one lacks
    (other / "mod.json").write_text(json.dumps({**meta, "cpu_features": [*meta["cpu_features"], "avx10_9"]}))
    return root / "ws"


def run_cli(*args: str | os.PathLike, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run an installed console script (tvmzoo, vamc, vamp) or a vendor script path, as a user would."""
    first = str(args[0])
    program = [sys.executable, first] if first.endswith(".py") else [str(Path(sys.executable).parent / first)]
    cmd = [*program, *map(str, args[1:])]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS", "2")})
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def copy_images(paths, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, dest / p.name)) for p in paths]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def write_checkpoint(state: dict[str, np.ndarray], source: str, path: Path) -> Path:
    """The file format each source really ships: PaddleClas .pdparams (pickle of numpy arrays + paddle's
    name table); mmcls .pth (legacy torch pickle wrapped in meta/state_dict); the others (official RepVGG,
    torchvision, pycls) torch.save's zip format."""
    if source == "ppcls":
        table = {k: f"param_{i}" for i, k in enumerate(state)}
        with open(path, "wb") as f:
            pickle.dump({**state, "StructuredToParameterName@@": table}, f, protocol=2)
        return path
    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    if source == "mmcls":
        torch.save({"meta": {"epoch": 120, "mmcls_version": "0.15.0"}, "state_dict": tensors}, path,
                   _use_new_zipfile_serialization=False)
    else:
        torch.save(tensors, path)
    return path


def run_onnx(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The model's 'output' on ONNX Runtime (one thread: the reference, not a speed run)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(["output"], {"input": x})[0]


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def photo_batch(paths, size: int) -> np.ndarray:
    """Real photos resized to size x size, scaled to [-1, 1], NCHW float32."""
    import cv2

    from tvmzoo.preprocess import read_image

    images = [cv2.resize(read_image(p), (size, size), interpolation=cv2.INTER_AREA) for p in paths]
    return np.stack([(im.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1) for im in images])


@pytest.fixture(scope="module")
def photos(sample_images, request) -> np.ndarray:
    """The test module's N_PHOTOS real photos (default 4) at its input SIZE, scaled to [-1, 1], NCHW."""
    return photo_batch(sample_images[:getattr(request.module, "N_PHOTOS", 4)], request.module.SIZE)
