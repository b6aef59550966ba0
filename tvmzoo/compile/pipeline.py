"""The compile pipeline, by name, in the shape of TVM's relax/pipeline.py: phase functions and one
`get_pipeline(target, precision, records)` that `vamc compile`, `vamc tune`, the tests and the
benchmarks all run. A Relax module as imported from ONNX (weights bound as constants) goes in; a
module ready for `tvm.compile(mod, target)` comes out.

  import     LowerInt8 (int8), Canonicalize, ToMixedPrecision (fp16), ToBf16 (bf16)
  layout     NHWC / HWIO, the int8 RGB stem's fourth channel, Winograd, batch split, float convs padded
             to whole vector registers of output channels
  legalize   Relax ops -> fused TIR kernels, weight buffers marked layout-free
  schedule   tuning records where they won, then the default schedules (tvmzoo.compile.schedules);
             AMX tiles configured once per parallel task, their accumulator buffers allocated once per
             chunk of macro tiles (HoistAmxTileSetup)
  prepack    weight layout rewrites folded into the constants at build time

MetaSchedule tunes the module after `legalize` (`tuning_pipeline`), so the kernels it tunes are
the ones `schedule` looks up.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import tvm
from tvm import relax, tirx
from tvm.ir import IRModule
from tvm.ir.instrument import pass_instrument
from tvm.target import Target

from ..config import PRECISIONS
from ..errors import ConfigError
from .passes.amx_tasks import hoist_tile_setup
from .passes.batch_split import split_batch_prefix
from .passes.bf16 import to_bf16
from .passes.graph_passes import canonicalize, pad_conv_lanes, pad_int8_channels
from .passes.lower_int8 import lower_int8
from .passes.winograd import winograd
from .records import ApplyTuningRecords
from .schedules import RULE_ATTR, default_schedules

log = logging.getLogger(__name__)

# Pooling, means and elementwise ops follow their input's layout (ConvertLayout rejects a
# desired layout for them).
NHWC_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


def import_passes(precision: str) -> list[tvm.transform.Pass]:
    """The module as imported -> its precision, in canonical form."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}.")
    passes = [lower_int8] if precision == "int8" else []  # first: FoldConstant would turn int8 weights to float
    passes.append(canonicalize)  # before ToMixedPrecision, which rejects the opaque kernels ONNX Clip imports as
    if precision == "fp16":
        passes.append(relax.transform.ToMixedPrecision(out_dtype="float16"))
    if precision == "bf16":  # asked by the precision plan only where it pays (tvmzoo.compile.precision)
        passes.append(to_bf16)
    return passes


def layout_passes() -> list[tvm.transform.Pass]:
    """Convolutions and pooling to NHWC / HWIO (the weight transposes fold into the constants);
    a batch's high-resolution layers image by image (tvmzoo.compile.passes.batch_split); float convs
    computed on whole vector registers of channels (graph_passes.pad_conv_lanes)."""
    return [relax.transform.ConvertLayout(NHWC_LAYOUTS), relax.transform.CanonicalizeBindings(),
            relax.transform.FoldConstant(), pad_int8_channels, winograd, split_batch_prefix, pad_conv_lanes]


def legalize_passes() -> list[tvm.transform.Pass]:
    """Relax ops -> fused TIR kernels (as relax.pipeline.zero_pipeline), weights layout-free."""
    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.DeadCodeElimination(),
            relax.transform.AttachAttrLayoutFreeBuffers()]


def schedule_passes(records: Path | None) -> list[tvm.transform.Pass]:
    """Tuned schedules from `records` where they beat the default, default schedules elsewhere; the AMX
    kernels' tile setup then hoisted (configuration once per parallel task, accumulator workspace once per
    chunk of macro tiles)."""
    return [ApplyTuningRecords(records), default_schedules, hoist_tile_setup]


def prepack_passes() -> list[tvm.transform.Pass]:
    """Weight layout rewrites (ScheduleInt8Dot's, MetaSchedule's) split out of the kernels and
    folded into the constants at build time."""
    return [relax.transform.SplitLayoutRewritePreproc(), relax.transform.LiftTransformParams(),
            relax.transform.FoldConstant(), relax.transform.DeadCodeElimination()]


def phases(precision: str = "fp32", records: Path | None = None) -> dict[str, list[tvm.transform.Pass]]:
    return {"import": import_passes(precision), "layout": layout_passes(), "legalize": legalize_passes(),
            "schedule": schedule_passes(records), "prepack": prepack_passes()}


def _sequence(target: Target, named: dict[str, list[tvm.transform.Pass]], name: str) -> tvm.transform.Pass:
    seq = tvm.transform.Sequential([tvm.transform.Sequential(p, name=n) for n, p in named.items()], name=name)

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pipeline(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        with target:
            return seq(mod)

    return _pipeline


def get_pipeline(target: Target, precision: str = "fp32", records: Path | None = None) -> tvm.transform.Pass:
    """The whole build: imported Relax module -> module for tvm.compile(mod, target)."""
    return _sequence(target, phases(precision, records), f"tvmzoo_{precision}")


def tuning_pipeline(target: Target, precision: str = "fp32") -> tvm.transform.Pass:
    """The module as MetaSchedule tunes it: every phase before `schedule`."""
    named = phases(precision)
    return _sequence(target, {n: named[n] for n in ("import", "layout", "legalize")}, f"tvmzoo_{precision}_tuning")


def pass_names(precision: str = "fp32", records: Path | None = None) -> dict[str, list[str]]:
    """Phase -> the names of its passes, as mod.json records them."""
    return {n: [p.info.name for p in passes] for n, passes in phases(precision, records).items()}


def _scheduled(mod: IRModule) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and f.attrs.get("tirx.is_scheduled", False)}


@pass_instrument
class KernelCount:
    """Counts the kernels tuning records scheduled and those on default schedules; times the passes
    and remembers the one running (to name it when TVM fails)."""

    def __init__(self) -> None:
        self.tuned = self.default = 0
        self.rules: dict[str, int] = {}  # default-schedule rule name -> kernels it scheduled
        self.current = ""
        self._started = 0.0

    def run_before_pass(self, _mod: IRModule, info: tvm.transform.PassInfo) -> None:
        self.current, self._started = info.name, time.perf_counter()

    def run_after_pass(self, mod: IRModule, info: tvm.transform.PassInfo) -> None:
        log.debug("pass %s: %.2fs", info.name, time.perf_counter() - self._started)
        if info.name == "ApplyTuningRecords":
            self.tuned = len(_scheduled(mod))
        elif info.name == "DefaultSchedules":
            self.default = len(_scheduled(mod)) - self.tuned
            self.rules = dict(Counter(str(f.attrs[RULE_ATTR]) for _, f in mod.functions_items()
                                      if isinstance(f, tirx.PrimFunc) and RULE_ATTR in f.attrs))


def run_pipeline(mod: IRModule, target: Target, precision: str = "fp32",
                 records: Path | None = None, count: KernelCount | None = None) -> tuple[IRModule, KernelCount]:
    """get_pipeline(...)(mod), counting the kernels scheduled by records and by default."""
    count = count if count is not None else KernelCount()
    with tvm.transform.PassContext(instruments=[count]):
        mod = get_pipeline(target, precision, records)(mod)
    log.info("kernels: %d tuned, %d default schedules", count.tuned, count.default)
    return mod, count
