"""bf16 on AVX512-BF16 without AMX (Zen 4, Cooper Lake): the compile-time probe (vdpbf16ps against fp32 on
this host), the choice as a pure function of its ratio (on paper, per CPU), and what a build does with each
choice: bf16 kernels matching ONNX Runtime fp32 on real photos, or the fp32 module byte for byte. The
choice in the builds is forced through an injected ratio, never by timing; this host stands in for such a
CPU with AMX switched off in the target."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import tvm

from conftest import ROOT, cosine
from test_bf16 import NO_AMX, SIZE, _compiled, _matches_onnxruntime_fp32, bf16_net, needs_bf16  # noqa: F401
from tvmzoo.compile import bf16_probe
from tvmzoo.compile.bf16_probe import Bf16Probe
from tvmzoo.compile.compiler import plan_for, runs_here
from tvmzoo.compile.cpu import features_of
from tvmzoo.compile.precision import (BF16_MAX_RATIO, bf16_needs_probe, bf16_plan, describe_fastest,
                                      plan_precision)
from tvmzoo.compile.target import resolve_target
from tvmzoo.config import PRECISIONS, load_build_config
from tvmzoo.errors import ConfigError

N_PHOTOS = 4


def no_amx_host_target() -> dict:
    """This host's own target with AMX switched off: the stand-in for Zen 4 / Cooper Lake."""
    spec = resolve_target(None)
    return {**spec, "mattr": [*spec.get("mattr", []), *NO_AMX]}


@pytest.mark.parametrize("cpu, ratio, choice, kernels", [
    ("znver4", 0.5, "auto", "avx512bf16"),              # well below the threshold
    ("znver4", BF16_MAX_RATIO - 0.01, "auto", "avx512bf16"),  # just below
    ("znver4", BF16_MAX_RATIO, "auto", "avx512bf16"),   # at it
    ("znver4", BF16_MAX_RATIO + 0.01, "auto", "fp32"),  # just above: not a clear win
    ("cooperlake", 1.6, "auto", "fp32"),                # what Sapphire Rapids without AMX measures
    ("znver4", None, "auto", "fp32"),                   # not measured (cross-compile): today's safe default
    ("znver4", None, "bf16", "avx512bf16"),             # the user's choice, unmeasured
    ("znver4", 0.5, "fp32", "fp32"),
    ("sapphirerapids", 1.6, "auto", "amx-bf16"),        # AMX: never measured, always the tiles
    ("sapphirerapids", None, "auto", "amx-bf16"),
    ("icelake-server", 0.5, "auto", "fp32"),            # no AVX512-BF16: would be emulated
    ("icelake-server", None, "bf16", "fp32"),
    ("haswell", 0.5, "auto", "fp32"),
])
def test_bf16_choice_is_a_function_of_the_ratio(cpu, ratio, choice, kernels):
    assert bf16_plan(features_of(cpu), ratio, choice) == kernels


@pytest.mark.parametrize("cpu, choice, measured", [
    ("znver4", "auto", True), ("cooperlake", "auto", True), ("znver4", "bf16", False), ("znver4", "fp32", False),
    ("sapphirerapids", "auto", False), ("icelake-server", "auto", False), ("haswell", "auto", False)])
def test_only_avx512bf16_without_amx_is_measured(cpu, choice, measured):
    assert bf16_needs_probe(features_of(cpu), choice) == measured


def test_the_log_says_what_was_measured_and_chosen():
    features = features_of("znver4")
    win = plan_precision("bf16", "znver4", features, Bf16Probe(1.0, 0.62, 30))
    assert win.compute == "bf16" and "0.62x the time of its fp32 kernels" in win.note
    assert "computes in bf16 (vdpbf16ps)" in win.note and win.probe.ratio == pytest.approx(0.62)
    lose = plan_precision("bf16", "znver4", features, Bf16Probe(1.0, 1.6, 30))
    assert lose.compute == "fp32" and "1.60x" in lose.note and "faster on znver4: int8 (AVX512-VNNI)" in lose.note
    # the ranking names bf16 only where it was measured faster
    assert "bf16 (AVX512-BF16, measured)" in describe_fastest(features, PRECISIONS, bf16_fast=True)
    assert "bf16" not in describe_fastest(features, PRECISIONS)


def _cfg(**overrides):
    return load_build_config(ROOT / "build_in" / "build" / "official_repvgg.yaml",
                             {"backend.dtype": "bf16", **overrides})


def test_a_cross_compile_is_not_measured_unless_the_user_says(monkeypatch, caplog):
    def no_probe(target):
        raise AssertionError(f"measured a cross-compile for {target}")

    monkeypatch.setattr(bf16_probe, "measure", no_probe)
    znver4 = {"kind": "llvm", "mcpu": "znver4"}
    assert not runs_here(znver4)
    with caplog.at_level(logging.WARNING, logger="tvmzoo.compile.compiler"):
        assert plan_for(_cfg(), znver4).compute == "fp32"
    assert "not measured here" in caplog.text and "backend.bf16_compute: bf16" in caplog.text
    forced = plan_for(_cfg(**{"backend.bf16_compute": "bf16"}), znver4)
    assert forced.compute == "bf16" and "backend.bf16_compute is bf16" in forced.note
    with pytest.raises(ConfigError, match="bf16_compute"):
        _cfg(**{"backend.bf16_compute": "fast"})


