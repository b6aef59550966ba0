"""The npz datalist route of the vendor flow: image2npz -> vamp --datalist -> npz decode."""
from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..io.atomic import write_bytes, write_text
from ..errors import ConfigError, ImageError
from ..preprocess import read_image

log = logging.getLogger(__name__)

INPUT_KEY = "input_0"


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def images_to_npz(images: Sequence[Path], target: Path, text_path: Path,
                  progress: bool = True) -> tuple[list[Path], list[tuple[str, str]]]:
    """Each image as uint8 RGB CHW at its original size in `target/<parent>/<stem>.npz`; the list of
    absolute npz paths goes to `text_path`. Returns (written, failed)."""
    written, failed = [], []
    for image in tqdm(images, disable=not progress or len(images) < 20, unit="img"):
        try:
            bgr = read_image(image)
        except ImageError as exc:
            log.warning("skipped %s", exc)
            failed.append((str(image), str(exc)))
            continue
        out = (target / image.parent.name / f"{image.stem}.npz").resolve()
        save_npz(out, **{INPUT_KEY: np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1))})
        written.append(out)
    write_text(text_path, "".join(f"{p}\n" for p in written))
    return written, failed


def read_datalist(path: Path) -> list[Path]:
    if not Path(path).is_file():
        raise ConfigError(f"datalist not found: {path}. Write it with image2npz.py --text_path.")
    return [Path(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def load_input(path: Path) -> np.ndarray:
    """An image2npz file back as an HxWx3 BGR uint8 image (the layout read_image returns)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            chw = data[INPUT_KEY]
    except (OSError, KeyError, ValueError) as exc:
        raise ImageError(f"cannot read {path}: {exc}. Expected an npz with key '{INPUT_KEY}' "
                         "written by image2npz.py.") from exc
    if chw.ndim != 3 or chw.shape[0] != 3:
        raise ImageError(f"{path}: '{INPUT_KEY}' has shape {chw.shape}; expected uint8 [3, H, W] RGB.")
    return np.ascontiguousarray(chw.transpose(1, 2, 0)[:, :, ::-1])


def output_path(out_dir: Path, index: int, input_path: Path) -> Path:
    """The output npz for datalist line `index`: named by position, so pairing never depends on listing order."""
    return Path(out_dir) / f"{index:07d}_{Path(input_path).stem}.npz"


def read_outputs(datalist: Sequence[Path], out_dir: Path) -> np.ndarray:
    rows = []
    for i, item in enumerate(datalist):
        path = output_path(out_dir, i, item)
        if not path.is_file():
            raise ConfigError(f"missing output {path} for datalist line {i + 1} ({item}). "
                              "Run vamp --datalist with the same datalist and --path_output.")
        with np.load(path, allow_pickle=False) as data:
            rows.append(data["output_0"].reshape(-1))
    return np.stack(rows)
