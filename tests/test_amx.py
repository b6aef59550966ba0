"""AMX tiles: which CPUs get them (on paper, from LLVM's own CPU tables), the int8 kernels on real photos
(bit-identical to the VNNI kernels, close to ONNX Runtime's QDQ reference) where the host has AMX-INT8,
and the runtime's AMX permission (a module with AMX kernels runs in a fresh process through the loader)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.frontend.onnx import from_onnx

from conftest import cosine
from tvmzoo.compile.cpu import features_of
from tvmzoo.compile.passes.amx_tasks import LAUNCH_POINT, _chunk
from tvmzoo.compile.pipeline import _sequence, get_pipeline, phases
from tvmzoo.compile.precision import fastest_precisions
from tvmzoo.compile.schedules import amx
from tvmzoo.compile.schedules.base import NotApplicable
from tvmzoo.compile.schedules.int8_amx import choose_tiles
from tvmzoo.config import PRECISIONS, Quantize
from tvmzoo.io.onnx_graph import GraphBuilder
from tvmzoo.run.host import host_cpu_flags

os.environ.setdefault("TVM_NUM_THREADS", "2")
SIZE, BATCH, N_PHOTOS = 32, 4, 12
HAS_AMX_INT8 = "amx_int8" in host_cpu_flags()
needs_amx_int8 = pytest.mark.skipif(not HAS_AMX_INT8, reason="host CPU has no AMX-INT8 (tdpbusd)")
# every CPU kind the code must serve: Sapphire Rapids (AMX), Zen 4 and Ice Lake (VNNI, no AMX), AVX2 only
CPUS = {"sapphirerapids": "tdpbusd", "znver4": "vpdpbusd", "icelake-server": "vpdpbusd", "haswell": None}
NO_AMX = ["-amx-int8", "-amx-tile", "-amx-bf16"]
LAYERS = [("stem", 16, 3, 1), ("down", 32, 3, 2), ("pw", 32, 1, 1), ("c48", 48, 3, 1), ("c24", 24, 3, 1),
          ("c96", 96, 3, 2), ("c96b", 96, 3, 1)]


def _w(rng, *shape):
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def amx_net() -> onnx.ModelProto:
    """Convs whose shapes take each kind of AMX macro tile (stride 2 on 2 x 2 tiles, three channel tiles,
    three 8-channel tiles, 2 x 2 tiles of 4 pixels, a pad of 96 channels: wider than a register) or are too
    shallow for it (the RGB stem, 4 channels after padding; a 1x1 of 32 channels); GAP and a Gemm (4 rows
    at batch 4)."""
    rng = np.random.default_rng(5)
    g = GraphBuilder("amx")
    x, cin = g.input([BATCH, 3, SIZE, SIZE]), 3
    for name, cout, kernel, stride in LAYERS:
        y = g.conv(x, _w(rng, cout, cin, kernel, kernel), _w(rng, cout), name, stride=stride)
        x, cin = (g.add(x, y) if name == "pw" else g.relu(y)), cout  # pw: a residual add in the epilogue
    x = g.flatten(g.global_avg_pool(x))
    g.output(g.gemm(x, _w(rng, 16, cin), _w(rng, 16), "fc"), [BATCH, 16])
    return g.build()


@pytest.fixture(scope="module")
def qdq(photos) -> onnx.ModelProto:
    from tvmzoo.compile.quant.quantize import quantize_model

    return quantize_model(amx_net(), [photos[i:i + BATCH] for i in range(4, 12, BATCH)],
                          Quantize(keep_first_last_float=False))


def _scheduled(qdq: onnx.ModelProto, target: tvm.target.Target) -> tvm.IRModule:
    return get_pipeline(target, "int8")(from_onnx(qdq, shape_dict={"input": [BATCH, 3, SIZE, SIZE]},
                                                  keep_params_in_input=False))


def _dots(mod: tvm.IRModule) -> dict[str, str]:
    """Kernel name -> the dot instruction its TIR calls ("" for none)."""
    found = {}
    for gv, f in mod.functions_items():
        if isinstance(f, tirx.PrimFunc):
            text = f.script()
            found[gv.name_hint] = next((d for d in ("tdpbusd", "vpdpbusd") if d in text), "")
    return found


# ---------------------------------------------------------------- on paper


@pytest.mark.parametrize("rows, channels, k, stride, taps, expected", [
    (56, 192, 192, 1, 9, (14, 2, 2, 64, 16)),  # RepVGG-A0 stage 3: 2 x 2 tiles of 14 pixels
    (7, 1280, 192, 2, 9, (7, 1, 4, 64, 16)),   # its last conv: one row tile of 7, four channel tiles
    (112, 48, 48, 2, 9, (16, 1, 3, 48, 16)),   # 48 channels: three channel tiles, a 48-byte K chunk
    (28, 144, 96, 1, 1, (14, 1, 3, 48, 16)),   # EfficientNet-Lite0's 1x1 24 -> 144 at batch 4 (96 deep: AMX)
    (56, 24, 144, 1, 1, (14, 1, 3, 48, 8)),    # its 144 -> 24 projection: three half-width (8-channel) tiles
])
def test_macro_tile_per_shape(rows, channels, k, stride, taps, expected):
    shape = choose_tiles(amx.INT8, rows, channels, k, stride, taps * k)
    assert (shape.rows, shape.m, shape.n, shape.k, shape.lanes) == expected
    assert shape.m * shape.n + shape.m + 1 <= amx.MAX_TILES and rows % (shape.m * shape.rows) == 0


@pytest.mark.parametrize("rows, height, across, channels, k, expected", [
    (14, 14, 1, 192, 192, (14, 2, 2, 1)),  # RepVGG-A0 stage 3: two whole image rows x 2 channel tiles, not 1 x 4
    (14, 14, 2, 192, 96, (14, 2, 2, 2)),   # its stride-2 entry: the A tiles two input rows apart
    (14, 14, 1, 112, 480, (14, 2, 1, 1)),  # Lite0's 480 -> 112 (7 channel tiles): two rows, not 2 tiles of 7 pixels
    (28, 28, 1, 96, 96, (14, 2, 2, 0)),    # 28 pixels: 2 x 2 within the row as before (as large, as few loads)
    (7, 7, 1, 1280, 192, (7, 1, 4, 0)),    # an odd height: within the row
])
def test_macro_tile_across_image_rows(rows, height, across, channels, k, expected):
    shape = choose_tiles(amx.INT8, rows, channels, k, across, 9 * k, height=height, across=across)
    assert (shape.rows, shape.m, shape.n, shape.across) == expected
    assert shape.m * shape.n + shape.m + 1 <= amx.MAX_TILES
    assert height % shape.m == 0 if shape.across else rows % (shape.m * shape.rows) == 0


@pytest.mark.parametrize("rows, channels, k, depth", [(1, 1024, 1280, 1280), (56, 20, 96, 96), (56, 32, 6, 54),
                                                     (112, 96, 16, 16), (112, 32, 4, 36)])
def test_shapes_amx_cannot_hold_or_that_do_not_pay_go_to_the_next_rule(rows, channels, k, depth):
    """A batch-1 matmul (1 row), 20 channels (not 8 x n), 6 input channels (not 4 x n); a 1x1 conv
    of 16 input channels and a 4-channel stem: too shallow for int8 tiles (measured slower than VNNI)."""
    with pytest.raises(NotApplicable):
        choose_tiles(amx.INT8, rows, channels, k, 1, depth)


def test_bf16_tiles_take_half_the_channels_per_row():
    assert choose_tiles(amx.BF16, 56, 192, 192, 1).k == 32  # 64 bytes of bf16


@pytest.mark.parametrize("cpu", CPUS)
def test_int8_kernels_per_cpu(cpu, qdq):
    """AMX where the CPU has AMX-INT8, VNNI where it has only that, neither on AVX2; the precision list
    names what makes int8 fast there."""
    dots = _dots(_scheduled(qdq, tvm.target.Target({"kind": "llvm", "mcpu": cpu})))
    convs = {name: dot for name, dot in dots.items() if "conv2d" in name}
    assert len(convs) == len(LAYERS), dots
    if CPUS[cpu] == "tdpbusd":  # the stem (9 x 4 deep) and pw (32 deep) too shallow for int8 tiles: VNNI
        assert sorted(convs.values()) == ["tdpbusd"] * 5 + ["vpdpbusd"] * 2, convs
    else:
        assert set(dots.values()) <= {CPUS[cpu] or "", ""} and set(convs.values()) == {CPUS[cpu] or ""}, dots
    ranked = dict(fastest_precisions(features_of(cpu), PRECISIONS))
    assert ranked.get("int8") == {"tdpbusd": "AMX-INT8", "vpdpbusd": "AVX512-VNNI", None: None}[CPUS[cpu]]


def test_amx_off_in_the_target_means_vnni(qdq):
    target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "mattr": NO_AMX})
    convs = {n: d for n, d in _dots(_scheduled(qdq, target)).items() if "conv2d" in n}
    assert set(convs.values()) == {"vpdpbusd"}, convs


def test_pads_wider_than_a_register_compile_to_vectors(qdq):
    """The conv kernels' pads (96 uint8 channels in c96b) load and store whole vectors: as one vector
    over all the channels LLVM moved them byte by byte (vpextrb / vpinsrb). Nor do the VNNI convs'
    requantizing epilogues (stem, pw: 16 / 32 channels): as a loop over the tile's rows LLVM vectorized
    them across the rows, gathering the accumulators and storing byte by byte."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
    mod = _scheduled(qdq, target)
    convs = {gv.name_hint: f for gv, f in mod.functions_items()
             if isinstance(f, tirx.PrimFunc) and "conv2d" in gv.name_hint}
    assert sum("pad_temp" in f.script() for f in convs.values()) >= 4, list(convs)
    assert sum("ScheduleInt8Dot" in f.script() for f in convs.values()) == 2, list(convs)
    for name, f in convs.items():
        asm = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target).mod
        text = asm.inspect_source("asm")
        assert not re.search(r"vpextrb|vpinsrb|vpgather", text), name


