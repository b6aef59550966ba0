"""The interface every model family implements (one `FAMILY` per family module), as typed fields
instead of module attributes probed with hasattr: the registry, export, info and the contract test
use only this."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .weights import Weights

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class ModelFamily:
    name: str                                            # registry key, e.g. 'repvgg'
    archs: Mapping[str, Any]                             # arch table: canonical name -> spec
    sources: tuple[str, ...]                             # checkpoint key layouts it reads
    reference_source: str                                # the layout `tvmzoo info` counts by default
    # every weight key of a (arch, source) checkpoint with n classes and its shape
    expected_shapes: Callable[[str, str, int], Shapes]
    # (state without prefixes / framework keys, num_classes), or one CheckpointError
    check_state: Callable[[Mapping[str, np.ndarray], str, str], tuple[dict, int]]
    # the inference graph, BN / re-param folded: deploy_onnx(state, arch, source, size_hw=(H, W), batch=N)
    deploy_onnx: Callable[..., onnx.ModelProto]
    weights: tuple[Weights, ...]                         # the published checkpoints (tvmzoo.models.weights)
    # trainable parameters: param_count(arch, source, num_classes, deploy)
    param_count: Callable[[str, str, int, bool], int]
    # random_state_dict(arch, source, rng, num_classes): a test checkpoint in the layout
    random_state_dict: Callable[[str, str, np.random.Generator, int], dict[str, np.ndarray]]
    # deploy_state(state, arch, source): the source's own deploy state dict (`tvmzoo reparam`); None: no deploy form
    deploy_state: Callable[[Mapping[str, np.ndarray], str, str], dict[str, np.ndarray]] | None = None
