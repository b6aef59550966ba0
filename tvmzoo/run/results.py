"""The vendor result format (five lines per image) and top-k evaluation over it."""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.atomic import write_text
from ..errors import ConfigError, printable
from ..limits import check_not_special
from .filenames import quote_path, read_lines, unquote_path

TOP_K = 5
# Parsed from the right: the image path itself may contain ': '.
_LINE = re.compile(r"^(?P<path>.*): Relay top-(?P<rank>\d+) id: (?P<id>-?\d+), prob: (?P<prob>\S+), "
                   r"class name: (?P<name>.*)$")


@dataclass(frozen=True)
class Prediction:
    path: str
    ids: tuple[int, ...]       # top-k class indices, best first
    probs: tuple[float, ...]


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def looks_like_probabilities(x: np.ndarray) -> bool:
    return bool(np.all(x >= 0) and np.allclose(x.sum(axis=-1), 1.0, atol=1e-3))


def predictions(paths: Sequence[str], outputs: np.ndarray, k: int = TOP_K) -> list[Prediction]:
    """Top-k of each row; rows that are not probabilities yet (logits) go through softmax first."""
    probs = outputs if looks_like_probabilities(outputs) else softmax(outputs.astype(np.float64))
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [Prediction(str(p), tuple(int(i) for i in ids), tuple(float(probs[r, i]) for i in ids))
            for r, (p, ids) in enumerate(zip(paths, top))]


def format_prediction(pred: Prediction, names: Sequence[str]) -> str:
    path = quote_path(pred.path)  # any file name: escaped when it would not read back (run/filenames.py)
    return "".join(f"{path}: Relay top-{rank} id: {idx}, prob: {prob:.8f}, "
                   f"class name: {names[idx] if 0 <= idx < len(names) else idx}\n"
                   for rank, (idx, prob) in enumerate(zip(pred.ids, pred.probs)))


def write_results(path: str | Path, preds: Iterable[Prediction], names: Sequence[str]) -> None:
    """Write (never append) the result file, atomically."""
    write_text(path, "".join(format_prediction(p, names) for p in preds))


def read_results(path: str | Path) -> list[Prediction]:
    path = Path(path)
    check_not_special(path, "result file")
    if not path.is_file():
        raise ConfigError(f"result file not found: {path}. Produce it with classification.py or vamp_npz_decode.py.")
    by_path: dict[str, dict[int, tuple[int, float, int]]] = {}   # path -> rank -> (id, prob, line)
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        m = _LINE.match(line)
        prob = _float(m["prob"]) if m else None
        if prob is None:
            raise ConfigError(f"{path}:{lineno}: not a result line ('<image>: Relay top-<k> id: <i>, prob: <p>, "
                              f"class name: <name>'): {line[:80]!r}")
        rows = by_path.setdefault(unquote_path(m["path"]), {})
        rank = int(m["rank"])
        if rank in rows:
            raise ConfigError(f"{path}:{lineno}: {printable(m['path'], 120)} has a top-{rank} line already (line "
                              f"{rows[rank][2]}): the file holds two runs' results (joined files?). Keep one run's "
                              "lines, or classify again.")
        rows[rank] = int(m["id"]), prob, lineno
    for image, rows in by_path.items():
        if sorted(rows) != list(range(len(rows))):
            raise ConfigError(f"{path}: {printable(image, 120)} has the lines top-{', top-'.join(map(str, sorted(rows)))} "
                              f"(from line {min(r[2] for r in rows.values())}), not top-0 to top-{len(rows) - 1}: lines are "
                              "missing (a cut or edited file). Classify the images again.")
    return [Prediction(p, tuple(rows[r][0] for r in sorted(rows)), tuple(rows[r][1] for r in sorted(rows)))
            for p, rows in by_path.items()]


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class TopK:
    top1: float          # percent
    top5: float
    evaluated: int
    skipped: int         # images without ground truth

    def line(self) -> str:
        return f"top1_rate: {self.top1:.3f} top5_rate: {self.top5:.3f}"


def top_k(preds: Sequence[Prediction], truth: dict[str, int]) -> TopK:
    """Compare class indices (not names: two ImageNet classes are both called 'crane')."""
    scored = [(p, truth[p.path]) for p in preds if p.path in truth]
    if not scored:
        raise ConfigError("no image in the results has a ground truth: name files or folders by wnid "
                          "(n01440764_tench.JPEG, .../n01440764/x.JPEG) or pass a ground-truth file.")
    top1 = sum(p.ids[0] == t for p, t in scored)
    top5 = sum(t in p.ids[:5] for p, t in scored)
    n = len(scored)
    return TopK(100.0 * top1 / n, 100.0 * top5 / n, n, len(preds) - n)
