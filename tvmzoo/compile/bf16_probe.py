"""How fast tvmzoo's vdpbf16ps kernels are against its fp32 kernels on this CPU, measured at compile time.

On a CPU with AVX512-BF16 but no AMX-BF16 (AMD Zen 4, Intel Cooper Lake) whether bf16 pays depends on
how many multiply-adds per cycle the core retires with `vdpbf16ps` against fp32 FMAs: 0.42x on Sapphire
Rapids with AMX off (one port), and unknown on Zen 4. So a bf16 build for this host times one small net,
built by the pipeline twice (fp32 and bf16, the target's own schedules, no tuning records): a 1x1
expansion conv (as EfficientNet's) and a 3x3 conv (Winograd, as RepVGG's), batch 1, alternating
the two builds, minima over rounds in three blocks; the worst block's ratio counts (the machine may be
shared). The precision plan (tvmzoo.compile.precision) turns the ratio into a choice; this module only
measures. The answer is kept per CPU (its LLVM name and features) and tvmzoo / TVM version in the user's
cache (`$XDG_CACHE_HOME/tvmzoo/bf16_probe.json`, default ~/.cache): the next build there does not pay
the ~2.5 s again. Delete the file to measure again.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# A 1x1 expansion conv at 28x28 (as EfficientNet's), 2x2 max pool, a 3x3 conv at 14x14 (Winograd: RepVGG-A0's
# most frequent layer), global average pool: ~71 M multiply-adds, ~0.3 ms fp32 on 2 Sapphire Rapids cores. A small output, as
# a classifier's: a wide one costs a layout transpose that no model has.
C_IN, C_MID, SIZE = 64, 192, 28
PROBE = f"1x1 conv {C_IN}->{C_MID} at {SIZE}x{SIZE}, 3x3 conv {C_MID}->{C_MID} at {SIZE // 2}x{SIZE // 2}, batch 1"


@dataclass(frozen=True)
class Bf16Probe:
    fp32_ms: float     # minimum over all rounds
    bf16_ms: float
    rounds: int
    block_ratios: tuple[float, ...] = ()   # bf16 / fp32 minima of each block of rounds
    net: str = PROBE

    @property
    def ratio(self) -> float:
        """bf16 time / fp32 time, the worst block's (a burst of load on the shared machine must not make
        bf16 look faster): below 1, the vdpbf16ps kernels are faster."""
        return max(self.block_ratios) if self.block_ratios else self.bf16_ms / self.fp32_ms

    def to_meta(self) -> dict:
        return {"net": self.net, "fp32_ms": round(self.fp32_ms, 4), "bf16_ms": round(self.bf16_ms, 4),
                "ratio": round(self.ratio, 3), "block_ratios": [round(r, 3) for r in self.block_ratios],
                "rounds": self.rounds}


    @classmethod
    def from_meta(cls, meta: dict) -> Bf16Probe:
        return cls(float(meta["fp32_ms"]), float(meta["bf16_ms"]), int(meta["rounds"]),
                   tuple(float(r) for r in meta["block_ratios"]), str(meta["net"]))


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tvmzoo" / "bf16_probe.json"


def _cache_key(target: dict) -> str:
    import tvm

    from .. import __version__
    from .target import required_features

    return f"{target.get('mcpu')} [{' '.join(required_features(target))}] tvmzoo {__version__} tvm {tvm.__version__}"


def _read_cache() -> dict:
    path = cache_path()
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(cache, dict):
            raise ValueError("not a JSON object")
        return cache
    except (OSError, ValueError) as exc:
        log.warning("ignoring the bf16 probe cache %s (%s): measuring again", path, exc)
        return {}


def _cached(cache: dict, key: str) -> Bf16Probe | None:
    try:
        return Bf16Probe.from_meta(cache[key]) if key in cache else None
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring the bf16 probe cache's entry for %s (%s): measuring again", key, exc)
        return None


def _write_cache(cache: dict) -> None:
    from ..io.atomic import write_text

    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        write_text(cache_path(), json.dumps(cache, indent=1) + "\n")
    except Exception as exc:  # an unwritable cache must not fail the build (OSError, tvmzoo's OutputError)
        log.warning("cannot keep the bf16 probe's answer in %s: %s", cache_path(), exc)


def probe_net():
    """The probe's ONNX model (random weights, fixed seed)."""
    from ..io.onnx_graph import GraphBuilder

    rng = np.random.default_rng(0)

    def weight(k: int, c: int, size: int) -> np.ndarray:
        return (rng.standard_normal((k, c, size, size)) / np.sqrt(c * size * size)).astype(np.float32)

    g = GraphBuilder("bf16_probe")
    x = g.relu(g.conv(g.input([1, C_IN, SIZE, SIZE]), weight(C_MID, C_IN, 1), np.zeros(C_MID, np.float32), "pw"))
    x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = g.relu(g.conv(x, weight(C_MID, C_MID, 3), np.zeros(C_MID, np.float32), "conv3x3"))
    g.output(g.global_avg_pool(x), [1, C_MID, 1, 1])
    return g.build()