def test_small_images_tile_two_whole_image_rows(qdq):
    """c96 / c96b (8 x 8 outputs, 96 channels: 6 channel tiles) take 2 x 2 macro tiles of two image rows
    (stride 2 and 1 between the input rows their A tiles read): 2 A + 2 B tile loads per 4 `tdpbusd`,
    where a 1 x 3 tile of one row (1 A + 3 B per 3 dots) was the choice before; so does `down` (16 x 16 x 32,
    1 x 2 of one row before)."""
    mod = _scheduled(qdq, tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"}))
    across = {}
    for gv, f in mod.functions_items():
        text = f.script() if isinstance(f, tirx.PrimFunc) else ""
        key = re.search(r"tvmzoo_amx_cfg_(\w+)", text)
        if key and key.group(1).endswith(("_a1", "_a2")):
            across[key.group(1)] = (text.count("llvm.x86.tileloadd64"), text.count("llvm.x86.tdpbusd"))
    assert sorted(k[-2:] for k in across if "_r8_m2_n2_" in k) == ["a1", "a2"], across
    assert len(across) == 3 and all(loads == dots == 4 for loads, dots in across.values()), across


def tile_setup(func: tirx.PrimFunc) -> dict[str, int]:
    """How often a kernel's TIR configures and releases the AMX tiles: in all, inside a loop (once per
    iteration: per macro tile), and the launch points (TVM's once-per-thread code before a parallel loop)."""
    def calls(stmt) -> list[str]:
        found: list[str] = []
        tvm_ffi.structural_walk(stmt, (tvm.ir.expr.Call, lambda c: found.append(str(c.args[0]))
                                       if c.op.name in ("tirx.call_extern", "tirx.call_llvm_intrin") else None))
        return [c for c in found if "tvmzoo_amx_cfg" in c or c == str(amx.RELEASE.args[0])]

    loops: list = []
    points: list = []
    tvm_ffi.structural_walk(func.body, [(tirx.For, loops.append),
                                        (tirx.AttrStmt, lambda a: points.append(a) if a.attr_key == LAUNCH_POINT
                                         else None)])
    return {"calls": len(calls(func.body)), "in loops": sum(len(calls(loop.body)) for loop in loops),
            "launch points": len(points)}


def _without_hoist(precision: str, target: tvm.target.Target) -> tvm.transform.Pass:
    """The pipeline as before HoistAmxTileSetup (the tiles configured per macro tile)."""
    named = phases(precision)
    named["schedule"] = [p for p in named["schedule"] if p.info.name != "HoistAmxTileSetup"]
    return _sequence(target, named, f"tvmzoo_{precision}_no_hoist")


def workspaces_per_call(func: tirx.PrimFunc, target: tvm.target.Target) -> int:
    """How many TVMBackendAllocWorkspace calls one call of `func` makes, as TVM lowers it (each call
    counted times the extents of the loops around it)."""
    lowered: list = []

    @tvm.ir.instrument.pass_instrument
    class Capture:
        def run_after_pass(self, mod, info):
            if info.name == "tirx.LowerTVMBuiltin":
                lowered.extend(f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))

    with tvm.transform.PassContext(instruments=[Capture()]):
        tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    times, total = [1], [0]

    def loop(stmt, visitor) -> None:
        times.append(times[-1] * int(stmt.extent))
        visitor.default_visit(stmt)
        times.pop()

    def call(expr, visitor) -> None:
        total[0] += times[-1] if expr.op.name == "tirx.TVMBackendAllocWorkspace" else 0
        visitor.default_visit(expr)

    for f in lowered:
        tvm_ffi.structural_visit(f.body, [(tirx.For, loop), (tvm.ir.expr.Call, call)])
    return total[0]


