"""`tvmzoo reparam`: deploy checkpoints in each source's own format, checked with the sources' own code
(DingXiaoH's repvgg.py from PyPI `repvgg-pytorch`, torch.load(weights_only=True), the plain unpickler
paddle.load uses) on real photos."""
from __future__ import annotations

import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_DIR, rel_err, run_cli, write_checkpoint
from tvmzoo import preprocess
from tvmzoo.io.checkpoint import load_state_dict
from tvmzoo.models.export import ExportSpec, build_deploy_onnx
from tvmzoo.io.pdparams_writer import NAME_TABLE, save_pdparams
from tvmzoo.io.pth_writer import ALIGNMENT, save_torch
from tvmzoo.models import repvgg
from tvmzoo.models.reparam import ReparamSpec, write_deploy_checkpoint

torch = pytest.importorskip("torch")


def _odd_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "bn.num_batches_tracked": np.array(7, np.int64),             # 0-d
            "half": rng.standard_normal(5).astype(np.float16),
            "empty": np.zeros((0, 3), np.float32),
            "transposed": rng.standard_normal((3, 4)).astype(np.float32).T,  # not C-contiguous
            "mask": np.array([True, False]), "bytes": np.arange(3, dtype=np.uint8)}


def test_pth_writer_loads_in_torch_weights_only(tmp_path):
    state = _odd_arrays(np.random.default_rng(0))
    path = tmp_path / "w.pth"
    save_torch({"meta": {"epoch": 3, "names": ["a", "b"]}, "state_dict": state}, path)
    for mmap in (False, True):   # mmap needs every storage aligned as torch aligns it
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert loaded["meta"] == {"epoch": 3, "names": ["a", "b"]}
        for key, value in state.items():
            got = loaded["state_dict"][key]
            assert got.shape == value.shape and got.numpy().dtype == value.dtype, key
            np.testing.assert_array_equal(got.numpy(), value)
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            assert (info.header_offset + 30 + name_len + extra_len) % ALIGNMENT == 0, info.filename
    ours = load_state_dict(path)
    assert all(np.array_equal(ours[k], v) for k, v in state.items())


def test_pdparams_writer_is_a_plain_numpy_pickle(tmp_path):
    state = _odd_arrays(np.random.default_rng(1))
    path = tmp_path / "w.pdparams"
    save_pdparams(state, path)
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 reads numpy.core through an alias
        loaded = pickle.load(f)   # what paddle.load does with a .pdparams (numpy arrays, name table)
    assert loaded[NAME_TABLE] == {k: k for k in state}
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value)


# ---------------------------------------------------------------- official: DingXiaoH's own model code

