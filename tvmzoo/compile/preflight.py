"""Every input a build will read and the place it will write, checked before the first compile starts:
a misspelt calibration folder is found in a second, not after half a minute of compiling fp32."""
from __future__ import annotations

from pathlib import Path

from ..config import BuildConfig
from ..errors import ConfigError, TvmzooError
from ..io.outputs import check_replaceable
from ..run.runtime import META_FILE


def check_build_output(cfg: BuildConfig) -> Path:
    """<workspace>/<name> can be written, and replacing it deletes nothing but an earlier build."""
    return check_replaceable(Path(cfg.workspace) / cfg.name, META_FILE, f"{cfg.path}: workspace.path / name:")


def beside_yaml(cfg: BuildConfig, path: Path | str | None) -> str:
    """A hint when `path` is missing but the same relative path exists beside the YAML: paths in a build YAML
    are read from the current folder (as the vendor flow reads them), which surprises a YAML run from elsewhere."""
    if path is None or cfg.path is None:
        return ""
    path, cwd = Path(path), Path.cwd()
    if path.exists() or not path.is_relative_to(cwd):
        return ""
    there = Path(cfg.path).resolve().parent / path.relative_to(cwd)
    if not there.exists():
        return ""
    return (f" (paths in a build YAML are read from the current folder, {cwd}; {there} is beside the YAML: "
            "run from the YAML's folder, or write the path from here or as an absolute path)")


def check_onnx_source(cfg: BuildConfig) -> None:
    """frontend.checkpoint is an ONNX file, or missing with a model section to export it from."""
    path = Path(cfg.frontend.checkpoint)
    if path.is_dir():
        raise ConfigError(f"{cfg.path}: frontend.checkpoint {path} is a folder: set it to the deploy .onnx file "
                          "(or to where a 'model:' section should export it).")
    if not path.is_file() and cfg.model is None:
        raise ConfigError(f"{cfg.path}: frontend.checkpoint {path} does not exist{beside_yaml(cfg, path)}. Export it first "
                          "(tvmzoo export ...) or add a 'model:' section (family, arch, source, weights) "
                          "so that compile exports it.")


def check_build_inputs(cfg: BuildConfig, calibrate: bool | None = None) -> None:
    """The ONNX (or the checkpoint it is exported from) and, for int8 (`calibrate`), the calibration images."""
    check_onnx_source(cfg)
    if not Path(cfg.frontend.checkpoint).is_file():
        _check_weights(cfg)
    if calibrate is None:
        calibrate = cfg.backend.dtype == "int8"
    if not calibrate:
        return
    if cfg.dataset is None or cfg.dataset.preprocessing is None:
        raise ConfigError(f"{cfg.path}: int8 calibration needs a dataset section with dataset.path and "
                          "dataset.process_ops.")
    from .quant.calibration import calibration_images

    try:
        calibration_images(cfg.dataset)
    except ConfigError as exc:
        raise ConfigError(f"{cfg.path}: {exc}{beside_yaml(cfg, cfg.dataset.path)} (or pass --set "
                          "dataset.path=<folder>)") from None


def _check_weights(cfg: BuildConfig) -> None:
    from ..models.export import resolve_weights

    try:
        resolve_weights(cfg.model.family, cfg.model.arch, cfg.model.source, str(cfg.model.weights))
    except TvmzooError as exc:
        raise type(exc)(f"{cfg.path}: model: {exc}{beside_yaml(cfg, cfg.model.weights)}") from None
