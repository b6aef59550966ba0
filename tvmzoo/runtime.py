"""Load a compiled model (mod.so + mod.json) and run batches on it."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .compiler import META_FILE, MODULE_FILE
from .errors import ModuleError
from .preprocess import Preprocessing
from .target import missing_features

log = logging.getLogger(__name__)


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
        return json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModuleError(f"{meta_path} is corrupt ({exc}); recompile the model with `vamc compile`.") from exc


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


@dataclass
class CompiledModel:
    directory: Path
    meta: dict
    vm: object

    @classmethod
    def load(cls, prefix: str | Path) -> CompiledModel:
        import tvm
        from tvm import relax

        directory = model_dir(prefix)
        meta = read_meta(directory)
        check_compatible(meta, directory)
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
        return None if pre is None else Preprocessing(**{k: tuple(v) if isinstance(v, list) else v
                                                         for k, v in pre.items()})

    @property
    def preprocessing(self) -> Preprocessing | None:
        return self.preprocessing_from_meta(self.meta)

    @property
    def softmax(self) -> bool:
        return bool(self.meta.get("softmax"))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Outputs (logits, or probabilities with extra_ops softmax) for an NCHW float32 batch of any size."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        step = self.fixed_batch
        if step is None or len(batch) == step:
            return self._run_exact(batch)
        outputs = []
        for start in range(0, len(batch), step):
            chunk = batch[start:start + step]
            pad = step - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
            outputs.append(self._run_exact(chunk)[:step - pad])
        return np.concatenate(outputs)

    def _run_exact(self, batch: np.ndarray) -> np.ndarray:
        import tvm

        out = self.vm["main"](tvm.runtime.tensor(batch))
        if isinstance(out, (list, tuple)) or not hasattr(out, "numpy"):
            out = out[0]
        return out.numpy().astype(np.float32)
