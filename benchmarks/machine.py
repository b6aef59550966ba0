"""The machine a benchmark ran on, as every results table names it: the CPU model and the ISA extensions
the low-precision builds use. Light on purpose (no TVM, no ONNX Runtime): any benchmark can import it."""
from __future__ import annotations

from pathlib import Path


def cpu_name() -> str:
    """The CPU model name and the ISA extensions the low-precision builds use (from /proc/cpuinfo)."""
    text = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    isa = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8") if f in flags]
    return f"{name} ({', '.join(isa) or 'no AVX-512'})"
