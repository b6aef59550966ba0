"""Load a compiled model (mod.so + mod.json) and run batches on it."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import ConfigError, ModuleError, printable
from ..limits import check_text_size, json_nesting_problem
from ..preprocess import Preprocessing
from .host import missing_features, request_amx, uses_amx
from .threads import keep_pool_within_affinity

log = logging.getLogger(__name__)

MODULE_FILE = "mod.so"   # what `vamc compile` writes into <workspace>/<name>/
META_FILE = "mod.json"
ALIGNMENT = 64  # bytes: TVM reads a numpy array in place (DLPack) only when its data is aligned to this


def aligned_empty(shape: tuple[int, ...], dtype: str | np.dtype = "float32") -> np.ndarray:
    """An uninitialized array that `CompiledModel.run` reads in place, without a copy: allocate the
    input buffer once, fill it with each batch (a deployment's input binding)."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + size].view(dtype).reshape(shape)


def _in_place(array: np.ndarray, dtype: np.dtype) -> bool:
    """Whether `run` reads `array` in place (DLPack), as it is."""
    return (array.dtype == dtype and array.flags.c_contiguous and array.flags.writeable
            and array.ctypes.data % ALIGNMENT == 0)


def stack_aligned(arrays: list[np.ndarray]) -> np.ndarray:
    """np.stack into an `aligned_empty` buffer."""
    return np.stack(arrays, out=aligned_empty((len(arrays), *arrays[0].shape), arrays[0].dtype))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_dir(prefix: str | Path) -> Path:
    """Accept the vendor's `--model_prefix_path .../<name>/mod`, the directory, or the .so itself."""
    path = Path(prefix)
    if path.is_dir():
        return path
    if path.name in ("mod", MODULE_FILE, META_FILE):
        return path.parent
    return path.parent if path.suffix in (".so", ".json") else path


def read_meta(directory: Path) -> dict:
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ModuleError(f"no compiled model at {directory}: {META_FILE} is missing. "
                          "Run `vamc compile <yaml>` first, and pass its <workspace>/<name>/mod as the model prefix.")
    try:
        check_text_size(meta_path, META_FILE)
        text = meta_path.read_text(encoding="utf-8")
        problem = json_nesting_problem(text)
        meta = json.loads(text) if problem is None else None
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as exc:
        raise ModuleError(f"{meta_path} is corrupt ({exc}); recompile the model with `vamc compile`.") from exc
    problem = problem or _meta_problem(meta)
    if problem:
        raise ModuleError(f"{meta_path} is not a tvmzoo module description ({problem}); "
                          "recompile the model with `vamc compile`.")
    return meta


def output_classes(meta: dict) -> int | None:
    """Scores per image (the last axis of the module's first output); None when mod.json does not say."""
    try:
        last = meta["outputs"][0]["shape"][-1]
    except (KeyError, IndexError, TypeError):
        return None
    return last if isinstance(last, int) and not isinstance(last, bool) and last > 0 else None


def _meta_problem(meta) -> str | None:
    if not isinstance(meta, dict):
        return f"expected a JSON object, got {type(meta).__name__}"
    kinds = {"target": dict, "input": dict, "cpu_features": list}
    for key, kind in kinds.items():
        if not isinstance(meta.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}"
    optional = {"module_sha256": str, "tvm_version": str, "tvmzoo_version": str, "preprocess": str,
                "preprocessing": dict}
    for key, kind in optional.items():
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            return f"'{key}' must be a {kind.__name__}, got {printable(repr(meta[key]), 60)}"
    if not all(isinstance(f, str) for f in meta["cpu_features"]):
        return "'cpu_features' must be a list of strings"
    return (_input_problem(meta["input"]) or _fused_problem(meta)
            or _preprocessing_problem(meta.get("preprocessing")))


def _fused_problem(meta: dict) -> str | None:
    """A fused module takes the resized uint8 NHWC image, a host-preprocessed one an NCHW tensor: a
    mod.json saying otherwise was edited (every image would fail with a TVM shape error)."""
    fused = meta.get("preprocess") == "fused"
    dtype, layout = np.dtype(meta["input"].get("dtype", "float32")), meta["input"].get("layout", "NCHW")
    if (dtype, layout) != ((np.uint8, "NHWC") if fused else (np.float32, "NCHW")):
        return (f"'preprocess' is {meta.get('preprocess', 'host')!r} but the input is {dtype} {layout}; a fused "
                "module takes uint8 NHWC, a host-preprocessed one float32 NCHW")
    return None


def _input_problem(spec: dict) -> str | None:
    shape = spec.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and
            all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        return f"'input.shape' must be four integers, got {printable(repr(shape), 60)}"
    if min(shape) < 1:   # a symbolic batch ran 15x slower (no schedule applies) and int8 did not build
        return f"'input.shape' must be a batch and three sizes >= 1 (vamc compile fixes the batch), got {shape}"
    try:
        kind = np.dtype(spec.get("dtype", "float32")).kind
    except TypeError:
        kind = None
    if kind not in ("f", "u", "i"):
        return f"'input.dtype' must be a numeric dtype, got {printable(repr(spec.get('dtype')), 60)}"
    return None


def _preprocessing_problem(pre: dict | None) -> str | None:
    try:
        CompiledModel.preprocessing_from_meta({"preprocessing": pre})
    except (TypeError, ValueError, ConfigError) as exc:
        return f"'preprocessing': {printable(exc, 160)}"
    return None


def check_module_file(meta: dict, directory: Path, data: bytes | None = None) -> None:
    """Refuse a mod.so that is not the one mod.json describes (truncated, overwritten, half-copied):
    loading a damaged shared object can kill the process (SIGBUS) instead of raising. With `data`, the
    bytes read from it are checked (what is sent to an RPC device is exactly what was checked)."""
    so = directory / MODULE_FILE
    if data is None and not so.is_file():
        raise ModuleError(f"{so} is missing; recompile the model with `vamc compile`.")
    expected = meta.get("module_sha256")
    if expected is None:  # built before tvmzoo recorded the checksum
        log.debug("%s records no module checksum: not verified", directory / META_FILE)
        return
    if (file_sha256(so) if data is None else hashlib.sha256(data).hexdigest()) != expected:
        raise ModuleError(f"{so} does not match {META_FILE} (checksum differs): the file is corrupt, truncated "
                          "or from another build; recompile with `vamc compile`.")


def check_compatible(meta: dict, directory: Path) -> None:
    """Refuse modules this host or this version cannot run, before loading any machine code."""
    import tvm

    if meta.get("tvm_version") != tvm.__version__:
        raise ModuleError(f"{directory} was built with TVM {meta.get('tvm_version')} but TVM {tvm.__version__} "
                          "is installed; recompile it with `vamc compile`.")
    if meta.get("tvmzoo_version") != __version__:
        raise ModuleError(f"{directory} was built by tvmzoo {meta.get('tvmzoo_version')}, this is {__version__}; "
                          "recompile it with `vamc compile`.")
    missing = missing_features(meta.get("cpu_features", []))
    if missing:
        raise ModuleError(f"{directory} was built for {meta['target'].get('mcpu')} and needs CPU features this host "
                          f"lacks ({', '.join(missing)}); running it would crash with an illegal instruction. "
                          "Recompile it here (backend.target: host) or for this CPU.")


def check_amx(meta: dict, directory: Path) -> None:
    """Ask Linux for AMX tile state before any kernel runs (an AMX instruction without it is SIGILL);
    refuse a module with AMX kernels where it is denied. Modules before `amx_kernels` was recorded
    (0.x builds) only ask."""
    if not uses_amx(meta["cpu_features"]) or request_amx() or not meta.get("amx_kernels"):
        return
    raise ModuleError(
        f"{directory} runs {meta['amx_kernels']} kernels on AMX tiles, but Linux refused this process the "
        "AMX tile state (a kernel before 5.16, or a sandbox that blocks arch_prctl); its first tile "
        "instruction would crash. Run it where AMX is allowed, or recompile without AMX: backend.target: "
        "{kind: llvm, mcpu: " + str(meta["target"].get("mcpu")) + ", mattr: [-amx-tile, -amx-int8, -amx-bf16]}")


@dataclass
class CompiledModel:
    directory: Path
    meta: dict
    vm: object
    device: object = None      # where inputs go: tvm.cpu() when None, a remote session's cpu() over RPC
    _staging: object = field(default=None, init=False, repr=False)  # input copy for unaligned batches
    _rows: np.ndarray | None = field(default=None, init=False, repr=False)  # `stage`'s aligned buffer
    _dirty: int = field(default=0, init=False, repr=False)   # leading rows of `_rows` that may be non-zero

    @classmethod
    def load(cls, prefix: str | Path) -> CompiledModel:
        import tvm
        from tvm import relax

        directory = model_dir(prefix)
        meta = read_meta(directory)
        check_compatible(meta, directory)
        check_module_file(meta, directory)
        check_amx(meta, directory)
        try:
            lib = tvm.runtime.load_module(str(directory / MODULE_FILE))
            vm = relax.VirtualMachine(lib, tvm.cpu())
        except Exception as exc:  # TVM raises its own error types for a bad shared object
            raise ModuleError(f"cannot load {directory / MODULE_FILE}: {str(exc).splitlines()[0]}. "
                              "The file is corrupt or incomplete; recompile with `vamc compile`.") from exc
        return cls(directory, meta, vm)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["input"]["shape"])

    @property
    def fixed_batch(self) -> int | None:
        batch = self.input_shape[0]
        return batch if batch > 0 else None

    @staticmethod
    def preprocessing_from_meta(meta: dict) -> Preprocessing | None:
        pre = meta.get("preprocessing")
        return None if pre is None else Preprocessing.from_meta(pre)

    @property
    def preprocessing(self) -> Preprocessing | None:
        return self.preprocessing_from_meta(self.meta)

    @property
    def fused(self) -> bool:
        """True when preprocessing is compiled in: the input is the resized uint8 BGR NHWC image."""
        return self.meta.get("preprocess") == "fused"

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self.meta["input"].get("dtype", "float32"))

    @property
    def softmax(self) -> bool:
        return bool(self.meta.get("softmax"))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Outputs (logits, or probabilities with extra_ops softmax) for a batch of any size: NCHW float32,
        or NHWC uint8 for a fused module. A fixed-batch build's short batch is padded in `stage`."""
        self._check_dtype(batch)
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        step = self.fixed_batch
        if step is None or len(batch) == step:
            return self._run_exact(batch)
        outputs = []
        for start in range(0, len(batch), step):
            chunk = batch[start:start + step]
            outputs.append(self._run_exact(chunk if len(chunk) == step else self.stage([chunk]))[:len(chunk)])
        return np.concatenate(outputs)

    def stage(self, parts: list[np.ndarray], max_rows: int | None = None) -> np.ndarray:
        """The rows of `parts` copied once into an aligned buffer kept between calls, which `run` reads in
        place (a deployment's input binding), zero-padded to a fixed-batch build's batch. More rows than
        one fixed batch (or `max_rows`) come back as one new array (`run` splits it). A new padded array
        each call, copied again into TVM's staging tensor, cost Lite0 b8 with one row 74.7 vs 72.1 ms of CPU
        (fp32), 33.1 vs 32.7 (int8) per call (benchmarks/results/serve_perf_clients.md). Only rows written
        by an earlier call are zeroed again: re-zeroing 7 rows of 602 KB for each one-image request on a b8
        build cost the server's instance thread ~0.3 ms per request at concurrency 1. One part that already is
        the whole batch where `run` reads it in place (the HTTP server's received tensor, 64-byte aligned) is
        returned as it is: Lite0 int8 b1 2.23 vs 2.29 ms of CPU per call with the copy (48 distinct received
        buffers, 6 interleaved rounds, one thread; outputs identical)."""
        for part in parts:
            self._check_dtype(part)
        rows = sum(len(p) for p in parts)
        capacity = self.fixed_batch or max_rows or rows
        row_shape = self.input_shape[1:]
        if rows > capacity or any(p.shape[1:] != row_shape for p in parts):   # the VM reports a wrong shape
            return np.concatenate(parts).astype(self.input_dtype, copy=False)
        if len(parts) == 1 and rows == (self.fixed_batch or rows) and _in_place(parts[0], self.input_dtype):
            return parts[0]   # already the whole batch where `run` reads it in place (the server's received tensor)
        if self._rows is None or len(self._rows) < capacity:
            self._rows = aligned_empty((capacity, *row_shape), self.input_dtype)
            self._dirty = capacity
        batch = self._rows[:self.fixed_batch or rows]
        np.concatenate(parts, out=batch[:rows], casting="same_kind")
        batch[rows:self._dirty] = 0
        self._dirty = rows
        return batch

    def _check_dtype(self, array: np.ndarray) -> None:
        """Inputs are converted to the module's dtype only within their kind (float64 -> float32, uint8 ->
        float32): a float array into a uint8 (fused-preprocessing) module would be silently truncated."""
        given = np.asarray(array).dtype
        if not np.can_cast(given, self.input_dtype, casting="same_kind"):
            hint = (" (the resized uint8 image: tvmzoo.preprocess.fused.fused_input)" if self.fused else "")
            raise ValueError(f"{self.directory} takes {self.input_dtype} input{hint}, got {given}: converting "
                             f"{given} to {self.input_dtype} would change the values. Pass {self.input_dtype}.")

    def _run_exact(self, batch: np.ndarray) -> np.ndarray:
        keep_pool_within_affinity()
        try:
            out = self.vm["main"](self._input_tensor(batch))
        except Exception as exc:  # noqa: BLE001 - TVM raises its own error types
            refused = self._signature_error(exc, batch)
            if refused is None:
                raise
            raise refused from None
        if isinstance(out, (list, tuple)) or not hasattr(out, "numpy"):
            out = out[0]
        return out.numpy().astype(np.float32)

    def _signature_error(self, exc: Exception, batch: np.ndarray) -> Exception | None:
        """TVM's check of the input against the compiled signature (`match_cast error ... annotation=R.Tensor(..)`)
        as an error that says whose mistake it is: a batch that fits mod.json means mod.json does not
        describe mod.so (edited by hand, or copied from another build); else the caller passed another shape."""
        found = re.search(r"loc=param\[0\].*?annotation=(R\.Tensor\(.*?\))\)", str(exc))
        if found is None:
            return None
        takes = found.group(1)
        if batch.shape[1:] == self.input_shape[1:] and len(batch) == (self.fixed_batch or len(batch)):
            return ModuleError(f"{self.directory}: mod.json says the module takes {self.input_dtype} "
                               f"{list(self.input_shape)} but mod.so takes {takes}: mod.json was edited or comes "
                               "from another build. Recompile the model with `vamc compile`.")
        return ValueError(f"{self.directory} takes {takes}, got {batch.dtype} {list(batch.shape)}.")

    def _input_tensor(self, batch: np.ndarray):
        """The batch as the VM's input: in place when it is aligned (see `aligned_empty`), else copied into a
        buffer kept between calls. A fresh copy per call costs more than the copy itself: Lite0 int8 at
        batch 1 ran 1.63 ms on an input used in place, 1.72 on a new copy each call."""
        import tvm

        if self.device is not None:  # a remote device: the batch goes over RPC
            return tvm.runtime.tensor(batch, device=self.device)
        if batch.ctypes.data % ALIGNMENT == 0 and batch.flags.writeable:  # numpy exports no read-only DLPack
            return tvm.runtime.from_dlpack(batch)
        if self._staging is None or tuple(self._staging.shape) != batch.shape \
                or str(self._staging.dtype) != str(batch.dtype):
            self._staging = tvm.runtime.empty(batch.shape, str(batch.dtype), tvm.cpu())
        self._staging.copyfrom(batch)
        return self._staging
