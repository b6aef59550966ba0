"""Winograd F(2x2, 3x3) against ONNX Runtime's direct convolution, on real photos."""
from __future__ import annotations

import os

import cv2
import numpy as np
import onnx
import pytest
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import from_onnx

from tests.conftest import rel_err, run_onnx
from tvmzoo.io.onnx_graph import GraphBuilder
from tvmzoo.compile.pipeline import get_pipeline
from tvmzoo.compile.target import resolve_target
from tvmzoo.compile.passes.winograd import MIN_CHANNELS

os.environ.setdefault("TVM_NUM_THREADS", "2")
SHAPE = (2, 3, 29, 27)  # two photos; odd, non-square sizes: the last row / column of tiles is cut


def _w(rng, *shape):
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def net() -> onnx.ModelProto:
    """stem (3 channels: direct), two Winograd convs (padding 1, then 0), a stride-2 conv (direct)."""
    rng = np.random.default_rng(0)
    c = MIN_CHANNELS
    g = GraphBuilder("winograd")
    x = g.relu(g.conv(g.input(list(SHAPE)), _w(rng, c, 3, 3, 3), _w(rng, c), "stem"))
    x = g.relu(g.conv(x, _w(rng, c, c, 3, 3), _w(rng, c), "same"))
    x = g.relu(g.conv(x, _w(rng, c + 16, c, 3, 3), _w(rng, c + 16), "valid", pads=(0, 0, 0, 0)))
    x = g.conv(x, _w(rng, 32, c + 16, 3, 3), _w(rng, 32), "down", stride=2)
    g.output(x, [SHAPE[0], 32, 14, 13])
    return g.build()


@pytest.fixture(scope="module")
def photos(sample_images) -> np.ndarray:
    images = [cv2.imread(str(p))[:, :, ::-1] for p in sample_images[:SHAPE[0]]]
    x = np.stack([cv2.resize(im, SHAPE[:1:-1], interpolation=cv2.INTER_AREA) for im in images])
    return np.ascontiguousarray(((x / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).astype(np.float32))


@pytest.fixture(scope="module", params=["static batch", "dynamic batch"])
def built(request):
    model = net()
    target = tvm.target.Target(resolve_target(None))
    batch = SHAPE[0] if request.param == "static batch" else tirx.Var("N", "int64")
    mod = from_onnx(model, shape_dict={"input": [batch, *SHAPE[1:]]}, keep_params_in_input=False)
    return model, get_pipeline(target)(mod), target


def test_winograd_matches_onnxruntime_on_photos(built, photos):
    model, mod, target = built
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(photos)).numpy()
    ref = run_onnx(model, photos)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5
    for i in range(SHAPE[0]):  # each image from its own tiles
        assert rel_err(out[i], ref[i]) < 1e-5


def test_winograd_only_where_it_applies(built):
    """The two stride-1 convs with enough channels; not the RGB stem, not the stride-2 conv."""
    _, mod, _ = built
    names = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len([n for n in names if n.startswith("winograd_input")]) == 2, names
    assert len([n for n in names if "winograd_output" in n]) == 2, names
    assert len([n for n in names if "conv2d" in n]) == 2, names