def _build(model, target, precision: str):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from .pipeline import run_pipeline

    mod = from_onnx(model, shape_dict={"input": [1, C_IN, SIZE, SIZE]}, keep_params_in_input=False)
    mod, _ = run_pipeline(mod, target, precision)
    return relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())["main"]


@contextmanager
def _quiet_pipeline() -> Iterator[None]:
    """The probe's builds do not log their passes and kernel counts: the compile log is the model's."""
    loggers = [logging.getLogger(f"tvmzoo.compile.{name}") for name in ("pipeline", "passes")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def builds(target: dict) -> dict:
    """The probe net's fp32 and bf16 builds for `target`: precision -> a callable running the net once."""
    import tvm

    tvm_target, model = tvm.target.Target(target), probe_net()
    with _quiet_pipeline():
        return {p: _build(model, tvm_target, p) for p in ("fp32", "bf16")}


def time_builds(runs: dict, rounds: int = 300, budget_s: float = 1.5, blocks: int = 3) -> Bf16Probe:
    """Run the two builds alternating, in `blocks` blocks of rounds // blocks rounds (each block stops
    early after budget_s / blocks seconds, with at least 2 rounds); minima per block and overall."""
    import tvm

    x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((1, C_IN, SIZE, SIZE)).astype(np.float32))
    for run in runs.values():
        run(x)  # first call: allocation, page faults
    overall, ratios, done = {p: float("inf") for p in runs}, [], 0
    for _ in range(blocks):
        best, started, n = {p: float("inf") for p in runs}, time.perf_counter(), 0
        while n < max(2, rounds // blocks) and (n < 2 or time.perf_counter() - started < budget_s / blocks):
            for p in (("fp32", "bf16") if n % 2 == 0 else ("bf16", "fp32")):
                t = time.perf_counter()
                runs[p](x)
                best[p] = min(best[p], (time.perf_counter() - t) * 1e3)
            n += 1
        ratios.append(best["bf16"] / best["fp32"])
        overall = {p: min(overall[p], best[p]) for p in runs}
        done += n
    return Bf16Probe(overall["fp32"], overall["bf16"], done, tuple(ratios))


def measure(target: dict) -> Bf16Probe | None:
    """Build and time the probe for `target` on this host (which must be able to run it): ~2 s. None
    (logged) when it cannot be built or run: the plan then keeps the safe default, fp32."""
    cache, key = _read_cache(), _cache_key(target)
    probe = _cached(cache, key)
    if probe is not None:
        log.info("bf16 probe: bf16 / fp32 %.2fx on %s (cached in %s)", probe.ratio, key, cache_path())
        return probe
    t0 = time.perf_counter()
    try:
        probe = time_builds(builds(target))
    except Exception as exc:  # TVM's internal errors; the build itself must not fail for a measurement
        log.warning("bf16 probe failed (%s): not measured", str(exc).splitlines()[0] if str(exc) else type(exc))
        return None
    log.info("bf16 probe (%s): fp32 %.3f ms, bf16 %.3f ms (minima); bf16 / fp32 %.2fx (worst of blocks %s), "
             "%d rounds; %.1fs with its builds", PROBE, probe.fp32_ms, probe.bf16_ms, probe.ratio,
             " ".join(f"{r:.2f}" for r in probe.block_ratios), probe.rounds, time.perf_counter() - t0)
    _write_cache({**cache, key: probe.to_meta()})
    return probe
