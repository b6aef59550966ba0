"""The int8 calibration set of a build: a deterministic sample of the YAML's dataset images, preprocessed."""
from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...config import Dataset
from ...errors import ConfigError, ImageError
from ...io.images import find_images
from ...preprocess import Preprocessing, apply, read_image

log = logging.getLogger(__name__)


def sample_calibration(paths: Sequence[str | Path], n: int, seed: int = 0) -> list[Path]:
    """A deterministic sample of n images (all of them when n >= len(paths)), in sorted order:
    the same files whatever order `paths` came in."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"calibration sample size must be a positive integer, got {n!r}.")
    ordered = sorted(Path(p) for p in paths)
    if n >= len(ordered):
        return ordered
    return sorted(random.Random(seed).sample(ordered, n))


def calibration_images(dataset: Dataset) -> list[Path]:
    """The calibration images of `dataset.path` (with `dataset.suffix`); a clear error when there are none."""
    if not Path(dataset.path).exists():
        raise ConfigError(f"dataset.path {dataset.path} does not exist: set it to the folder of calibration "
                          "images (relative paths are from the current directory).")
    if not Path(dataset.path).is_dir():
        raise ConfigError(f"dataset.path {dataset.path} is a file: set it to the folder of calibration images.")
    paths = find_images(dataset.path, (dataset.suffix,))
    if not paths:
        raise ConfigError(f"dataset.path {dataset.path} has no '*.{dataset.suffix.lstrip('.')}' images for "
                          "calibration: fix dataset.path or dataset.sampler.suffix.")
    return paths


def calibration_batches(dataset: Dataset, pre: Preprocessing, batch: int = 1) -> list[np.ndarray]:
    """The build YAML's calibration set as preprocessed NCHW float32 batches: `dataset.get_data_num`
    images with `dataset.suffix`, sampled deterministically from `dataset.path`. Images that cannot
    be decoded are skipped with a warning."""
    tensors = []
    for path in sample_calibration(calibration_images(dataset), dataset.get_data_num):
        try:
            tensors.append(apply(pre, read_image(path)))
        except ImageError as err:
            log.warning("calibration: skipping %s", err)
    if not tensors:
        raise ConfigError(f"dataset.path {dataset.path}: none of the sampled images could be decoded.")
    return [np.stack(tensors[i:i + batch]) for i in range(0, len(tensors), batch)]