@pytest.mark.parametrize("tiles, cores, chunk", [(784, 2, 8), (14, 2, 7), (9, 2, 1), (9, 1, 3), (48, 4, 6)])
def test_chunks_keep_every_threads_share(tiles, cores, chunk):
    """Macro tiles per workspace allocation: at most 8, dividing the parallel loop, the chunks a multiple of
    the cores (TVM gives each thread a contiguous equal share)."""
    assert _chunk(tiles, cores) == chunk


def test_amx_tiles_are_configured_once_per_parallel_task(qdq):
    """Each AMX kernel configures (ldtilecfg) and releases its tiles once, at the launch point of its parallel
    loop (once per thread), not in the loop (once per macro tile, ~60 ns each: thousands per conv); the
    accumulator buffer comes from the workspace pool once per chunk of macro tiles, not per macro tile."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2})
    imported = from_onnx(qdq, shape_dict={"input": [BATCH, 3, SIZE, SIZE]}, keep_params_in_input=False)
    kernels = {gv.name_hint: f for gv, f in _scheduled(qdq, target).functions_items()
               if isinstance(f, tirx.PrimFunc) and "tdpbusd" in f.script()}
    assert len(kernels) >= 5
    for name, func in kernels.items():
        assert tile_setup(func) == {"calls": 2, "in loops": 0, "launch points": 1}, name
    before = _without_hoist("int8", target)(imported)
    for name in kernels:
        assert tile_setup(before[name])["in loops"] == 2, name
    chunked = {n: workspaces_per_call(f, target) for n, f in kernels.items()}
    per_tile = {n: workspaces_per_call(before[n], target) for n in kernels}
    assert all(chunked[n] <= per_tile[n] for n in kernels) and sum(chunked.values()) * 2 <= sum(per_tile.values()), \
        (chunked, per_tile)


# ---------------------------------------------------------------- on this host, where it has AMX


def _run(mod: tvm.IRModule, target: tvm.target.Target, photos: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    return np.concatenate([vm["main"](tvm.runtime.tensor(photos[i:i + BATCH])).numpy()
                           for i in range(0, len(photos), BATCH)])


@needs_amx_int8
def test_amx_int8_is_bit_identical_to_vnni_and_matches_onnxruntime(qdq, photos):
    from tvmzoo.compile.quant.quantize import run_ort
    from tvmzoo.run.host import request_amx

    assert request_amx()
    host = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2})
    vnni = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2, "mattr": NO_AMX})
    amx_mod = _scheduled(qdq, host)
    assert "tdpbusd" in _dots(amx_mod).values()
    out_amx, out_vnni = _run(amx_mod, host, photos), _run(_scheduled(qdq, vnni), vnni, photos)
    assert np.array_equal(out_amx, out_vnni)  # the same integer arithmetic, the same float epilogue
    ref = run_ort(qdq, [photos[i:i + BATCH] for i in range(0, len(photos), BATCH)])
    for o, r in zip(out_amx, ref):
        assert cosine(o, r) > 0.9999
    assert (out_amx.argmax(1) == ref.argmax(1)).all()


_LOAD = """
import sys, numpy as np
{load}
x = np.load(sys.argv[2])
print(json.dumps(out(x).tolist()))
"""
_WITH_LOADER = "import json\nfrom tvmzoo.run.runtime import CompiledModel\nout = CompiledModel.load(sys.argv[1]).run"
_BARE_TVM = ("import json, tvm\nfrom tvm import relax\nvm = relax.VirtualMachine(tvm.runtime.load_module("
             "sys.argv[1] + '/mod.so'), tvm.cpu())\nout = lambda x: vm['main'](tvm.runtime.tensor(x)).numpy()")


@pytest.fixture(scope="module")
def tiny_amx(tmp_path_factory, sample_images, photos):
    """The tiny int8 RepVGG built by `compile_model` for this host (its convs of 16+ channels on AMX) and
    one photo saved for a fresh process: (model prefix, photo path)."""
    from conftest import copy_images
    from tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny_amx")
    copy_images(sample_images[:8], root)
    prefix = build_tiny(root, "tiny_amx", dtype="int8", size=SIZE)
    assert "amx-int8" in json.loads((prefix.parent / "mod.json").read_text())["cpu_features"]
    np.save(root / "x.npy", photos[:1])
    return prefix, root / "x.npy"


def _fresh(load: str, prefix, x) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LOAD.format(load=load), str(prefix.parent), str(x)],
                          capture_output=True, text=True, timeout=300)


@needs_amx_int8
def test_amx_module_runs_in_a_fresh_process_through_the_loader(tiny_amx):
    """tvmzoo's loader asks for AMX state before the first kernel runs; without that request (TVM's bare
    loader) the same module dies on its first tile instruction: the permission is what makes it run."""
    ok = _fresh(_WITH_LOADER, *tiny_amx)
    assert ok.returncode == 0, ok.stderr
    assert np.isfinite(json.loads(ok.stdout.splitlines()[-1])).all()
    bare = _fresh(_BARE_TVM, *tiny_amx)
    assert bare.returncode == -signal.SIGILL, (bare.returncode, bare.stderr[-500:])


@needs_amx_int8
def test_amx_module_runs_on_a_tvmzoo_rpc_device(tiny_amx, tmp_path):
    """`tvmzoo device serve` asks for AMX state before serving (TVM's own rpc_server does not): the module
    runs there and gives the local outputs."""
    from tvm import rpc

    from tvmzoo.run.devices import load_remote
    from tvmzoo.run.runtime import CompiledModel

    prefix, x = tiny_amx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["timeout", "-s", "KILL", "300", str(Path(sys.executable).parent / "tvmzoo"), "device",
                               "serve", "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        session = None
        for _ in range(120):  # the server takes a few seconds to import TVM
            try:
                session = rpc.connect("127.0.0.1", port)
                break
            except (RuntimeError, OSError):
                time.sleep(0.5)
        assert session is not None, "the RPC server did not start"
        remote = load_remote(prefix, session).run(np.load(x))
        assert np.array_equal(remote, CompiledModel.load(prefix).run(np.load(x)))
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


@needs_amx_int8
def test_a_module_with_amx_kernels_is_refused_where_linux_denies_tile_state(tiny_amx, tmp_path, monkeypatch):
    """mod.json counts the kernels on AMX tiles; where the kernel refuses tile state such a module stops
    with one clear message before any kernel runs, while a module without them (and an older module that
    does not say) loads as before."""
    import shutil

    from tvmzoo.errors import ModuleError
    from tvmzoo.run import runtime

    prefix, x = tiny_amx
    meta = json.loads((prefix.parent / "mod.json").read_text())
    assert meta["amx_kernels"] == meta["kernels"]["rules"]["ScheduleInt8Amx"] > 0
    monkeypatch.setattr(runtime, "request_amx", lambda: False)
    with pytest.raises(ModuleError, match=r"kernels on AMX tiles.*mattr: \[-amx-tile"):
        runtime.CompiledModel.load(prefix)
    for amx_kernels in (0, None):  # no tile kernels; a module from before the count
        copy = tmp_path / f"copy{amx_kernels}"
        shutil.copytree(prefix.parent, copy)
        meta.pop("amx_kernels") if amx_kernels is None else meta.update(amx_kernels=amx_kernels)
        (copy / "mod.json").write_text(json.dumps(meta))
        assert runtime.CompiledModel.load(copy).meta["cpu_features"] == meta["cpu_features"]


def test_every_conv_and_gemm_of_an_int8_build_gets_a_dot_rule(tiny_amx):
    """A dot rule that fails for a bug looks like "not applicable" and the kernel silently goes to the
    generic float rule (A0 int8 once ran 11x slower so): mod.json's per-rule counts must give every conv and
    the Gemm of the int8 build an int8 dot rule (AMX tiles where they pay, VNNI for the rest)."""
    prefix, _ = tiny_amx
    model = onnx.load(prefix.parent.parent.parent / "tiny.onnx")
    dense = sum(node.op_type in ("Conv", "Gemm", "MatMul") for node in model.graph.node)
    rules = json.loads((prefix.parent / "mod.json").read_text())["kernels"]["rules"]
    assert rules.get("ScheduleInt8Amx", 0) + rules.get("ScheduleInt8Dot", 0) == dense > 0, rules
