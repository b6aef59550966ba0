"""Load test: 2,000 images (the sample photos repeated, 5 % corrupt files mixed in) through the async
runner with two model instances on a tiny model. Every good image gets exactly one correct five-line
record, every bad one is reported, nothing else is written."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from tiny import build_tiny
from tvmzoo.preprocess import apply, read_image
from tvmzoo.run.results import read_results
from tvmzoo.run.runtime import CompiledModel

pytestmark = pytest.mark.reliability

TOTAL = 2000
BAD_EVERY = 20           # 5 %


def corrupt(kind: int, source: bytes) -> bytes:
    return [source[: len(source) // 2], b"", b"this is a text file, not a JPEG\n"][kind % 3]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, sample_images):
    root = tmp_path_factory.mktemp("stress")
    good, bad = [], []
    for i in range(TOTAL):
        source = sample_images[i % len(sample_images)]
        path = root / "images" / f"{i // 500:02d}" / f"{i:04d}_{source.name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i % BAD_EVERY == BAD_EVERY - 1:
            path.write_bytes(corrupt(i // BAD_EVERY, source.read_bytes()))
            bad.append(path)
        else:
            os.symlink(source, path)
            good.append(path)
    return {"root": root, "good": good, "bad": bad, "model": build_tiny(root, "tiny_stress")}


def test_two_thousand_images_async_two_instances(dataset, tmp_path):
    assert len(dataset["bad"]) == TOTAL // BAD_EVERY
    proc = run_cli("tvmzoo", "run", "--file_path", dataset["root"] / "images", "--model_prefix_path",
                   dataset["model"], "--save_dir", tmp_path, "--infer_mode", "async", "--instances", "2",
                   "--batch", "4", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{len(dataset['good'])} images in" in proc.stdout

    lines = (tmp_path / "result.txt").read_text().splitlines()
    per_image = Counter(line.split(": Relay top-")[0] for line in lines)
    assert set(per_image) == {str(p) for p in dataset["good"]} and set(per_image.values()) == {5}

    reported = [line[len("failed: "):].split(": cannot decode")[0] for line in proc.stderr.splitlines()
                if line.startswith("failed: ")]
    assert sorted(reported) == sorted(str(p) for p in dataset["bad"])

    # correct: the top-1 of every record is the model's own answer for that photo
    model = CompiledModel.load(dataset["model"])
    pre = model.preprocessing
    sources = sorted({p.resolve() for p in dataset["good"]})
    top1 = dict(zip(sources, model.run(np.stack([apply(pre, read_image(p)) for p in sources])).argmax(1)))
    for pred in read_results(tmp_path / "result.txt"):
        assert pred.ids[0] == top1[Path(pred.path).resolve()]
