"""Image discovery, label files, ground truth and calibration sampling on the shared sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tvmzoo.compile.quant.calibration import calibration_batches, sample_calibration
from tvmzoo.config import Dataset
from tvmzoo.io.images import Labels, default_labels, find_images, ground_truth, load_ground_truth_file, load_labels
from tvmzoo.errors import ConfigError
from tvmzoo.preprocess import Preprocessing, apply, read_image

ROOT = Path(__file__).parents[1]
SHARED = ROOT.parent / "shared" / "data"
SAMPLE = SHARED / "imagenet-sample"


@pytest.fixture(scope="module")
def synsets() -> list[tuple[str, str]]:
    lines = (SHARED / "imagenet_synsets.txt").read_text().splitlines()
    return [tuple(line.split("\t", 1)) for line in lines]


# ---- labels ----
def test_default_labels(synsets):
    labels = default_labels()
    assert len(labels) == 1000 and len(labels.wnids) == 1000
    assert labels.names[0] == "tench, Tinca tinca" and labels.wnids[0] == "n01440764"
    assert labels.names[134] == labels.names[517] == "crane"
    index = labels.wnid_to_index()
    assert index[labels.wnids[134]] == 134 and index[labels.wnids[517]] == 517 and labels.wnids[134] != labels.wnids[517]
    assert list(zip(labels.wnids, labels.names)) == synsets  # the facts, unabridged (class 480 too)


@pytest.mark.parametrize("name", ["imagenet.txt", "imagenet1000_clsid_to_human.txt"])
def test_shipped_label_files_agree(name, synsets):
    labels = Labels.load(ROOT / "common" / "label" / name, ROOT / "common" / "label" / "imagenet_wnids.txt")
    assert labels == default_labels()
    assert (ROOT / "common" / "label" / "imagenet.txt").read_text() == (ROOT / "tvmzoo" / "data" / "imagenet.txt").read_text()


def test_label_file_forms(tmp_path, synsets):
    from_synsets = Labels.load(SHARED / "imagenet_synsets.txt")
    assert from_synsets == default_labels()
    lines = tmp_path / "three.txt"
    lines.write_text("cat\ndog, doggy\nbird\n\n")
    assert Labels.load(lines) == Labels(("cat", "dog, doggy", "bird"))
    literal = tmp_path / "dict.txt"
    literal.write_text("{0: 'cat',\n 2: \"carpenter's kit\",\n 1: 'dog'}\n")
    assert Labels.load(literal).names == ("cat", "dog", "carpenter's kit")
    assert load_labels(None).names == default_labels().names
    assert load_labels(ROOT / "common" / "label" / "imagenet.txt").wnids == default_labels().wnids


def test_label_file_errors_never_execute_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.txt"
    evil.write_text(f"{{0: __import__('pathlib').Path({str(marker)!r}).touch()}}")
    with pytest.raises(ConfigError, match="expected a dict of class index -> name"):
        Labels.load(evil)
    assert not marker.exists()
    gaps = tmp_path / "gaps.txt"
    gaps.write_text("{0: 'a', 2: 'c'}")
    with pytest.raises(ConfigError, match="without gaps"):
        Labels.load(gaps)
    with pytest.raises(ConfigError, match="does not exist"):
        Labels.load(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        Labels.load(tmp_path / "empty.txt")
    (tmp_path / "wnids.txt").write_text("n01440764\n")
    with pytest.raises(ConfigError, match="has 1 entries but the label file has 2"):
        Labels.load(_two(tmp_path), tmp_path / "wnids.txt")
    with pytest.raises(ConfigError, match="no wnids"):
        Labels(("a",)).wnid_to_index()


def _two(tmp_path: Path) -> Path:
    path = tmp_path / "two.txt"
    path.write_text("a\nb\n")
    return path


# ---- ground truth ----
def test_ground_truth_from_file_and_folder_names():
    index = default_labels().wnid_to_index()
    assert ground_truth("n01440764_tench.JPEG", index) == 0
    assert ground_truth("/data/val/n01440764/ILSVRC2012_val_00000293.JPEG", index) == 0
    assert ground_truth("/data/val/n01443537/n01443537_1.JPEG", index) == 1
    assert ground_truth("/data/val/ILSVRC2012_val_00000293.JPEG", index) is None
    assert ground_truth("/data/n99999999/x.JPEG", index) is None
    assert ground_truth("n12057211_yellow_lady's_slipper.JPEG", index) == index["n12057211"]


def test_ground_truth_of_every_sample_photo():
    index = default_labels().wnid_to_index()
    paths = find_images(SAMPLE)
    assert len(paths) == 500
    truth = [ground_truth(p, index) for p in paths]
    assert None not in truth and len(set(truth)) == 500
    assert all(t % 2 == 0 for t in truth)  # the sample holds the even classes (its README)


def test_ground_truth_file(tmp_path):
    path = tmp_path / "val.txt"
    path.write_text("ILSVRC2012_val_00000001.JPEG 65\n\nILSVRC2012_val_00000002.JPEG 970\nmy photo's.jpg 3\n")
    assert load_ground_truth_file(path) == {"ILSVRC2012_val_00000001.JPEG": 65,
                                            "ILSVRC2012_val_00000002.JPEG": 970, "my photo's.jpg": 3}
    path.write_text("a.JPEG 1\nb.JPEG x\n")
    with pytest.raises(ConfigError, match="line 2: expected '<file name> <class index>'"):
        load_ground_truth_file(path)


# ---- images ----
def test_find_images(tmp_path):
    for rel in ("b/n1.JPEG", "a/x.jpg", "a/deep/y.PNG", "z.webp", "c.bmp", "notes.txt", "a/.hidden.jpg",
                ".cache/q.jpg", "a/._n01440764.JPEG"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a/deep/y.PNG", "a/x.jpg", "b/n1.JPEG", "c.bmp", "z.webp"]
    assert [p.name for p in find_images(tmp_path, ("JPEG",))] == ["n1.JPEG"]
    assert find_images(tmp_path / "notes.txt") == [tmp_path / "notes.txt"]  # a file given is taken as is
    assert find_images(tmp_path / "b" / "n1.JPEG") == [tmp_path / "b" / "n1.JPEG"]
    (tmp_path / "empty").mkdir()
    assert find_images(tmp_path / "empty") == []
    with pytest.raises(ConfigError, match="does not exist"):
        find_images(tmp_path / "nope")


def test_sample_calibration_is_deterministic():
    paths = find_images(SAMPLE)
    first = sample_calibration(paths, 10)
    assert len(first) == 10 and first == sorted(first) and set(first) <= set(paths)
    assert sample_calibration(list(reversed(paths)), 10) == first  # input order does not matter
    assert sample_calibration([str(p) for p in paths], 10) == first
    assert sample_calibration(paths, 10, seed=1) != first
    assert sample_calibration(paths[:5], 50) == sorted(paths[:5])
    with pytest.raises(ConfigError, match="positive integer"):
        sample_calibration(paths, 0)


def test_calibration_batches(tmp_path):
    photos = find_images(SAMPLE)[:3]
    for p in photos:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "broken.JPEG").write_text("not an image")
    pre = Preprocessing()
    batches = calibration_batches(Dataset(path=tmp_path, suffix="JPEG", get_data_num=10), pre, batch=2)
    assert [b.shape for b in batches] == [(2, 3, 224, 224), (1, 3, 224, 224)]  # the broken file skipped
    np.testing.assert_array_equal(batches[0][0], apply(pre, read_image(tmp_path / photos[0].name)))
    with pytest.raises(ConfigError, match=r"no '\*.png' images"):
        calibration_batches(Dataset(path=tmp_path, suffix="png"), pre)
