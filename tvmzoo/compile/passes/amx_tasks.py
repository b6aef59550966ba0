"""HoistAmxTileSetup: an AMX kernel configures its tiles once per parallel task, and allocates its
accumulator store buffer once per chunk of macro tiles, not once per macro tile.

The AMX rules (tvmzoo.compile.schedules.amx) compute one macro tile per parallel iteration: it configures
the tiles (`ldtilecfg`, ~60 ns here), zeroes, multiplies, stores its accumulators into a buffer of the
macro tile's size, releases the tiles, and the epilogue reads the buffer. That buffer is over TVM's
kMaxStackAlloca (1 KiB), so TVM's LowerTVMBuiltin gets it from the workspace pool
(TVMBackendAllocWorkspace / FreeWorkspace) at the top of the parallel loop's body: once per macro tile too.
Lite0's small convs at batch 1 have thousands of macro tiles. After the schedules, this pass:

1. Chunks: `for i in T.parallel(n)` -> `for io in T.parallel(n / c): for ii in range(c)` (TVM's own split,
   c <= MAX_CHUNK dividing n, with n / c a multiple of the target's cores, so a thread gets the same share
   as before). TVM's StorageRewrite places a buffer allocated in a parallel loop at the top of its body,
   so the workspace is taken once per chunk of c macro tiles.
2. Hoists the configuration: schedule primitives cannot place a statement once per thread (TVM's codegen
   runs a thread's share of a parallel loop inside a lambda whose body is only the loop). TVM's way is the
   `pragma_parallel_launch_point` attribute (src/target/llvm/codegen_cpu.cc): its body becomes the lambda,
   and a parallel loop inside it is split among the threads as usual:

       for io in T.parallel(..): {..., cfg(), ..., tilerelease(), ...}
   ->  launch_point: {cfg(); for io in T.parallel(..): {..., ...}; tilerelease()}

Only a parallel loop whose configuration calls all load the same shape is rewritten (any other is left as
it is). The tiles stay configured across a thread's macro tiles; each still zeroes and stores its
accumulators: the arithmetic is unchanged, the outputs bit-identical. A thread with no iteration
configures and releases the tiles once (no effect on the outputs).
"""
from __future__ import annotations

import logging

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import IRModule
from tvm.target import Target

from ..schedules.amx import CONFIG_PREFIX, RELEASE

log = logging.getLogger(__name__)
LAUNCH_POINT = "pragma_parallel_launch_point"
MAX_CHUNK = 8  # macro tiles per workspace allocation (measured: 8 vs 1 -> Lite0 bf16 AMX kernels 0.93x)


def _configs(stmt) -> list[tvm.ir.expr.Call]:
    """The tile configuration calls under `stmt`."""
    found: list = []

    def visit(call) -> None:
        if call.op.name == "tirx.call_extern" and call.args[0].value.startswith(CONFIG_PREFIX):
            found.append(call)

    tvm_ffi.structural_walk(stmt, (tvm.ir.expr.Call, visit))
    return found


def _amx_loops(func: tirx.PrimFunc) -> list[tirx.For]:
    """The parallel loops whose macro tiles all load one tile configuration."""
    loops: list = []
    tvm_ffi.structural_walk(func.body, (tirx.For, loops.append))
    return [loop for loop in loops if loop.kind == tirx.ForKind.PARALLEL
            and len({c.args[0].value for c in _configs(loop.body)}) == 1]


def _chunk(n: int, cores: int) -> int:
    return max(c for c in range(1, MAX_CHUNK + 1) if c == 1 or (n % c == 0 and (n // c) % cores == 0))


def _with_kind(func: tirx.PrimFunc, var, kind, annotations) -> tirx.PrimFunc:
    def remake(loop):
        if not loop.loop_var.same_as(var):
            return loop
        return tirx.For(loop.loop_var, loop.min, loop.extent, kind, loop.body, loop.thread_binding, annotations,
                        loop.step, loop.span)

    return func.with_body(tvm_ffi.structural_map(func.body, (tirx.For, remake)))


def chunked(func: tirx.PrimFunc, cores: int) -> tirx.PrimFunc:
    """Each AMX parallel loop split into chunks of macro tiles (module doc, 1)."""
    for loop in _amx_loops(func):
        c = _chunk(loop.extent.value, cores) if isinstance(loop.extent, tirx.IntImm) else 1
        if c == 1:  # a symbolic extent (dynamic batch) or no divisor that keeps the threads' shares equal
            continue
        sch = s_tir.Schedule(func)
        ref = next(r for r in sch.get_loops(sch.get_sblock(_first_block(loop)))
                   if sch.get(r).loop_var.same_as(loop.loop_var))
        annotations = dict(sch.get(ref).annotations)
        for key in annotations:  # split refuses an annotated loop
            sch.unannotate(ref, key)
        outer, _ = sch.split(ref, [None, c])
        # sch.parallel would check the data flow of the tensorized blocks, which it cannot see into; the loop
        # was parallel before the split, so its outer half is.
        func = _with_kind(sch.mod["main"], sch.get(outer).loop_var, tirx.ForKind.PARALLEL, annotations)
    return func


def _first_block(loop: tirx.For) -> str:
    names: list = []
    tvm_ffi.structural_walk(loop.body, (s_tir.SBlock, lambda b: names.append(b.name_hint)))
    return names[0]


def _without_tile_setup(body):
    """`body` with its configuration and release calls dropped (a no-op `Evaluate(0)` in their place)."""
    def strip(stmt):
        call = stmt.value
        if isinstance(call, tvm.ir.expr.Call) and (tvm_ffi.structural_equal(call, RELEASE) or _configs(call)):
            return tirx.Evaluate(tirx.const(0, "int32"))
        return stmt

    return tvm_ffi.structural_map(body, (tirx.Evaluate, strip))


def hoisted(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Each AMX parallel loop's tile configuration at its launch point (module doc, 2)."""
    amx_loops = _amx_loops(func)

    def hoist(loop):
        if not any(loop.loop_var.same_as(a.loop_var) for a in amx_loops):
            return loop
        inner = tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, _without_tile_setup(loop.body),
                         loop.thread_binding, loop.annotations, loop.step, loop.span)
        task = tirx.SeqStmt([tirx.Evaluate(_configs(loop.body)[0]), inner, tirx.Evaluate(RELEASE)])
        return tirx.AttrStmt(loop.loop_var, LAUNCH_POINT, tirx.const(1, "int32"), task)

    return func.with_body(tvm_ffi.structural_map(func.body, (tirx.For, hoist))) if amx_loops else func


@tvm.transform.module_pass(opt_level=0, name="HoistAmxTileSetup")
def hoist_tile_setup(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
    """Every PrimFunc with AMX tiles: workspace per chunk, configuration per task (module doc)."""
    target = Target.current(allow_none=False)
    cores = int(target.attrs.get("num-cores", 1))
    updated = {gv: hoisted(chunked(f, cores)) for gv, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and _configs(f.body)}
    for gv, func in updated.items():
        mod[gv] = func
    log.debug("AMX tile setup once per parallel task in %d kernels", len(updated))
    return mod
