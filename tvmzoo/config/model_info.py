"""What model a build YAML or a family:arch name describes, for `tvmzoo info`: its ModelInfo (parameters,
multiply-adds, layers), counted from the YAML's deploy ONNX when it exists, else from its model: section."""
from __future__ import annotations

import logging
from pathlib import Path

import onnx

from ..errors import ConfigError
from ..models import get_family, resolve_arch, resolve_source
from ..models.info import ModelInfo, family_info, model_info, num_classes
from .schema import load_build_config

log = logging.getLogger(__name__)


def _parse_target(target: str) -> tuple[str, str, str | None]:
    parts = target.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"'{target}' is neither a build YAML nor family:arch[:source] "
                          f"(e.g. repvgg:A0, regnet:400MF, regnet:400MF:torchvision).")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def info_for(target: str, overrides: dict | None = None) -> ModelInfo:
    """ModelInfo for `tvmzoo info TARGET`: a build YAML (its deploy ONNX when frontend.checkpoint exists,
    else its model: section; `overrides` are the CLI's --set) or family:arch[:source]."""
    path = Path(target)
    if path.suffix.lower() in (".yaml", ".yml") or path.is_file():
        return _yaml_info(path, overrides)
    if overrides:
        raise ConfigError(f"--set changes a build YAML; {target} is a family:arch name. Drop --set.")
    family, arch, source = _parse_target(target)
    return family_info(family, arch, source=source)


def _yaml_info(path: Path, overrides: dict | None = None) -> ModelInfo:
    cfg = load_build_config(path, overrides)
    shape = next(iter(cfg.frontend.shape.values()), None)
    size = (int(shape[2]), int(shape[3])) if shape is not None and len(shape) == 4 else None
    model = cfg.model
    if cfg.frontend.checkpoint.is_file():
        onnx_model = onnx.load(str(cfg.frontend.checkpoint))
        info = model_info(onnx_model, size_hw=size, name=cfg.name)
        if model is not None:
            fam = get_family(model.family)
            arch, source = resolve_arch(fam, model.arch), resolve_source(fam, model.source)
            train = fam.param_count(arch, source, num_classes(onnx_model), False)
            info = ModelInfo(**{**info.__dict__, "params_train": train})
        return info
    if model is None:
        raise ConfigError(f"{path}: frontend.checkpoint {cfg.frontend.checkpoint} does not exist and there is no "
                          f"model: section to build it from; run the export step first or add model: "
                          f"{{family, arch, source, weights}}.")
    log.info("%s: %s not exported yet; counting %s %s from the model section", path,
             cfg.frontend.checkpoint, model.family, model.arch)
    info = family_info(model.family, model.arch, size_hw=size, source=model.source)
    return ModelInfo(**{**info.__dict__, "name": cfg.name})
