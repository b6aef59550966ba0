"""Step 1: read a checkpoint (no torch or paddle), re-parameterize, write the deploy ONNX."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..io.atomic import atomic_path
from ..io.outputs import check_output_file
from ..io.checkpoint import load_state_dict
from ..errors import CheckpointError
from ..limits import not_regular_message, special_file
from . import PACKAGED_WEIGHTS, get_family, resolve_arch, resolve_source, weights_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportSpec:
    """What `tvmzoo export` writes: the family's arch from a `source`-layout checkpoint (a path, or
    'package'), its input (height, width) and batch."""

    family: str
    arch: str
    source: str
    weights: str
    size_hw: tuple[int, int] = (224, 224)
    batch: int | None = None                   # None: symbolic batch 'N'


def resolve_weights(family: str, arch: str, source: str, weights: str) -> Path:
    """The checkpoint file: a path, or 'package' for the file a pip package installs (the weights entry's)."""
    if weights == PACKAGED_WEIGHTS:
        entry = weights_for(family, arch, source)
        if entry.packaged is None:
            raise CheckpointError(f"model.weights: 'package': no pip package ships the weights {entry.key}; "
                                  "give the path of your checkpoint instead (`tvmzoo models` lists the packaged ones).")
        return Path(entry.packaged())
    path = Path(weights).expanduser()
    if special_file(path):   # was: "checkpoint not found"
        raise CheckpointError(not_regular_message(path, "checkpoint", special_file(path)))
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}. Download the weights (see the model's README "
                              f"under source_code/) and set model.weights or --weights to the file.")
    return path


def build_deploy_onnx(spec: ExportSpec) -> onnx.ModelProto:
    family = get_family(spec.family)
    arch = resolve_arch(family, spec.arch)
    source = resolve_source(family, spec.source)
    weights = resolve_weights(spec.family, spec.arch, spec.source, spec.weights)
    state = load_state_dict(weights)
    log.info("exporting %s %s (%s layout) from %s", spec.family, arch, source, weights)
    return family.deploy_onnx(state, arch, source, size_hw=spec.size_hw, batch=spec.batch)


def export_onnx(spec: ExportSpec, output: str | Path) -> Path:
    """Write the deploy ONNX for `spec` to `output` (atomically) and return its path."""
    output = check_output_file(output, "ONNX output", {"checkpoint": spec.weights and Path(spec.weights).expanduser()})
    model = build_deploy_onnx(spec)
    with atomic_path(output) as tmp:
        onnx.save(model, str(tmp))
    log.info("wrote %s", output)
    return output
