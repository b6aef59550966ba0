"""ScheduleInt8Dot: uint8 x int8 -> int32 conv2d (NHWC / HWIO, not grouped) and matmul on
AVX512-VNNI, the reduction tensorized with `vpdpbusd` (TVM's own VNNI intrinsic does not verify
with LLVM 22, hence the ones registered here)."""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.script import tirx as T
from tvm.target import Target

from .base import NotApplicable, ReductionRule, vector_lanes
from .loops import (is_plain_copy, loop_map, register_tile, repack_weight, schedule_epilogue, schedule_injective,
                    vectorize_innermost)
from .operands import as_var, parallel_order


def _vnni_dot(lanes: int) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """C[i] += sum_k u8 A[k] * s8 B[i, k] for `lanes` int32 lanes and k < 4: one `vpdpbusd`.

    TVM's own VNNI_DOT_16x4_INTRIN passes <16 x i32> operands; LLVM 22's vpdpbusd takes
    <64 x i8> ones (the module fails verification), hence these."""
    n_bytes, llvm = 4 * lanes, f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm), C.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes),
                              dtype=f"int8x{n_bytes}"),
                B.vload([0, 0], dtype=f"int8x{n_bytes}"), dtype=f"int32x{lanes}")

    return desc, impl


VNNI_INTRINS = {lanes: f"tvmzoo_dot_{lanes}x4_vnni" for lanes in (16, 8)}
for _lanes, _name in VNNI_INTRINS.items():
    s_tir.TensorIntrin.register(_name, *_vnni_dot(_lanes))


class ScheduleInt8Dot(ReductionRule):
    """uint8 x int8 -> int32 conv2d (NHWC / HWIO, not grouped) and matmul on AVX512-VNNI.

    The weight is repacked to [OC/L, ..., IC/4, L, 4] (a layout-rewrite block that folds into the
    constant at build time), so each `vpdpbusd` multiplies 4 input channels (one broadcast int32)
    by a contiguous L x 4 weight block into L int32 accumulators; the register tile is
    `rows x vectors` of those, the reduction loops outside it, as in ScheduleReduction."""

    features = ("avx512vnni", "avx512vl")

    @staticmethod
    def _operands(sch, red):
        """(input read, weight read, output-channel iter, input-channel iter, row iter or None,
        the weight's index vars); raises NotApplicable when the kernel does not fit VNNI."""
        stmt = sch.get(red)
        out = stmt.writes[0]
        if out.source.dtype != "int32" or len(stmt.reads) != 2:
            raise NotApplicable("not an int32 accumulation of two operands")
        by_var = {iv.var: iv for iv in stmt.iter_vars}
        out_vars = [as_var(r.min) for r in out.region]
        if any(v is None or by_var[v].iter_type != tirx.IterVar.DataPar for v in out_vars):
            raise NotApplicable("output not indexed by plain spatial vars")
        chan = by_var[out_vars[-1]]
        row = by_var[out_vars[-2]] if len(out_vars) >= 2 else None
        inp = wgt = None
        for i, read in enumerate(stmt.reads):
            if read.source.same_as(out.source):
                continue
            dtype = str(read.source.dtype)
            if dtype == "int8" and any(as_var(r.min) is not None and as_var(r.min).same_as(chan.var)
                                       for r in read.region):
                wgt = i
            elif dtype == "uint8":
                inp = i
        if inp is None or wgt is None:
            raise NotApplicable("not uint8 x int8")
        rc = as_var(stmt.reads[inp].region[-1].min)
        if rc is None or rc not in by_var or by_var[rc].iter_type != tirx.IterVar.CommReduce:
            raise NotApplicable("input's last axis is not the channel reduction")
        w_vars = [as_var(r.min) for r in stmt.reads[wgt].region]
        if any(v is None for v in w_vars) or sum(v.same_as(rc) for v in w_vars) != 1:
            raise NotApplicable("weight not indexed by plain vars (grouped conv?)")
        return inp, wgt, chan, by_var[rc], row, w_vars

    def schedule_reduction(self, sch: s_tir.Schedule, red, producers: list, consumers: list,
                           target: Target) -> None:
        self._operands(sch, red)  # applicable at all?
        for block in self._inline_producers(sch, red, producers):
            schedule_injective(sch, block, vector_lanes(target, 8))
        inp, wgt, chan, rc, row, w_vars = self._operands(sch, red)
        stmt = sch.get(red)
        c_ext, k_ext = int(chan.dom.extent), int(rc.dom.extent)
        lanes = 16 if c_ext % 16 == 0 else 8
        if c_ext % lanes or k_ext % 4:
            raise NotApplicable(f"{c_ext} output / {k_ext} input channels: not multiples of {lanes} / 4")
        r_ext = int(row.dom.extent) if row is not None else 1
        row_tile, vecs, _ = register_tile(c_ext, r_ext, lanes)
        # weight [.., rc, .., chan, ..] -> [chan/L, <other axes>, rc/4, L, 4], folded at build time
        pos_c = next(i for i, v in enumerate(w_vars) if v.same_as(chan.var))
        pos_k = next(i for i, v in enumerate(w_vars) if v.same_as(rc.var))
        others = [i for i in range(len(w_vars)) if i not in (pos_c, pos_k)]

        def pack(*idx):
            c, k = idx[pos_c], idx[pos_k]
            return (c // lanes, *[idx[i] for i in others], k // 4, c % lanes, k % 4)

        repack_weight(sch, red, wgt, pack)
        loop_of = loop_map(sch, red)

        c_out, c_vec, c_lane = sch.split(loop_of[chan.var], [None, vecs, lanes])
        k_out, k_lane = sch.split(loop_of[rc.var], [None, 4])
        if row is not None:
            r_out, r_in = sch.split(loop_of[row.var], [None, row_tile])
            tile, outer_rows = [r_in, c_vec], [r_out]
        else:
            tile, outer_rows = [c_vec], []
        tiled = [chan.var, rc.var] + ([row.var] if row is not None else [])
        rest = [iv for iv in stmt.iter_vars if not any(iv.var.same_as(v) for v in tiled)]
        spatial = [iv for iv in rest if iv.iter_type == tirx.IterVar.DataPar]
        red_loops = [loop_of[iv.var] for iv in rest if iv.iter_type == tirx.IterVar.CommReduce]
        outer_order = parallel_order(stmt, chan.var, row, loop_of, spatial, c_out, outer_rows)
        sch.reorder(*outer_order, *red_loops, k_out, *tile, c_lane, k_lane)
        outer = sch.fuse(*outer_order)
        sch.parallel(outer)
        init = sch.decompose_reduction(red, (red_loops or [k_out])[0])
        for loop in tile:
            sch.unroll(loop)
        vectorize_innermost(sch, sch.get_loops(init)[-1], lanes)
        sch.tensorize(c_lane, VNNI_INTRINS[lanes])
        schedule_epilogue(sch, outer, consumers, vector_lanes(target, 32))

    @staticmethod
    def _inline_producers(sch, red, producers) -> list:
        """Inline every producer into its consumer (elementwise work on a residual input goes into
        the epilogue, a plain-copy pad into the dot product); returns the blocks left (pads)."""
        read_by_red = {r.source.name for r in sch.get(red).reads}
        left = []
        for block in reversed(producers):
            feeds_red = sch.get(block).writes[0].source.name in read_by_red
            try:
                if feeds_red and not is_plain_copy(sch, block):
                    raise NotApplicable("pad with a border: keep it a buffer for the intrinsic")
                sch.compute_inline(block)
            except (RuntimeError, ValueError):
                left.append(block)
        return left
