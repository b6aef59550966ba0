"""ScheduleInt8Dot: uint8 x int8 -> int32 conv2d (NHWC / HWIO, not grouped) and matmul on
AVX512-VNNI, the reduction tensorized with `vpdpbusd` (TVM's own VNNI intrinsic does not verify
with LLVM 22, hence the ones registered here)."""
from __future__ import annotations

from tvm import DataType, s_tir, tirx
from tvm.script import tirx as T
from tvm.target import Target

from .base import NotApplicable, ReductionRule, vector_lanes
from .loops import (is_plain_copy, loop_map, register_tile, repack_weight, schedule_epilogue, schedule_pad,
                    vectorize_innermost)
from .operands import as_var, parallel_order


def dot_intrin(lanes: int, group: int, dtypes: tuple[str, str, str], dot) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """(desc, impl) of C[i] += sum_k A[k] * B[i, k] for `lanes` accumulators and k < `group`, `dtypes`
    = (A, B, C); the impl's value is `dot(A, B, C)` (one instruction: vpdpbusd, vdpbf16ps)."""
    a_dtype, b_dtype, acc = dtypes

    def intrin(describe: bool) -> tirx.PrimFunc:  # one signature: desc and impl must declare the same buffers
        @T.prim_func(s_tir=True)
        def func(A: T.Buffer((group,), a_dtype, offset_factor=1), B: T.Buffer((lanes, group), b_dtype, offset_factor=1),
                 C: T.Buffer((lanes,), acc, offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
                T.writes(C[0:lanes])
                if describe:  # a Python bool: TVMScript keeps only the branch taken
                    for i, k in T.grid(lanes, group):
                        with T.sblock("update"):
                            vi, vk = T.axis.remap("SR", [i, k])
                            C[vi] = C[vi] + T.cast(A[vk], acc) * T.cast(B[vi, vk], acc)
                else:
                    C[T.ramp(T.int32(0), 1, lanes)] = dot(A, B, C)
        return func.with_attr("global_symbol", "desc" if describe else "impl")

    return intrin(True), intrin(False)


def _vnni_dot(lanes: int) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """C[i] += sum_k u8 A[k] * s8 B[i, k] for `lanes` int32 lanes and k < 4: one `vpdpbusd`.

    TVM's own VNNI_DOT_16x4_INTRIN passes <16 x i32> operands; LLVM 22's vpdpbusd takes
    <64 x i8> ones (the module fails verification), hence these."""
    n_bytes, llvm = 4 * lanes, f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"

    def vpdpbusd(A, B, C):
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id(llvm), C.vload([0], dtype=f"int32x{lanes}"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes),
                          dtype=f"int8x{n_bytes}"),
            B.vload([0, 0], dtype=f"int8x{n_bytes}"), dtype=f"int32x{lanes}")

    return dot_intrin(lanes, 4, ("uint8", "int8", "int32"), vpdpbusd)


# The epilogue's loops over the register tile (rows x vectors) unrolled up to this many iterations: as a
# loop, LLVM vectorized it across the rows (gathers, byte-wise stores: `vpextrb`); Lite0's 1x1 conv 32 -> 16
# at 112 x 112 (batch 8) 0.56 -> 0.29 ms.
EPILOGUE_UNROLL = 16
VNNI_INTRINS = {lanes: f"tvmzoo_dot_{lanes}x4_vnni" for lanes in (16, 8)}
for _lanes, _name in VNNI_INTRINS.items():
    s_tir.TensorIntrin.register(_name, *_vnni_dot(_lanes))


class ScheduleInt8Dot(ReductionRule):
    """uint8 x int8 -> int32 conv2d (NHWC / HWIO, not grouped) and matmul on AVX512-VNNI.

    The weight is repacked to [OC/L, ..., IC/4, L, 4] (a layout-rewrite block that folds into the
    constant at build time), so each `vpdpbusd` multiplies 4 input channels (one broadcast int32)
    by a contiguous L x 4 weight block into L int32 accumulators; the register tile is
    `rows x vectors` of those, the reduction loops outside it, as in ScheduleReduction.
    The class attributes say which dot product it tensorizes (bf16_dot.py's rule is this one on `vdpbf16ps`)."""

    features = ("avx512vnni", "avx512vl")
    acc_dtype, input_dtype, weight_dtype = "int32", "uint8", "int8"
    group = 4  # input channels per lane
    intrins = VNNI_INTRINS  # lanes -> tensor intrinsic

    def _operands(self, sch, red):
        """(input read, weight read, output-channel iter, input-channel iter, row iter or None,
        the weight's index vars); raises NotApplicable when the kernel does not fit the dot product."""
        stmt = sch.get(red)
        out = stmt.writes[0]
        if out.source.dtype != self.acc_dtype or len(stmt.reads) != 2:
            raise NotApplicable(f"not an {self.acc_dtype} accumulation of two operands")
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
            indexed_by_chan = any(as_var(r.min) is not None and as_var(r.min).same_as(chan.var) for r in read.region)
            if dtype == self.weight_dtype and indexed_by_chan:
                wgt = i
            elif dtype == self.input_dtype:
                inp = i
        if inp is None or wgt is None:
            raise NotApplicable(f"not {self.input_dtype} x {self.weight_dtype}")
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
        group = self.group
        self._schedule_producers(sch, red, producers, target)
        inp, wgt, chan, rc, row, w_vars = self._operands(sch, red)
        stmt = sch.get(red)
        c_ext, k_ext = int(chan.dom.extent), int(rc.dom.extent)
        lanes = 16 if c_ext % 16 == 0 else 8
        if c_ext % lanes or k_ext % group:
            raise NotApplicable(f"{c_ext} output / {k_ext} input channels: not multiples of {lanes} / {group}")
        r_ext = int(row.dom.extent) if row is not None else 1
        row_tile, vecs, _ = register_tile(c_ext, r_ext, lanes)
        # weight [.., rc, .., chan, ..] -> [chan/L, <other axes>, rc/G, L, G], folded at build time
        pos_c = next(i for i, v in enumerate(w_vars) if v.same_as(chan.var))
        pos_k = next(i for i, v in enumerate(w_vars) if v.same_as(rc.var))
        others = [i for i in range(len(w_vars)) if i not in (pos_c, pos_k)]

        def pack(*idx):
            c, k = idx[pos_c], idx[pos_k]
            return (c // lanes, *[idx[i] for i in others], k // group, c % lanes, k % group)

        repack_weight(sch, red, wgt, pack)
        loop_of = loop_map(sch, red)

        c_out, c_vec, c_lane = sch.split(loop_of[chan.var], [None, vecs, lanes])
        k_out, k_lane = sch.split(loop_of[rc.var], [None, group])
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
        sch.tensorize(c_lane, self.intrins[lanes])
        self.annotate(sch, outer)
        schedule_epilogue(sch, outer, consumers, vector_lanes(target, 32), EPILOGUE_UNROLL)

    def annotate(self, sch: s_tir.Schedule, outer) -> None:
        """Hook for rules whose intrinsic needs the kernel annotated (bf16: its LLVM import)."""

    def _schedule_producers(self, sch, red, producers: list, target: Target) -> None:
        """Producers inlined; the pads left in vectors of the input's lanes (loops.schedule_pad)."""
        for block in self._inline_producers(sch, red, producers):
            schedule_pad(sch, block, vector_lanes(target, DataType(self.input_dtype).bits))

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
