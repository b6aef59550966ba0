"""The host target from LLVM (tvmzoo.compile.cpu), the records it finds, the fp16 plan per CPU: on paper for
every CPU family users run (feature sets from LLVM's own CPU tables), and for real on this host."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

from tvmzoo.compile.cpu import KERNEL_ISA, check_cpu, choose_cpu, features_of, host_cpu, host_flags, nearest_records
from tvmzoo.compile.precision import fastest_precisions, plan_precision
from tvmzoo.compile.record_folder import records_for
from tvmzoo.errors import ConfigError
from tvmzoo.compile.target import required_features, resolve_target
from tvmzoo.run.host import missing_features

from conftest import run_cli
from tiny import tiny_onnx

# (LLVM name, vendor, fp16 native, fastest precision, int8 instructions)
CPUS = [("sapphirerapids", "intel", True, "int8", "AMX-INT8"), ("znver4", "amd", False, "int8", "AVX512-VNNI"),
        ("icelake-server", "intel", False, "int8", "AVX512-VNNI"), ("cascadelake", "intel", False, "int8", "AVX512-VNNI"),
        ("haswell", "intel", False, "fp32", None), ("znver2", "amd", False, "fp32", None)]
PRECISIONS = ("fp32", "fp16", "int8", "bf16")


@pytest.mark.parametrize("cpu, vendor, fp16, fastest, int8", CPUS)
def test_llvm_name_kept_when_the_flags_agree(cpu, vendor, fp16, fastest, int8):
    assert choose_cpu(cpu, features_of(cpu), vendor).name == cpu


@pytest.mark.parametrize("cpu, vendor, fp16, fastest, int8", CPUS)
@pytest.mark.parametrize("llvm_says", ["rocketlake", "generic"])
def test_hidden_model_gets_the_nearest_cpu_with_the_same_isa(cpu, vendor, fp16, fastest, int8, llvm_says):
    """A VM that hides the model (LLVM calls this Sapphire Rapids VM rocketlake): the CPU chosen uses only
    instructions the host has and all the vector ISA our kernels use."""
    host = features_of(cpu)
    choice = choose_cpu(llvm_says, host, vendor)
    assert features_of(choice.name) <= host
    assert features_of(choice.name) & KERNEL_ISA == host & KERNEL_ISA, choice
    if cpu in ("sapphirerapids", "znver4", "cascadelake", "haswell"):
        assert choice.name == cpu
    assert llvm_says in choice.reason or choice.name == llvm_says


def test_no_cpu_beyond_the_host():
    """bdver4 has Zen 2's vector ISA plus XOP / FMA4 / TBM, which no Zen has: never chosen for Zen 2."""
    assert choose_cpu("generic", features_of("znver2"), "amd").name != "bdver4"


@pytest.mark.parametrize("cpu, vendor, fp16, fastest, int8", CPUS)
def test_precision_plan_per_cpu(cpu, vendor, fp16, fastest, int8):
    features = features_of(cpu)
    plan = plan_precision("fp16", cpu, features)
    assert plan.compute == ("fp16" if fp16 else "fp32")
    assert ("no AVX512-FP16" in plan.note) != fp16
    ranked = fastest_precisions(features, PRECISIONS)
    assert ranked[0][0] == fastest and ranked[-1][0] == "fp32"
    assert dict(ranked).get("int8") == int8
    assert ("fp16" in dict(ranked)) == fp16
    assert ("bf16" in dict(ranked)) == ("amx-bf16" in features)  # vdpbf16ps alone loses to fp32
    assert "bf16" not in dict(fastest_precisions(features, ("fp32", "fp16", "int8")))  # not accepted: not named
    if "amx-bf16" in features and fp16:  # measured: AMX bf16 0.36-0.57x of fp32, fp16 0.58-0.70x (vs_peers.md)
        assert [p for p, _ in ranked] == ["int8", "bf16", "fp16", "fp32"]


def test_records_of_the_nearest_cpu_with_the_same_isa(tmp_path):
    build = "fp32-b1-224x224"
    record = tmp_path / "llvm-sapphirerapids" / build / "database_tuning_record.json"
    record.parent.mkdir(parents=True)
    record.write_text("")
    for cpu, expected in (("sapphirerapids", "sapphirerapids"), ("emeraldrapids", "sapphirerapids"),
                          ("znver4", "znver4"), ("cascadelake", "cascadelake")):
        assert records_for(tmp_path, {"kind": "llvm", "mcpu": cpu}, build) == tmp_path / f"llvm-{expected}" / build
    cpu, why = nearest_records("znver4", ["sapphirerapids"])
    assert cpu is None and "+avx512fp16" in why and "+amx-int8" in why
    assert nearest_records("emeraldrapids", ["sapphirerapids"])[0] == "sapphirerapids"