@needs_bf16
def test_the_probe_times_vdpbf16ps_against_fp32_on_this_host():
    """Both probe builds compute the same net (bf16 rounding shows), and the timings are real numbers."""
    target = no_amx_host_target()
    assert runs_here(target) and bf16_needs_probe(features_of(target["mcpu"], tuple(target["mattr"])))
    runs = bf16_probe.builds(target)
    size = bf16_probe.SIZE
    x = tvm.runtime.tensor(np.random.default_rng(2).standard_normal((1, bf16_probe.C_IN, size, size)).astype(np.float32))
    fp32, bf16 = (runs[p](x).numpy() for p in ("fp32", "bf16"))
    assert cosine(bf16.ravel(), fp32.ravel()) > 0.999 and not np.allclose(bf16, fp32, rtol=1e-5, atol=1e-5)
    probe = bf16_probe.time_builds(runs, rounds=6)
    assert probe.rounds == 6 and 0.01 < probe.fp32_ms < 1000 and 0.01 < probe.bf16_ms < 1000
    assert len(probe.block_ratios) == 3 and all(math.isfinite(r) and r > 0 for r in probe.block_ratios)
    assert probe.ratio == max(probe.block_ratios) >= probe.bf16_ms / probe.fp32_ms * 0.999


@needs_bf16
def test_a_failed_probe_keeps_fp32(monkeypatch):
    def broken(target):
        raise RuntimeError("TVMError: cannot build the probe")

    monkeypatch.setattr(bf16_probe, "builds", broken)
    plan = plan_for(_cfg(), no_amx_host_target())
    assert plan.compute == "fp32" and plan.probe is None and "not measured here" in plan.note


def _injected(monkeypatch, ratio: float) -> None:
    monkeypatch.setattr(bf16_probe, "measure", lambda target: Bf16Probe(1.0, ratio, 30))


@needs_bf16
def test_where_the_probe_chose_bf16_the_build_matches_onnxruntime_fp32(monkeypatch, tmp_path, photos):
    _injected(monkeypatch, 0.5)
    built = _compiled(tmp_path, no_amx_host_target(), "bf16", batch=N_PHOTOS)
    meta = json.loads((built / "mod.json").read_text())
    assert meta["compute"]["precision"] == "bf16" and meta["compute"]["measured"]["ratio"] == 0.5
    assert meta["amx_kernels"] == 0 and "ToBf16" in meta["kernels"]["pipeline"]["import"]
    _matches_onnxruntime_fp32((bf16_net(), None, tvm.runtime.load_module(str(built / "mod.so"))), photos)


@needs_bf16
def test_where_the_probe_chose_fp32_the_build_is_the_fp32_build(monkeypatch, tmp_path):
    _injected(monkeypatch, 1.6)
    bf16, fp32 = (_compiled(tmp_path, no_amx_host_target(), dtype) for dtype in ("bf16", "fp32"))
    meta = json.loads((bf16 / "mod.json").read_text())
    assert meta["compute"]["precision"] == "fp32" and meta["compute"]["measured"]["ratio"] == 1.6
    assert (bf16 / "mod.so").read_bytes() == (fp32 / "mod.so").read_bytes()


def _counted_probe(monkeypatch, ratio: float = 0.8) -> list:
    """The probe's builds and timing replaced (no CPU needed): returns the list of targets measured."""
    measured: list = []
    monkeypatch.setattr(bf16_probe, "builds", lambda target: measured.append(target) or {})
    monkeypatch.setattr(bf16_probe, "time_builds", lambda runs: Bf16Probe(1.0, ratio, 30, (ratio, ratio - 0.1)))
    return measured


def test_the_answer_is_kept_per_cpu_and_features(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = _counted_probe(monkeypatch)
    znver4 = {"kind": "llvm", "mcpu": "znver4"}
    first = bf16_probe.measure(znver4)
    again = bf16_probe.measure(dict(znver4))
    assert len(measured) == 1 and again.ratio == pytest.approx(first.ratio) == pytest.approx(0.8)
    assert list(json.loads((tmp_path / "tvmzoo" / "bf16_probe.json").read_text())) == [bf16_probe._cache_key(znver4)]
    bf16_probe.measure({**znver4, "mattr": ["-avx512bf16"]})   # other features: another CPU
    bf16_probe.measure({"kind": "llvm", "mcpu": "cooperlake"})
    assert len(measured) == 3 and len(json.loads(bf16_probe.cache_path().read_text())) == 3


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"KEY": {"fp32_ms": 1.0}}'])
def test_a_corrupt_cache_is_ignored_with_a_warning(monkeypatch, tmp_path, caplog, text):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = _counted_probe(monkeypatch, 0.7)
    znver4 = {"kind": "llvm", "mcpu": "znver4"}
    bf16_probe.cache_path().parent.mkdir(parents=True)
    bf16_probe.cache_path().write_text(text.replace("KEY", bf16_probe._cache_key(znver4)))
    with caplog.at_level(logging.WARNING, logger="tvmzoo.compile.bf16_probe"):
        assert bf16_probe.measure(znver4).ratio == pytest.approx(0.7)
    assert len(measured) == 1 and "ignoring the bf16 probe cache" in caplog.text
    assert bf16_probe.measure(znver4).ratio == pytest.approx(0.7) and len(measured) == 1   # rewritten whole


def test_an_unwritable_cache_does_not_fail_the_build(monkeypatch, tmp_path, caplog):
    (tmp_path / "tvmzoo").write_text("a file where the cache folder goes")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _counted_probe(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="tvmzoo.compile.bf16_probe"):
        assert bf16_probe.measure({"kind": "llvm", "mcpu": "znver4"}).ratio == pytest.approx(0.8)
    assert "cannot keep the bf16 probe's answer" in caplog.text