def _photos(size: int, count: int = 2) -> np.ndarray:
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"{SAMPLE_DIR} is not here")
    pre = preprocess.Preprocessing(resize_hw=(size + size // 7, size + size // 7), keep_aspect=True,
                                   crop_hw=(size, size))
    paths = sorted(SAMPLE_DIR.glob("*.JPEG"))[:: 250][:count]
    return preprocess.batch(pre, [preprocess.read_image(p) for p in paths])


@pytest.mark.parametrize("arch, size", [("A0", 64), ("B1g2", 48), ("D2se", 32)])
def test_official_deploy_checkpoint_loads_strict_in_dingxiaoh_code(tmp_path, arch, size):
    """Real archs (strict loading needs them), random weights and BN statistics, small photos."""
    official = pytest.importorskip("repvgg_pytorch.repvgg", reason="pip install repvgg-pytorch (test extra)")
    train = official.get_RepVGG_func_by_name(f"RepVGG-{arch}")(deploy=False).eval()
    state = repvgg.random_state_dict(arch, "official", np.random.default_rng(2))
    train.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    torch.save(train.state_dict(), tmp_path / "train.pth")

    if arch == "A0":   # the command line once; the library call for the big ones
        run_cli("tvmzoo", "reparam", "--family", "repvgg", "--arch", arch, "--source", "official",
                "--weights", tmp_path / "train.pth", "--output", tmp_path / "deploy.pth")
    else:
        write_deploy_checkpoint(ReparamSpec("repvgg", arch, "official", str(tmp_path / "train.pth")),
                                tmp_path / "deploy.pth")
    deploy = official.get_RepVGG_func_by_name(f"RepVGG-{arch}")(deploy=True).eval()
    deploy.load_state_dict(torch.load(tmp_path / "deploy.pth", weights_only=True), strict=True)

    x = torch.from_numpy(_photos(size))
    with torch.no_grad():
        expected, got = train(x).numpy(), deploy(x).numpy()
    assert rel_err(got, expected) < 1e-5
    assert (tmp_path / "deploy.pth").stat().st_size < (tmp_path / "train.pth").stat().st_size


# ---------------------------------------------------------------- mmcls / ppcls: names, shapes, values

_MMCLS_NAMES = (("stage0", "backbone.stem"), ("rbr_dense", "branch_3x3"), ("rbr_1x1", "branch_1x1"),
                ("rbr_identity", "branch_norm"), (".bn.", ".norm."), ("se.down", "se_layer.conv1.conv"),
                ("se.up", "se_layer.conv2.conv"), ("rbr_reparam", "branch_reparam"), ("linear", "head.fc"))


def _rename(key: str, source: str) -> str:
    """An official key in the mmcls / ppcls layout (written out here, independently of tvmzoo's tables)."""
    if source == "ppcls":
        return key.replace("running_mean", "_mean").replace("running_var", "_variance")
    for stage in range(1, 5):
        if key.startswith(f"stage{stage}."):
            key = f"backbone.stage_{stage}." + key[len(f"stage{stage}."):]
    for old, new in _MMCLS_NAMES:
        key = key.replace(old, new)
    return key


def _in_layout(state: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        if source == "ppcls" and key.endswith("num_batches_tracked"):
            continue
        new = _rename(key, source)
        out[new] = value.T.copy() if source == "ppcls" and key == "linear.weight" else value
    return out


@pytest.mark.parametrize("source", ["mmcls", "ppcls"])
def test_mmcls_ppcls_deploy_files_match_dingxiaoh_reparameterization(tmp_path, source):
    """The reference: DingXiaoH's repvgg_model_convert (torch, float32) on the same weights."""
    official = pytest.importorskip("repvgg_pytorch.repvgg", reason="pip install repvgg-pytorch (test extra)")
    arch = "D2se" if source == "mmcls" else "A0"   # mmcls: SE names too
    train = official.get_RepVGG_func_by_name(f"RepVGG-{arch}")(deploy=False).eval()
    state = repvgg.random_state_dict(arch, "official", np.random.default_rng(3))
    train.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    reference = {k: v.numpy() for k, v in official.repvgg_model_convert(train).state_dict().items()}
    reference = _in_layout(reference, source)

    weights = write_checkpoint(_in_layout(state, source), source, tmp_path / f"train.{source}")
    out = tmp_path / ("deploy.pdparams" if source == "ppcls" else "deploy.pth")
    run_cli("tvmzoo", "reparam", "--family", "repvgg", "--arch", arch, "--source", source,
            "--weights", weights, "--output", out)
    if source == "mmcls":
        raw = torch.load(out, weights_only=True)
        assert set(raw) == {"meta", "state_dict"} and raw["meta"]["reparameterized"] is True
        assert raw["meta"]["epoch"] == 120 and raw["meta"]["mmcls_version"] == "0.15.0"   # the input's meta kept
        written = {k: v.numpy() for k, v in raw["state_dict"].items()}
    else:
        with open(out, "rb") as f:
            written = pickle.load(f)
        assert set(written.pop(NAME_TABLE)) == set(written)
    assert set(written) == set(reference)
    assert set(written) == set(repvgg.expected_shapes(arch, source, 1000, deploy=True))
    for key, value in reference.items():
        assert written[key].shape == value.shape and written[key].dtype == np.float32, key
        np.testing.assert_allclose(written[key], value, rtol=1e-5, atol=1e-6 * np.abs(value).max(), err_msg=key)


# ---------------------------------------------------------------- export: deploy file == train file

@pytest.mark.parametrize("source", repvgg.SOURCES)
def test_export_of_deploy_checkpoint_is_identical(tmp_path, source):
    """Folding runs in float64 and is rounded to float32 once, in both routes: the deploy file holds
    exactly the float32 kernels the train route puts into the ONNX, so the models are byte-identical."""
    state = repvgg.random_state_dict("A0", source, np.random.default_rng(4))
    train = write_checkpoint(state, source, tmp_path / f"train.{source}")
    deploy = write_deploy_checkpoint(ReparamSpec("repvgg", "A0", source, str(train)), tmp_path / f"d.{source}")
    onnx_train = build_deploy_onnx(ExportSpec("repvgg", "A0", source, str(train)))
    onnx_deploy = build_deploy_onnx(ExportSpec("repvgg", "A0", source, str(deploy)))
    assert onnx_train.SerializeToString() == onnx_deploy.SerializeToString()


def _refused(tmp_path, family, state, arch, source="pycls"):
    """`tvmzoo reparam` on a checkpoint it must refuse: exit 2, no traceback, nothing written."""
    weights = write_checkpoint(state, source, tmp_path / "train.pth")
    out = tmp_path / "deploy.pth"
    proc = run_cli("tvmzoo", "reparam", "--family", family, "--arch", arch, "--source", source,
                   "--weights", weights, "--output", out, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".deploy*"))
    return proc.stderr


def test_regnet_says_no_source_has_a_deploy_form(tmp_path):
    from tvmzoo.models import regnet

    err = _refused(tmp_path, "regnet", regnet.random_state_dict("200MF", "pycls", np.random.default_rng(5)), "200MF")
    assert "no deploy checkpoint form" in err and "tvmzoo export" in err


def test_bad_checkpoint_leaves_no_output(tmp_path):
    state = repvgg.random_state_dict("A0", "official", np.random.default_rng(6))
    err = _refused(tmp_path, "repvgg", state, "B0", source="official")
    assert "does not fit RepVGG-B0" in err and "RepVGG-A0" in err
