"""A tiny classifier for runner tests: a narrow custom RepVGG (random weights, real BN statistics)
exported to ONNX and compiled through the library, fast enough for thousands of images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import yaml

from tvmzoo.compile.compiler import compile_model
from tvmzoo.config import load_build_config
from tvmzoo.models import repvgg

ARCH = repvgg.RepVGGArch((1, 1, 1, 1), (0.25, 0.25, 0.25, 0.25))


def tiny_onnx(path: Path, size: int = 32, seed: int = 0) -> Path:
    state = repvgg.random_state_dict(ARCH, "official", np.random.default_rng(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(repvgg.deploy_onnx(state, ARCH, "official", size_hw=(size, size)), str(path))
    return path


def build_tiny(root: Path, name: str, **options) -> Path:
    """Compile the tiny model into root/ws/<name>; returns its model prefix (…/<name>/mod). int8 calibrates
    on the images directly in `root` (max ranges, per channel)."""
    return compile_model(load_build_config(tiny_yaml(root, name, **options))) / "mod"


def tiny_yaml(root: Path, name: str, *, size: int = 32, preprocess: str = "host", softmax: bool = True,
              resize_short: int | None = None, batch: int = 1, dtype: str = "fp32",
              interpolation: str | None = None) -> Path:
    """The build YAML of the tiny model (root/<name>.yaml, workspace root/ws)."""
    checkpoint = root / "tiny.onnx"
    if not checkpoint.is_file():
        tiny_onnx(checkpoint, size)
    resize = {"resize_short": resize_short} if resize_short else {"size": [size + 8, size + 8]}
    if interpolation:
        resize["interpolation"] = interpolation
    cfg = {
        "name": name,
        "frontend": {"shape": {"input": [batch, 3, size, size]}, "type": "onnx", "checkpoint": str(checkpoint)},
        "backend": {"type": "tvm", "dtype": dtype,
                    **({"quantize": {"calibrate_mode": "max", "quantize_per_channel": True}} if dtype == "int8" else {})},
        "graph": {"extra_ops": {"type": "softmax"} if softmax else None, "preprocess": preprocess},
        "dataset": {"path": str(root), "process_ops": [
            {"type": "DecodeImage", "to_rgb": True}, {"type": "Resize", **resize},
            {"type": "CenterCrop", "crop_size": [size, size]},
            {"type": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            {"type": "ToTensor"}]},
        "workspace": {"path": str(root / "ws")},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
