"""eval_topk and npz decode: result files in, accuracy or result files out."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ConfigError
from ..run.npz import read_datalist, read_outputs
from ..run.results import TopK, predictions, read_results, top_k, write_results

log = logging.getLogger(__name__)


def ground_truth_of(paths, gt_file: str | Path | None = None, wnids: str | Path | None = None) -> dict[str, int]:
    """Class index per path: from a ground-truth file ('<file name> <index>'), else from the wnid in the path."""
    from ..io.images import ground_truth, load_ground_truth_file, load_labels

    by_name = load_ground_truth_file(gt_file) if gt_file else {}
    if gt_file and paths and not any(Path(path).name in by_name for path in paths):
        raise ConfigError(f"ground-truth file {gt_file} names none of the {len(paths)} images in the results "
                          f"(e.g. {Path(paths[0]).name}): it is the ground truth of other images. Pass the "
                          "ground-truth file of these images.")
    wnid_index = {w: i for i, w in enumerate(load_labels(None, wnids=wnids).wnids)}
    truth = {}
    for path in paths:
        index = by_name.get(Path(path).name)
        if index is None:
            index = ground_truth(path, wnid_index)
        if index is not None:
            truth[path] = index
    return truth


def evaluate_result_file(result: str | Path, gt_file: str | Path | None = None,
                         wnids: str | Path | None = None) -> TopK:
    preds = read_results(result)
    if not preds:
        raise ConfigError(f"result file {result} holds no results (it is empty): classify the images again.")
    score = top_k(preds, ground_truth_of([p.path for p in preds], gt_file, wnids))
    if score.skipped:
        log.warning("%d of the %d images in %s have no ground truth and are not scored", score.skipped,
                    len(preds), result)
    return score


def decode_npz_outputs(datalist: Path, out_dir: Path, result: Path, labels: str | Path | None = None) -> int:
    """vamp --datalist outputs -> the five-line result file; pairs outputs with datalist lines by position."""
    from ..io.images import check_label_count, load_labels
    from ..io.outputs import check_output_file

    check_output_file(result, "result file", {"datalist": datalist, "label file": labels})
    items = read_datalist(datalist)
    scores = read_outputs(items, out_dir)
    names = load_labels(labels).names
    check_label_count(names, scores.shape[1] if len(scores) else None, labels, f"vamp (its outputs in {out_dir})")
    preds = predictions([str(p) for p in items], scores)
    write_results(result, preds, names)
    return len(preds)