def test_unknown_mcpu_is_an_error_naming_close_cpus():
    assert check_cpu("znver4") is None and check_cpu("sapphirerapids") is None
    with pytest.raises(ConfigError, match="did you mean.*sapphirerapids"):
        resolve_target("llvm -mcpu=sapphire-rapids")
    with pytest.raises(ConfigError, match="znver5"):
        resolve_target({"kind": "llvm", "mcpu": "znver9"})


def test_this_host():
    """For real: the chosen CPU's instruction sets are all on this host, and a module built for it loads."""
    host = host_flags()
    if host is None:
        pytest.skip("no /proc/cpuinfo flags on this host")
    choice = host_cpu()
    target = resolve_target(None)
    assert target["mcpu"] == choice.name
    assert set(required_features(target)) <= host and missing_features(required_features(target)) == []
    assert features_of(choice.name) & KERNEL_ISA == host & KERNEL_ISA
    assert missing_features(["avx512_fp16", "amx-int8"]) == sorted({"avx512fp16", "amx-int8"} - host)


def _yaml(tmp_path, precision: str, target: dict | None) -> str:
    onnx_path = tiny_onnx(tmp_path / "tiny.onnx")
    cfg = {"name": f"tiny_{precision}_{(target or {}).get('mcpu', 'host')}",
           "frontend": {"shape": {"input": [1, 3, 32, 32]}, "type": "onnx", "checkpoint": str(onnx_path)},
           "backend": {"type": "tvm", "dtype": precision, **({"target": target} if target else {})},
           "workspace": {"path": str(tmp_path / "ws")}}
    path = tmp_path / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_unknown_mcpu_fails_compile(tmp_path):
    proc = run_cli("vamc", "compile", _yaml(tmp_path, "fp32", {"kind": "llvm", "mcpu": "icelake"}), check=False)
    assert proc.returncode != 0 and "icelake-server" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ws" / "tiny_fp32_icelake").exists()


def _disassembly(directory) -> str:
    """The machine code of the compiled module, as shipped (mod.so)."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(directory / "mod.so")],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("mcpu, native", [("icelake-server", False), ("znver4", False), ("sapphirerapids", True)])
def test_fp16_never_emulated(tmp_path, mcpu, native):
    """fp16 for a CPU without AVX512-FP16 computes in fp32: no fp16 arithmetic or conversions in the module,
    outputs equal ONNX Runtime's fp32; for sapphirerapids it stays native fp16 (vfmadd...ph)."""
    needed = set(features_of(mcpu))
    if not needed <= (host_flags() or set()):
        pytest.skip(f"this CPU cannot run {mcpu} code")
    from tvmzoo.compile.compiler import compile_model
    from tvmzoo.config import load_build_config
    from tvmzoo.run.runtime import CompiledModel

    directory = compile_model(load_build_config(_yaml(tmp_path, "fp16", {"kind": "llvm", "mcpu": mcpu})))
    meta = json.loads((directory / "mod.json").read_text())
    assert meta["target"]["mcpu"] == mcpu and meta["target_choice"] == "backend.target"
    assert set(meta["cpu_features"]) == set(features_of(mcpu)) and ("avx512fp16" in meta["cpu_features"]) == native
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
    out = CompiledModel.load(directory).run(x)
    ref = ort.InferenceSession(onnx.load(str(tmp_path / "tiny.onnx")).SerializeToString())
    ref = ref.run(None, {"input": x})[0]
    source = _disassembly(directory)
    fp16_ops = len(re.findall(r"\bvfmadd\w*ph\b|\bvcvtph2ps\b|\bvcvtps2ph\b", source))
    if native:
        assert meta["compute"]["precision"] == "fp16" and len(re.findall(r"\bvfmadd\w*ph\b", source)) > 10
        np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.05)
    else:
        assert meta["compute"]["precision"] == "fp32" and "no AVX512-FP16" in meta["compute"]["note"]
        assert fp16_ops == 0
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
