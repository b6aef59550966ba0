"""AMX tiles (Intel Sapphire Rapids and later): the three tensor intrinsics the AMX rules tensorize
a conv / matmul macro tile with, for int8 (`tdpbusd`: u8 x s8 -> s32) and bf16 (`tdpbf16ps`:
bf16 x bf16 -> fp32).

A macro tile is `m` row tiles (`rows` pixels each) x `n` channel tiles (`lanes` = 16 output channels each,
8 where the channels are 8 x odd: half-width tiles);
its m * n accumulator tiles (C) stay in tile registers for the whole reduction:

- begin (the reduction's init block): load this kernel's tile configuration, zero the C tiles;
- dot (the update, once per conv tap and K chunk): load m A tiles (rows x K chunk of the input) and
  n B tiles (the weight, packed [.., OC/lanes, K/group, lanes, group]), m * n dots;
- end (a copy block after the reduction): store the C tiles into the output, release the tiles.

TIR sees three ordinary blocks; the accumulators live in tile registers between them because LLVM's
explicit AMX intrinsics name tiles by immediates (LLVM neither allocates nor reorders them). The
intrinsics configure the tiles per macro tile (one parallel iteration) and release them after it; the
pipeline's HoistAmxTileSetup (passes/amx_tasks.py) then moves both to once per thread of a kernel call
(a thread preempted with tiles live costs an 8 KiB tile-state save, notes/issue-15b.md: a kernel call is short).
A process runs these kernels only after asking the kernel for AMX state (tvmzoo.run.host.request_amx).
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder.tirx import prim_func as build_prim_func

MAX_TILES = 8
MAX_ROWS = 16
ROW_BYTES = 64  # the widest tile row: 16 int32 / float32 accumulators, 64 input bytes
_IMPORT = "pragma_import_llvm"
CONFIG_PREFIX = "tvmzoo_amx_cfg_"  # the tile configuration functions (passes/amx_tasks.py finds them by it)
RELEASE = tirx.call_llvm_intrin("void", "llvm.x86.tilerelease")


def I64(value: int):  # noqa: N802 - Relax legalizes with int64 loops: the descriptions match them
    return tirx.const(value, "int64")


@dataclass(frozen=True)
class AmxKind:
    input_dtype: str
    weight_dtype: str
    acc_dtype: str
    group: int       # K elements per 32-bit word of a B row (4 u8, 2 bf16)
    dot: str         # the LLVM intrinsic


INT8 = AmxKind("uint8", "int8", "int32", 4, "llvm.x86.tdpbusd")
BF16 = AmxKind("bfloat16", "bfloat16", "float32", 2, "llvm.x86.tdpbf16ps")


@dataclass(frozen=True)
class TileShape:
    kind: AmxKind
    rows: int    # pixels per A / C tile
    m: int       # row tiles
    n: int       # channel tiles
    k: int       # K chunk: input channels per A tile row
    stride: int  # input pixels between output pixels (the conv stride; 1 for a matmul)
    lanes: int = 16  # output channels per channel tile (16, or 8: C and B tile rows of 32 bytes)
    # Input rows between the row tiles when the m row tiles are m consecutive output rows of the image
    # (the conv's vertical stride): C [m, rows, n * lanes], A [across * (m - 1) + 1, row span, k].
    # 0: the m row tiles split one output row (C [m * rows, n * lanes]).
    across: int = 0

    def __post_init__(self) -> None:
        if not (1 <= self.rows <= MAX_ROWS and self.k % self.kind.group == 0
                and self.k * self.elem_bytes <= ROW_BYTES and self.m * self.n + self.m + 1 <= MAX_TILES
                and self.lanes in (8, 16)):
            raise ValueError(f"AMX tiles cannot hold {self}")

    @property
    def elem_bytes(self) -> int:
        return 4 // self.kind.group

    @property
    def key(self) -> str:
        return (f"{self.kind.dot.rsplit('.', 1)[1]}_r{self.rows}_m{self.m}_n{self.n}_k{self.k}_s{self.stride}"
                f"_l{self.lanes}" + (f"_a{self.across}" if self.across else ""))

    @property
    def span(self) -> int:
        """Input pixels of one image row an A tile group reads (every `stride`-th is used)."""
        return self.stride * ((self.rows if self.across else self.m * self.rows) - 1) + 1

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The accumulators' shape: [m * rows, n * lanes], or [m, rows, n * lanes] across image rows."""
        nc = self.n * self.lanes
        return (self.m, self.rows, nc) if self.across else (self.m * self.rows, nc)

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The input region a dot reads: [span, k], or [rows of the image, span, k] across image rows."""
        return ((self.across * (self.m - 1) + 1,) if self.across else ()) + (self.span, self.k)

    def c_tile(self, r: int, j: int) -> int:
        return r * self.n + j

    def a_tile(self, r: int) -> int:
        return self.m * self.n + r

    def b_tile(self, j: int) -> int:
        """B tiles rotate over the tiles left (a dot waits less on the load into another tile)."""
        first = self.m * self.n + self.m
        return first + j % (MAX_TILES - first)


def config_ir(shape: TileShape) -> tuple[str, str]:
    """(function name, LLVM IR) of `ldtilecfg` with this shape's tiles (palette 1)."""
    name = f"{CONFIG_PREFIX}{shape.key}"
    width = 4 * shape.lanes  # bytes of a C row (lanes x 32 bits) and of a B row (lanes x one K group)
    tiles = [(shape.c_tile(r, j), shape.rows, width) for r in range(shape.m) for j in range(shape.n)]
    tiles += [(shape.a_tile(r), shape.rows, shape.k * shape.elem_bytes) for r in range(shape.m)]
    tiles += [(t, shape.k // shape.kind.group, width) for t in sorted({shape.b_tile(j) for j in range(shape.n)})]
    stores = "".join(f"  %c{t} = getelementptr i8, ptr %cfg, i64 {16 + 2 * t}\n  store i16 {colsb}, ptr %c{t}\n"
                     f"  %r{t} = getelementptr i8, ptr %cfg, i64 {48 + t}\n  store i8 {rows}, ptr %r{t}\n"
                     for t, rows, colsb in tiles)
    ir = f"""
declare void @llvm.x86.ldtilecfg(ptr)
define linkonce_odr i32 @{name}() alwaysinline {{
  %cfg = alloca <64 x i8>, align 64
  store <64 x i8> zeroinitializer, ptr %cfg, align 64
  store i8 1, ptr %cfg
{stores}  call void @llvm.x86.ldtilecfg(ptr %cfg)
  ret i32 0
}}
"""
    return name, ir


def _ptr(buf, offset, mode: int):
    """The address of `buf`'s element `offset`, typed as the buffer's storage (bf16 as uint16: after
    BF16StorageLegalize the buffer is uint16, and BF16ComputeLegalize leaves an address-taken buffer alone)."""
    elem = "uint16" if str(buf.dtype) == "bfloat16" else str(buf.dtype)
    return T.tvm_access_ptr(T.type_annotation(elem), buf.data, buf.elem_offset + offset, 1, mode)


def _pitch(buf, elem_bytes: int, times: int = 1):
    """A tile's row pitch in bytes: `times` pixels of `buf` (its second-innermost axis)."""
    return T.Cast("int64", buf.strides[-2] * (elem_bytes * times))


def _tile_op(name: str, *args) -> None:
    T.evaluate(T.call_llvm_intrin("void", name, *args))


def _whole(buf):
    return buf[tuple(slice(0, int(d)) for d in buf.shape)]


def _func(params: list[tuple[str, tuple, str, list]], reads, writes, body, strided: bool) -> tirx.PrimFunc:
    """A tensor intrinsic's description (strided False) or impl, built with TVM's IR builder: `params`
    (name, shape, dtype, inner strides: the impl's outer strides are bound by tensorize), `reads` /
    `writes` / `body` take the buffers."""
    with IRBuilder() as ib:
        with build_prim_func():
            handles = [T.arg(name, T.handle()) for name, *_ in params]
            bufs = [T.match_buffer(h, shape, dtype, offset_factor=1,
                                   strides=[T.int32() for _ in shape[len(inner):]] + inner if strided else None)
                    for h, (_, shape, dtype, inner) in zip(handles, params)]
            with T.sblock("root"):
                T.reads(*reads(*bufs))
                T.writes(*writes(*bufs))
                body(*bufs)
    return ib.get()


def _intrin(name: str, params, reads, writes, desc_body, impl_body) -> str:
    """Register (once) the tensor intrinsic `name`; returns its name."""
    if name not in _REGISTERED:
        s_tir.TensorIntrin.register(name, _func(params, reads, writes, desc_body, False),
                                    _func(params, reads, writes, impl_body, True), override=True)
        _REGISTERED.add(name)
    return name


_REGISTERED: set[str] = set()


def _tile_nest(shape: TileShape, name: str, reduce: bool, block) -> None:
    """A description's loop nest over the macro tile, as the rule splits it: [image rows], rows,
    channel tiles x lanes, [K groups x group]; no unit loops (the rule makes none: TVMScript would fold
    them away). `block(rows, vj, vk)` writes the block's body (`rows`: the C index before the channel)."""
    g = shape.kind.group
    dims = {**({"h": shape.m, "i": shape.rows} if shape.across else {"i": shape.m * shape.rows}),
            "jt": shape.n, "jl": shape.lanes, **({"kg": shape.k // g, "kl": g} if reduce else {})}
    kept = [d for d, extent in dims.items() if extent > 1]

    def joined(loops: dict, outer: str, inner: str, width: int):
        return loops[outer] * I64(width) + loops[inner] if outer in loops else loops[inner]

    with T.grid(*[I64(dims[d]) for d in kept]) as loop_vars:
        loops = dict(zip(kept, loop_vars))
        with T.sblock(name):
            rows = [T.axis.spatial(I64(dims[d]), loops[d]) for d in ("h", "i") if d in dims]
            vj = T.axis.spatial(I64(shape.n * shape.lanes), joined(loops, "jt", "jl", shape.lanes))
            vk = T.axis.reduce(I64(shape.k), joined(loops, "kg", "kl", g)) if reduce else None
            block(rows, vj, vk)


def _c_param(name: str, shape: TileShape) -> tuple:
    return name, shape.out_shape, shape.kind.acc_dtype, [1]


def begin_intrin(shape: TileShape) -> str:
    """C = 0 on the macro tile: configure the tiles, zero the accumulators."""
    zero = tirx.const(0, shape.kind.acc_dtype)  # decompose_reduction's init value

    def desc(C) -> None:
        def block(rows, vj, _):
            T.reads()
            T.writes(C[(*rows, vj)])
            T.buffer_store(C, zero, [*rows, vj])
        _tile_nest(shape, "init", False, block)

    def impl(C) -> None:
        T.evaluate(T.call_extern("int32", config_ir(shape)[0]))
        for t in range(shape.m * shape.n):
            _tile_op("llvm.x86.tilezero", T.int8(t))

    return _intrin(f"tvmzoo_amx_begin_{shape.key}", [_c_param("c", shape)], lambda C: [],
                   lambda C: [_whole(C)], desc, impl)


def _row_offset(buf, shape: TileShape, r: int, step: int):
    """Elements of `buf` from the macro tile's first row tile to row tile `r`: `step` rows of `buf`
    per output row (across image rows) or pixel (within one)."""
    return r * step * buf.strides[0] * (1 if shape.across else shape.rows)


def dot_intrin(shape: TileShape) -> str:
    """C += A x B for one conv tap and K chunk: A the input region (`in_shape`; every `stride`-th pixel
    used), B the packed weight [n, k / group, lanes, group]."""
    kind, n, k, s, across = shape.kind, shape.n, shape.k, shape.stride, shape.across
    g, acc, lanes = kind.group, kind.acc_dtype, shape.lanes

    def desc(A, B, C) -> None:
        def block(rows, vj, vk):
            pixel = [rows[0] * I64(across), rows[1] * I64(s)] if across else [rows[0] * I64(s)]
            a = A[(*pixel, vk)]
            b = B[vj // I64(lanes), vk // I64(g), vj % I64(lanes), vk % I64(g)]
            T.reads(C[(*rows, vj)], a, b)
            T.writes(C[(*rows, vj)])
            T.buffer_store(C, C[(*rows, vj)] + T.cast(a, acc) * T.cast(b, acc), [*rows, vj])
        _tile_nest(shape, "update", True, block)

    def impl(A, B, C) -> None:
        for r in range(shape.m):
            _tile_op("llvm.x86.tileloadd64", T.int8(shape.a_tile(r)),
                     _ptr(A, _row_offset(A, shape, r, across or s), 1), _pitch(A, shape.elem_bytes, s))
        for j in range(n):
            _tile_op("llvm.x86.tileloadd64", T.int8(shape.b_tile(j)), _ptr(B, j * B.strides[0], 1),
                     T.int64(4 * lanes))
            for r in range(shape.m):
                _tile_op(kind.dot, T.int8(shape.c_tile(r, j)), T.int8(shape.a_tile(r)), T.int8(shape.b_tile(j)))

    params = [("a", shape.in_shape, kind.input_dtype, [1]),
              ("b", (n, k // g, lanes, g), kind.weight_dtype, [lanes * g, g, 1]), _c_param("c", shape)]
    return _intrin(f"tvmzoo_amx_dot_{shape.key}", params,
                   lambda A, B, C: [_whole(C), _whole(A), _whole(B)], lambda A, B, C: [_whole(C)], desc, impl)


def end_intrin(shape: TileShape) -> str:
    """Out = C: store the accumulator tiles into the output, release the tiles."""

    def desc(C, O) -> None:
        def block(rows, vj, _):
            T.reads(C[(*rows, vj)])
            T.writes(O[(*rows, vj)])
            T.buffer_store(O, C[(*rows, vj)], [*rows, vj])
        _tile_nest(shape, "store", False, block)

    def impl(C, O) -> None:
        for r in range(shape.m):
            for j in range(shape.n):
                _tile_op("llvm.x86.tilestored64", T.int8(shape.c_tile(r, j)),
                         _ptr(O, _row_offset(O, shape, r, 1) + j * shape.lanes, 2), _pitch(O, 4))
        T.evaluate(RELEASE)  # the one release call (passes/amx_tasks.py hoists it by this expression)

    return _intrin(f"tvmzoo_amx_end_{shape.key}", [_c_param("c", shape), _c_param("o", shape)],
                   lambda C, O: [_whole(C)], lambda C, O: [_whole(O)], desc, impl)


def link_config(sch: s_tir.Schedule, loop, shape: TileShape) -> None:
    """Link the tile configuration function into the kernel's LLVM module (linkonce: once per module)."""
    sch.annotate(loop, _IMPORT, config_ir(shape)[1])
