"""image2npz's output names: each image's path under the dataset folder, with .npz for its suffix, so
`a/cat.JPEG` and `b/cat.JPEG` stay two files. Two images of one folder differing only in suffix
(`cat.JPEG`, `cat.png`) keep their suffix (`cat.JPEG.npz`, `cat.png.npz`); a name still taken twice is
refused with the reason, never written over."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path


def _relative(image: Path, root: Path | None) -> Path:
    if root is not None and Path(root).is_dir():
        try:
            return Path(image).relative_to(root)
        except ValueError:
            pass
    return Path(Path(image).name)


def npz_names(images: Sequence[Path], root: Path | None) -> dict[Path, Path | str]:
    """image -> its npz path relative to the target folder, or the reason it has none (a collision)."""
    relative = {image: _relative(image, root) for image in images}
    short = {image: rel.with_suffix(".npz") for image, rel in relative.items()}
    counts = Counter(short.values())
    names = {image: name if counts[name] == 1 else relative[image].with_name(relative[image].name + ".npz")
             for image, name in short.items()}
    owners: dict[Path, Path] = {}
    for image, name in names.items():
        owners.setdefault(name, image)
    return {image: name if owners[name] == image else
            f"its npz name {name} is also the name of {owners[name]}'s npz; rename one of them"
            for image, name in names.items()}
