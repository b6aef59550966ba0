"""`tvmzoo reparam`: a train checkpoint -> the deploy checkpoint of the source's own deploy model, in the
source's own file format (no torch or paddle needed):

- official (DingXiaoH/RepVGG convert.py): torch.save of the deploy state dict (`rbr_reparam`), loads into
  `create_RepVGG_*(deploy=True)` with strict=True;
- mmcls (mmpretrain tools/model_converters/reparameterize_model.py): torch.save of
  {'meta': ..., 'state_dict': ...} with `backbone.*.branch_reparam`, for the config with `deploy=True`;
- ppcls (PaddleClas): a .pdparams with `rbr_reparam`, for a model after `re_parameterize()`.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..io.checkpoint import load_state_dict, read_metadata
from ..io.outputs import check_output_file
from ..io.pdparams_writer import save_pdparams
from ..io.pth_writer import save_torch
from . import get_family, resolve_arch, resolve_source
from .export import resolve_weights

log = logging.getLogger(__name__)

WRAPPED_SOURCES = ("mmcls",)       # checkpoints wrapped as {'meta': ..., 'state_dict': ...}
PADDLE_SOURCES = ("ppcls",)        # .pdparams


@dataclass(frozen=True)
class ReparamSpec:
    family: str
    arch: str
    source: str
    weights: str


def _write(state: dict, source: str, output: Path, meta: dict) -> None:
    if source in PADDLE_SOURCES:
        if output.suffix != ".pdparams":
            log.warning("%s: PaddleClas loads .pdparams files; the name has suffix '%s'", output, output.suffix)
        save_pdparams(state, output)
    elif source in WRAPPED_SOURCES:
        save_torch({"meta": meta, "state_dict": OrderedDict(state)}, output)
    else:
        save_torch(OrderedDict(state), output)


def write_deploy_checkpoint(spec: ReparamSpec, output: str | Path) -> Path:
    """Read `spec.weights`, fold it into the source's deploy form and write it to `output` (atomically)."""
    output = check_output_file(output, "output", {"checkpoint": spec.weights and Path(spec.weights).expanduser()})
    family = get_family(spec.family)
    if family.deploy_state is None:
        raise ConfigError(f"{spec.family} has no train-time branches or BatchNorm to fold in a checkpoint: "
                          f"its checkpoint is already the deploy form.")
    arch = resolve_arch(family, spec.arch)
    source = resolve_source(family, spec.source)
    weights = resolve_weights(spec.family, spec.arch, spec.source, spec.weights)
    state = family.deploy_state(load_state_dict(weights), arch, source)
    # mmpretrain's converter keeps the checkpoint's other entries; its meta (classes, versions) is kept here
    meta = {**read_metadata(weights), "reparameterized": True, "converted_by": "tvmzoo reparam", "arch": arch}
    if source in PADDLE_SOURCES and any(k.endswith(".se.down.weight") for k in state):
        log.warning("PaddleClas's re-parameterized RepVGGBlock.forward skips its SE block (ppcls repvgg.py, "
                    "`if self.is_repped: return self.nonlinearity(self.rbr_reparam(inputs))`): PaddleClas itself "
                    "computes a D2se deploy model without SE. The file holds the SE weights; tvmzoo export uses them.")
    _write(state, source, output, meta)
    log.info("wrote %s (%s %s, %s layout, %d tensors)", output, spec.family, arch, source, len(state))
    return output
