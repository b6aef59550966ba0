"""The TVM target: the host CPU named explicitly (TVM 0.27's `mcpu=native` silently means no vector
extensions) as LLVM names it (tvmzoo.compile.cpu), its instruction sets recorded so a module is never
loaded on a CPU that lacks them; and the features each kernel family needs."""
from __future__ import annotations

from ..errors import ConfigError
from ..run.host import num_cores
from .cpu import check_cpu, features_of, host_cpu

# LLVM's tuning for these CPUs prefers 256-bit vectors and splits the 512-bit ones our schedules emit
# (a requantize epilogue ran as ymm halves: an int8 conv 1.5x slower); turn that preference off.
WIDE_VECTORS = "-prefer-256-bit"


def detect_mcpu() -> str:
    """The LLVM -mcpu name for the host, or 'generic' (tvmzoo.compile.cpu.host_cpu logs why)."""
    return host_cpu().name


def resolve_target(spec: str | dict | None) -> dict:
    """The target as TVM's dict form. None / 'host' -> the detected CPU; 'llvm -mcpu=X' strings
    (the vendor and older-TVM form) are translated; dicts pass through. An -mcpu LLVM does not know is
    an error naming the closest CPUs it knows."""
    if spec is None or spec in ("host", "native", "llvm"):
        return _with_wide_vectors({"kind": "llvm", "mcpu": detect_mcpu(), "num-cores": num_cores()})
    if isinstance(spec, dict):
        if "kind" not in spec:
            raise ConfigError(f"backend.target {spec!r} has no 'kind'. Use e.g. "
                              "{kind: llvm, mcpu: skylake-avx512} or the string 'llvm -mcpu=skylake-avx512'.")
        return _with_wide_vectors(_checked(dict(spec)))
    parts = str(spec).split()
    target: dict = {"kind": parts[0]}
    for part in parts[1:]:
        if not part.startswith("-") or "=" not in part:
            raise ConfigError(f"backend.target '{spec}': cannot read '{part}'. Write options as -key=value, "
                              "e.g. 'llvm -mcpu=skylake-avx512 -num-cores=2'.")
        key, value = part.lstrip("-").split("=", 1)
        target[key] = int(value) if value.isdigit() else value
    if target["kind"] == "llvm":
        if target.get("mcpu") in (None, "native"):
            target["mcpu"] = detect_mcpu()
        target.setdefault("num-cores", num_cores())
    return _with_wide_vectors(_checked(target))


def _checked(target: dict) -> dict:
    """A CPU (LLVM) target TVM accepts. An -mcpu LLVM does not know is an error (LLVM would build a generic
    module without a word); so is another kind (a CUDA module would be written, then fail to load)."""
    if target["kind"] != "llvm":
        raise ConfigError(f"backend.target: kind '{target['kind']}' is not a CPU target: tvmzoo compiles for CPUs "
                          "with LLVM. Leave backend.target out (this CPU) or write e.g. 'llvm -mcpu=skylake-avx512'.")
    if isinstance(target.get("mattr"), str):   # the string form's -mattr=+a,+b
        target["mattr"] = target["mattr"].split(",")
    if target.get("mcpu"):
        if target["mcpu"] == "native":
            target["mcpu"] = detect_mcpu()
        problem = check_cpu(str(target["mcpu"]))
        if problem:
            raise ConfigError(f"backend.target: {problem}")
    _tvm_accepts(target)
    return target


def _tvm_accepts(target: dict) -> None:
    """TVM's own check of the options (an unknown key, a value of the wrong type), as one clear error."""
    import tvm

    try:
        tvm.target.Target(target)
    except (ValueError, TypeError, RuntimeError) as exc:   # TVM raises ValueError for unknown options
        reason = str(exc).strip().splitlines()[-1]
        raise ConfigError(f"backend.target {target}: TVM refuses it ({reason}). Write e.g. "
                          "'llvm -mcpu=skylake-avx512 -num-cores=4'.") from None


def _with_wide_vectors(target: dict) -> dict:
    """AVX-512 targets get full-width vectors unless the user chose -mattr."""
    if target["kind"] == "llvm" and "mattr" not in target and \
            "avx512f" in features_of(str(target.get("mcpu", "generic"))):
        target["mattr"] = [WIDE_VECTORS]
    return target


def target_key(target: dict) -> str:
    """A short, path-safe name for a target, used for tuning record folders."""
    return "-".join(str(target.get(k)) for k in ("kind", "mcpu") if target.get(k))


def required_features(target: dict) -> list[str]:
    """The instruction sets (LLVM names) LLVM may emit for the target: the host must have them all."""
    if target.get("kind") != "llvm":
        return []
    mattr = target.get("mattr") or ()
    return sorted(features_of(str(target.get("mcpu", "generic")), tuple([mattr] if isinstance(mattr, str) else mattr)))


# bf16: the LLVM features of the vdpbf16ps kernels (tvmzoo.compile.schedules.bf16_dot)
BF16_FEATURES = ("avx512bf16", "avx512vl")
# AMX: the LLVM features of the tile kernels (tvmzoo.compile.schedules.int8_amx, bf16_amx)
AMX_INT8_FEATURES = ("amx-int8", "amx-tile")
AMX_BF16_FEATURES = ("amx-bf16", "amx-tile")
