"""HoistAmxTileConfig: AMX tiles configured once per parallel task, not once per macro tile.

The AMX rules (tvmzoo.compile.schedules.amx) configure the tiles (`ldtilecfg`, ~60 ns here) at the start of
every macro tile and release them after it: one parallel iteration each, so thousands per conv at batch 1.
Schedule primitives cannot place a statement once per thread: TVM's codegen runs each thread's share of a
parallel loop (`for i in [begin, end)`) inside a lambda whose body is only the loop. TVM's own way to run
code once per thread is the `pragma_parallel_launch_point` attribute (src/target/llvm/codegen_cpu.cc): its
body becomes the lambda, and a parallel loop inside it is split among the threads as usual. This pass, run
after the schedules, rewrites

    for i in T.parallel(n): {..., cfg(), ..., tilerelease(), ...}
into
    launch_point: {cfg(); for i in T.parallel(n): {..., ...}; tilerelease()}

for every parallel loop whose configuration calls all load the same shape (any other loop, say one with two
tile shapes, is left as it is). The tile registers then stay configured across a thread's macro tiles; each
macro tile still zeroes its accumulators and stores them (the arithmetic is unchanged: bit-identical outputs).
A thread with no iteration configures and releases the tiles once (a no-op for the outputs).
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir import IRModule

from ..schedules.amx import CONFIG_PREFIX, RELEASE

LAUNCH_POINT = "pragma_parallel_launch_point"


def _configs(stmt) -> list[tvm.ir.expr.Call]:
    """The tile configuration calls under `stmt`."""
    found: list = []

    def visit(call) -> None:
        if call.op.name == "tirx.call_extern" and call.args[0].value.startswith(CONFIG_PREFIX):
            found.append(call)

    tvm_ffi.structural_walk(stmt, (tvm.ir.expr.Call, visit))
    return found


def _is_release(call) -> bool:
    return call.op.name == "tirx.call_llvm_intrin" and tvm_ffi.structural_equal(call, RELEASE)


def _without_tile_setup(body):
    """`body` with its configuration and release calls dropped (a no-op `Evaluate(0)` in their place)."""
    def strip(stmt):
        call = stmt.value
        if isinstance(call, tvm.ir.expr.Call) and (_is_release(call) or _configs(call)):
            return tirx.Evaluate(tirx.const(0, "int32"))
        return stmt

    return tvm_ffi.structural_map(body, (tirx.Evaluate, strip))


def _hoisted(loop):
    """A parallel loop whose macro tiles all load one tile configuration -> that configuration loaded
    once per thread at the loop's launch point (see the module doc); any other loop unchanged."""
    if loop.kind != tirx.ForKind.PARALLEL:
        return loop
    configs = _configs(loop.body)
    if not configs or len({c.args[0].value for c in configs}) != 1:
        return loop
    inner = tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, _without_tile_setup(loop.body),
                     loop.thread_binding, loop.annotations, loop.step, loop.span)
    task = tirx.SeqStmt([tirx.Evaluate(configs[0]), inner, tirx.Evaluate(RELEASE)])
    return tirx.AttrStmt(loop.loop_var, LAUNCH_POINT, tirx.const(1, "int32"), task)


def hoist_tile_config_func(func: tirx.PrimFunc) -> tirx.PrimFunc:
    if not _configs(func.body):
        return func
    return func.with_body(tvm_ffi.structural_map(func.body, (tirx.For, _hoisted)))


@tvm.transform.module_pass(opt_level=0, name="HoistAmxTileConfig")
def hoist_tile_config(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
    """Every PrimFunc with AMX tiles: the tile configuration once per parallel task (module doc)."""
    updated = {gv: hoist_tile_config_func(f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    for gv, func in updated.items():
        if not func.same_as(mod[gv]):
            mod[gv] = func
    return mod
