"""The npz datalist route of the vendor flow: image2npz -> vamp --datalist -> npz decode."""
from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import ConfigError, ImageError, OutputError
from ..io.atomic import write_bytes, write_text
from ..io.npz_read import NpzProblem, read_array
from ..io.outputs import check_output_dir, check_output_file
from ..limits import MAX_CLASSES, check_not_special, check_text_size
from ..preprocess import MAX_PIXELS, read_image
from .filenames import quote_path, read_lines, unquote_path
from .npz_names import npz_names

log = logging.getLogger(__name__)

INPUT_KEY = "input_0"


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def images_to_npz(images: Sequence[Path], target: Path, text_path: Path, progress: bool = True,
                  root: Path | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Each image as uint8 RGB CHW at its original size in `target/<its path under root>.npz` (so two
    photos named alike in different folders stay two files); the list of absolute npz paths goes to
    `text_path`, any file name escaped (run/filenames.py). Returns (written, failed)."""
    if not images:
        raise ConfigError(f"no images found at {root if root is not None else 'the given paths'} (looked for "
                          ".jpg/.jpeg/.png/.bmp/.webp, recursively): an empty datalist would be written.")
    check_output_dir(target, "--target_path")
    check_output_file(text_path, "--text_path")
    written, failed = [], []
    names = npz_names(images, root)
    for image in tqdm(images, disable=not progress or len(images) < 20, unit="img"):
        name = names[image]
        try:
            if isinstance(name, str):
                raise ImageError(name)
            bgr = read_image(image)
            out = (target / name).resolve()
            save_npz(out, **{INPUT_KEY: np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1))})
        except (ImageError, OutputError, OSError) as exc:  # OSError: a name too long for the file system
            log.warning("skipped %s: %s", image, exc)
            failed.append((str(image), str(exc) if isinstance(exc, (ImageError, OutputError))
                           else f"cannot write its npz: {exc}"))
            continue
        written.append(out)
    write_text(text_path, "".join(f"{quote_path(str(p))}\n" for p in written))
    return written, failed


def read_datalist(path: Path) -> list[Path]:
    check_not_special(path, "datalist")
    if not Path(path).is_file():
        raise ConfigError(f"datalist not found: {path}. Write it with image2npz.py --text_path.")
    check_text_size(path, "datalist")
    items = [Path(unquote_path(line)) for line in read_lines(path) if line.strip()]
    if not items:
        raise ConfigError(f"datalist {path} lists no npz files: write it with image2npz.py from a folder of images.")
    return items


def load_input(path: Path) -> np.ndarray:
    """An image2npz file back as an HxWx3 BGR uint8 image (the layout read_image returns)."""
    try:
        chw = read_array(path, INPUT_KEY, _image_header_problem)
    except NpzProblem as exc:
        raise ImageError(f"cannot read {path}: {exc}. Expected an npz with key '{INPUT_KEY}' (uint8 [3, H, W] "
                         "RGB) written by image2npz.py.") from None
    return np.ascontiguousarray(chw.transpose(1, 2, 0)[:, :, ::-1])


def _image_header_problem(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    if len(shape) != 3 or shape[0] != 3 or dtype != np.uint8 or 0 in shape:
        return f"'{INPUT_KEY}' is {dtype} of shape {shape}"
    if shape[1] * shape[2] > MAX_PIXELS:
        return f"{shape[2]}x{shape[1]} pixels is above the limit of {MAX_PIXELS} pixels"
    return None


def output_path(out_dir: Path, index: int, input_path: Path) -> Path:
    """The output npz for datalist line `index`: named by position, so pairing never depends on listing order
    (the input's name is kept to 100 bytes, so that a long one still fits the file system's 255)."""
    stem = os.fsdecode(os.fsencode(Path(input_path).stem)[:100])
    return Path(out_dir) / f"{index:07d}_{stem}.npz"


def read_outputs(datalist: Sequence[Path], out_dir: Path) -> np.ndarray:
    rows = []
    for i, item in enumerate(datalist):
        path = output_path(out_dir, i, item)
        if not path.is_file():
            raise ConfigError(f"missing output {path} for datalist line {i + 1} ({item}). "
                              "Run vamp --datalist with the same datalist and --path_output.")
        try:
            rows.append(read_array(path, "output_0", _output_header_problem).reshape(-1))
        except NpzProblem as exc:
            raise ConfigError(f"cannot read {path} (output of datalist line {i + 1}): {exc}. Run vamp --datalist "
                              "again to rewrite it.") from None
        bad = np.flatnonzero(~np.isfinite(rows[-1]))
        if bad.size:   # was: every score NaN after softmax, written as "prob: nan" with class 0 on top
            raise ConfigError(f"{path} (output of datalist line {i + 1}) holds {bad.size} NaN or infinite scores "
                              f"(the first at index {bad[0]}): its top-k would mean nothing. The model (or its "
                              "weights) is broken there: check the build with tvmzoo run on that image.")
        if rows[-1].shape != rows[0].shape:
            raise ConfigError(f"{path} holds {rows[-1].size} scores, {output_path(out_dir, 0, datalist[0])} "
                              f"holds {rows[0].size}: the outputs come from different models; run vamp again.")
    return np.stack(rows)


def _output_header_problem(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    if dtype.kind not in "fiu" or math.prod(shape) > MAX_CLASSES or math.prod(shape) == 0:
        return f"'output_0' is {dtype} of shape {shape}, not the scores of up to {MAX_CLASSES} classes"
    return None
