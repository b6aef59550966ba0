"""What the library reads at run time, as package data (importlib.resources), so that a wheel works
like the checkout: the build YAMLs, vdsp params and shipped tuning records of `build_in/`, and the
ImageNet labels and sample photos of `tvmzoo/data/`.

`tvmzoo/build_in` is a symlink to the repository's `build_in/` (the user-facing copy): one source,
copied into the wheel by setuptools (pyproject.toml package-data), read in place by a checkout."""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def _package_path(*parts: str) -> Path:
    return Path(str(resources.files("tvmzoo").joinpath(*parts)))


def build_in(*parts: str) -> Path:
    """A path under build_in/ (build/<yaml>, vdsp_params/<json>, tuning/...)."""
    return _package_path("build_in", *parts)


def data(*parts: str) -> Path:
    """A path under tvmzoo/data/ (imagenet.txt, imagenet_wnids.txt, images/)."""
    return _package_path("data", *parts)
