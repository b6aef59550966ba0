"""Images, labels and ground truth: image discovery, ImageNet label files, the class of an image
from its synset folder or file name."""
from __future__ import annotations

import ast
import itertools
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, printable
from ..limits import MAX_CLASSES, check_not_special, read_text_file
from .package_data import data

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
_WNID = re.compile(r"n\d{8}")


def find_images(path: str | Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """A file -> [file]; a folder -> its images, searched recursively, sorted. Suffixes compare
    case-insensitively ("JPEG" and ".jpeg" are the same); hidden files and folders (".x", such as
    macOS "._n01440764.JPEG" resource forks) are skipped. An empty folder gives []."""
    path = Path(path)
    wanted = {s.lower() if s.startswith(".") else "." + s.lower() for s in suffixes}
    if path.is_file():
        return [path]
    check_not_special(path, "image path")
    if not path.is_dir():
        raise ConfigError(f"image path {path} does not exist: give an image file or a folder of images.")
    found = [p for p in path.rglob("*")
             if p.suffix.lower() in wanted and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    return sorted(found)


@dataclass(frozen=True)
class Labels:
    """Class names by index; wnids (ImageNet synset ids, "n01440764") when known."""

    names: tuple[str, ...]
    wnids: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def wnid_to_index(self) -> dict[str, int]:
        if self.wnids is None:
            raise ConfigError("these labels have no wnids: load them with a wnid list "
                              "(Labels.load(names_file, wnids_file)) to map synset folders to classes.")
        return {wnid: i for i, wnid in enumerate(self.wnids)}

    @classmethod
    def load(cls, path: str | Path, wnids_path: str | Path | None = None) -> Labels:
        """Read a label file: one name per line (`imagenet.txt`), `<wnid>\\t<names>` per line
        (`imagenet_synsets.txt`) or the `{0: 'tench, Tinca tinca', ...}` dict literal
        (`imagenet1000_clsid_to_human.txt`). `wnids_path`: one wnid per line, same order."""
        path = Path(path)
        text = _read_text(path, "label file")
        if text.lstrip().startswith("{"):
            names, wnids = _parse_dict_literal(text, path), None
        else:
            lines = [line.rstrip("\r") for line in text.split("\n")]
            while lines and not lines[-1].strip():
                lines.pop()
            if not lines:
                raise ConfigError(f"label file {path} is empty: it needs one class name per line.")
            blank = next((i for i, line in enumerate(lines) if not line.strip()), None)
            if blank is not None:
                raise ConfigError(f"label file {path}, line {blank + 1} is blank: line n names class n - 1, so "
                                  "every class after it would get the wrong name. Remove the line or name the class.")
            _check_class_count(len(lines), path)
            split = [line.split("\t", 1) for line in lines]
            if all(len(s) == 2 and _WNID.fullmatch(s[0]) for s in split):
                names, wnids = [s[1] for s in split], [s[0] for s in split]
            else:
                names, wnids = lines, None
        if wnids_path is not None:
            wnids = _read_wnids(Path(wnids_path), len(names))
        _check_unique_wnids(wnids, wnids_path or path)
        return cls(tuple(names), tuple(wnids) if wnids is not None else None)


def _read_text(path: Path, what: str) -> str:
    return read_text_file(path, what, encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not text


_DICT_ENTRY = re.compile(r"""\s*(-?\d+)\s*:\s*('(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")\s*(,|$)""", re.S)


def _parse_dict_literal(text: str, path: Path) -> list[str]:
    """{0: 'tench, Tinca tinca', ...} read entry by entry: ast.literal_eval of the whole file would build
    a syntax tree of about 170 bytes per character (a 13 MB file took 2.1 GB)."""
    body, table, pos = text.strip()[1:], {}, 0
    if not body.endswith("}"):
        raise ConfigError(f"label file {path} starts a dict literal but does not close it with '}}'.")
    body = body[:-1].rstrip()
    while pos < len(body):
        entry = _DICT_ENTRY.match(body, pos)
        if entry is None or len(table) >= MAX_CLASSES:
            if entry is not None:
                _check_class_count(len(table) + 1, path)
            rest = body[pos:pos + 200]
            line = text.count("\n", 0, text.index("{") + 1 + pos + len(rest) - len(rest.lstrip())) + 1
            raise ConfigError(f"label file {path}, line {line}: expected a dict of class index -> name like "
                              f"{{0: 'tench, Tinca tinca', 1: ...}}, found {rest.strip()[:40]!r}.")
        name, index = entry.group(2), int(entry.group(1))
        name = ast.literal_eval(name) if "\\" in name else name[1:-1]  # a string, never code
        if index in table:   # (was: the last kept silently)
            raise ConfigError(f"label file {path}: class {index} is named twice ({printable(table[index], 60)!r} "
                              f"and {printable(name, 60)!r}): keep one.")
        table[index] = name
        pos = entry.end()
    if not table:
        raise ConfigError(f"label file {path}: the dict names no classes.")
    _check_class_count(len(table), path)
    if any(not 0 <= k < len(table) for k in table):  # never sized by the largest index: it can be 10**9
        missing = list(itertools.islice((i for i in range(len(table)) if i not in table), 5))
        raise ConfigError(f"label file {path}: class indices must be 0..{len(table) - 1} without gaps "
                          f"(missing e.g. {missing}; the largest given is {max(table)}).")
    return [table[i] for i in range(len(table))]


def _check_unique_wnids(wnids: list[str] | None, path: str | Path) -> None:
    """Images are classed by their wnid: one given to two classes would score every such image as the last."""
    first: dict[str, int] = {}
    for i, wnid in enumerate(wnids or ()):
        if first.setdefault(wnid, i) != i:
            raise ConfigError(f"{path}: wnid {wnid} is given to class {first[wnid]} and class {i} (lines "
                              f"{first[wnid] + 1} and {i + 1}): each class has its own wnid. Fix the list.")


def _check_class_count(count: int, path: Path) -> None:
    if count > MAX_CLASSES:
        raise ConfigError(f"label file {path} names {count} classes, above the limit of {MAX_CLASSES}: "
                          "give a file with one class name per line.")


def _read_wnids(path: Path, count: int) -> list[str]:
    wnids = [line.strip() for line in _read_text(path, "wnid list").splitlines() if line.strip()]
    bad = [w for w in wnids if not _WNID.fullmatch(w)]
    if bad:
        raise ConfigError(f"wnid list {path}: {bad[0]!r} is not a wnid (n + 8 digits).")
    if len(wnids) != count:
        raise ConfigError(f"wnid list {path} has {len(wnids)} entries but the label file has {count} classes.")
    return wnids


def check_label_count(names: Sequence[str], classes: int | None, labels: str | Path | None, model: object) -> None:
    """The label list names as many classes as the model scores (`classes`; None: not recorded)."""
    if classes is None or len(names) == classes:
        return
    given = f"label file {labels} names" if labels is not None else "the default ImageNet-1k labels name"
    raise ConfigError(f"{given} {len(names)} classes but {model} gives {classes} scores per image: each "
                      f"result would get the wrong class name. Pass the label file of this model ({classes} "
                      "lines, one class name per line).")


def default_labels() -> Labels:
    """The ImageNet-1k labels shipped inside the package (names and wnids)."""
    names = data("imagenet.txt").read_text(encoding="utf-8").splitlines()
    wnids = data("imagenet_wnids.txt").read_text(encoding="utf-8").splitlines()
    return Labels(tuple(names), tuple(wnids))


def ground_truth(path: str | Path, wnid_to_index: Mapping[str, int]) -> int | None:
    """The class of an image from its synset folder (`.../n01440764/ILSVRC2012_val_x.JPEG`) or a
    file name starting with the wnid (`n01440764_tench.JPEG`); None when neither is a known wnid."""
    path = Path(path)
    if _WNID.fullmatch(path.parent.name) and path.parent.name in wnid_to_index:
        return wnid_to_index[path.parent.name]
    match = _WNID.match(path.name)
    if match and match.group(0) in wnid_to_index:
        return wnid_to_index[match.group(0)]
    return None


def load_ground_truth_file(path: str | Path) -> dict[str, int]:
    """`<file name> <class index>` per line (flat ILSVRC2012_val folders) -> {file name: index}."""
    path = Path(path)
    table: dict[str, tuple[int, int]] = {}   # file name -> (class, line)
    for number, line in enumerate(_read_text(path, "ground-truth file").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdecimal():   # isdigit() also takes '²', which int() refuses
            raise ConfigError(f"ground-truth file {path}, line {number}: expected '<file name> <class index>', "
                              f"got {line.strip()!r}.")
        name, label = Path(parts[0].strip()).name, int(parts[1])
        if table.get(name, (label,))[0] != label:
            raise ConfigError(f"ground-truth file {path}, line {number} gives {name} class {label} but line "
                              f"{table[name][1]} gave it class {table[name][0]}: an image has one class (images are "
                              "matched by file name). Remove the wrong line.")
        table.setdefault(name, (label, number))
    return {name: label for name, (label, _) in table.items()}


def load_labels(path: str | Path | None = None, wnids: str | Path | None = None) -> Labels:
    """A label file (see Labels.load), or the shipped ImageNet labels when path is None; `wnids`
    replaces the wnid list (the shipped one by default for 1000-class files)."""
    if path is None:
        labels = default_labels()
        return labels if wnids is None else Labels(labels.names, tuple(_read_wnids(Path(wnids), len(labels))))
    labels = Labels.load(path, wnids)
    if labels.wnids is None and len(labels) == 1000:
        labels = Labels(labels.names, default_labels().wnids)
    return labels
