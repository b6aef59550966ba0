"""The runstream runner at scale: async with several model instances writes the same bytes as sync on
the 500 sample photos, a failing image is reported while the rest go on, and an interrupted run
resumes (--resume) to the same file as an uninterrupted one."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SAMPLE_DIR, copy_images, run_cli
from tiny import build_tiny
from tvmzoo.errors import ConfigError
from tvmzoo.run.runner import RunOptions, classify, resolve_preprocessing
from tvmzoo.run.runtime import CompiledModel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sample_images):
    root = tmp_path_factory.mktemp("runstream")
    return build_tiny(root, "tiny_runstream")


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The sync result file over all 500 photos."""
    out = tmp_path_factory.mktemp("reference")
    run_cli("tvmzoo", "run", "--file_path", SAMPLE_DIR, "--model_prefix_path", tiny, "--save_dir", out,
            "--save_result_txt", "sync.txt")
    text = (out / "sync.txt").read_text()
    assert len(text.splitlines()) == 5 * 500
    return text


@pytest.mark.parametrize("batch", ["1", "4"])
def test_async_two_instances_byte_identical_to_sync(tiny, reference, tmp_path, batch):
    proc = run_cli("tvmzoo", "run", "--file_path", SAMPLE_DIR, "--model_prefix_path", tiny, "--save_dir", tmp_path,
                   "--save_result_txt", "async.txt", "--infer_mode", "async", "--instances", "2", "--batch", batch)
    assert "500 images in" in proc.stdout
    assert (tmp_path / "async.txt").read_text() == reference


class FailsOn:
    """A real compiled model that raises on one particular input, as a crashing kernel would."""

    def __init__(self, model: CompiledModel, poison: np.ndarray) -> None:
        self.model, self.poison, self.fused = model, poison, model.fused

    def run(self, batch: np.ndarray) -> np.ndarray:
        if any(np.array_equal(x, self.poison) for x in batch):
            raise RuntimeError("TVMError: kernel crashed")
        return self.model.run(batch)


@pytest.mark.parametrize("mode, batch", [("sync", 1), ("async", 3)])
def test_a_failing_image_is_reported_and_the_rest_go_on(tiny, sample_images, mode, batch):
    from tvmzoo.preprocess import apply, read_image

    paths = sample_images[:12]
    pre = resolve_preprocessing(tiny, None)
    good = classify(CompiledModel.load(tiny), paths, pre, progress=False).predictions
    poison = apply(pre, read_image(paths[4]))
    models = [FailsOn(CompiledModel.load(tiny), poison) for _ in range(2)]
    summary = classify(models, paths, pre, mode=mode, batch=batch, progress=False)
    assert [path for path, _ in summary.failed] == [str(paths[4])]
    assert "kernel crashed" in summary.failed[0][1]
    assert summary.predictions == good[:4] + good[5:]


class NotesCores:
    """A real compiled model that notes, after each run, the cores its calling thread is left on: TVM's
    pool runs its first task on the calling thread, so a pinned pool leaves the thread on its first core."""

    def __init__(self, model: CompiledModel, seen: dict[int, set[int]]) -> None:
        self.model, self.seen, self.fused = model, seen, model.fused

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = self.model.run(batch)
        self.seen[threading.get_ident()] = os.sched_getaffinity(0)
        return out


def test_async_instances_each_get_their_own_cores(tiny, sample_images):
    """--instances 2: each inference thread's TVM pool is on its own cores (unpinned, both pools would
    take the same first cores: two threads, each free to run anywhere)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("one usable core: two instances can only share it")
    seen: dict[int, set[int]] = {}
    models = [NotesCores(CompiledModel.load(tiny), seen) for _ in range(2)]
    summary = classify(models, sample_images[:40], resolve_preprocessing(tiny, None), mode="async", progress=False)
    assert len(summary.predictions) == 40 and len(seen) == 2
    first, second = seen.values()
    assert len(first) == len(second) == len(cores) // 2
    assert not first & second and first | second <= set(cores)


def _ctrl_c_as_in_a_terminal() -> None:
    """A child inherits an ignored or blocked SIGINT, and Python then never raises KeyboardInterrupt:
    something earlier in a full test session leaves the pytest process so (the run then went to the end
    with exit 0). A user's shell starts the runner with the default disposition; so does this test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _interrupt_when_running(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    """Start the runner, send Ctrl-C once its progress bar has moved, return how it ended."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                preexec_fn=_ctrl_c_as_in_a_terminal)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if re.search(r"\b[1-9]\d*/500 \[", log.read_text()):    # some images done
                    break
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, log.read_text())


def test_interrupted_run_resumes_to_the_same_file(tiny, reference, tmp_path):
    result = tmp_path / "result.txt"
    cmd = [str(Path(sys.executable).parent / "tvmzoo"), "run", "--file_path", str(SAMPLE_DIR),
           "--model_prefix_path", str(tiny), "--save_dir", str(tmp_path), "--save_result_txt", "result.txt",
           "--infer_mode", "async", "--instances", "2"]
    for _ in range(3):  # the whole run takes ~2 s: on a loaded machine it can finish before the signal lands
        stopped = _interrupt_when_running(cmd, tmp_path / "stderr.txt")
        if stopped.returncode != 0:
            break
        result.unlink()
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    partial = result.read_text()
    done = len(partial.splitlines()) // 5
    assert 0 < done < 500 and len(partial.splitlines()) == 5 * done
    assert reference.startswith(partial)                  # complete records, in input order
    assert [p.name for p in tmp_path.glob(".result.txt.*")] == [".result.txt.lock"]  # atomic: no half-done file

    proc = run_cli(*cmd[:1], *cmd[1:], "--resume")
    assert f"resumed: {done} image(s)" in proc.stdout and f"{500 - done} images in" in proc.stdout
    assert result.read_text() == reference


def test_resume_keeps_finished_images_and_redoes_incomplete_ones(tiny, reference, tmp_path, sample_images):
    photos = copy_images(sample_images[:30], tmp_path / "photos")
    common = ["run", "--file_path", tmp_path / "photos", "--model_prefix_path", tiny, "--save_dir", tmp_path]
    run_cli("tvmzoo", *common, "--save_result_txt", "full.txt")
    full = (tmp_path / "full.txt").read_text().splitlines(keepends=True)
    # 10 finished images, then 3 of the 11th image's five lines (as a vendor runner appending would leave)
    (tmp_path / "part.txt").write_text("".join(full[:53]))
    proc = run_cli("tvmzoo", *common, "--save_result_txt", "part.txt", "--resume", "--infer_mode", "async")
    assert "resumed: 10 image(s)" in proc.stdout and "20 images in" in proc.stdout
    assert (tmp_path / "part.txt").read_text() == "".join(full)
    assert len(photos) == 30


def test_bad_run_options_are_clear_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match="--instances must be at least 1"):
        RunOptions(mode="async", instances=0)
    proc = run_cli(ROOT / "common" / "vsx" / "classification.py", "--file_path", tmp_path, "--model_prefix_path",
                   tiny, "--rpc", "no-port-here", check=False)
    assert proc.returncode == 2 and "host:port" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_resumes_from_its_result_file(tiny, tmp_path, sample_images):
    copy_images(sample_images[::25], tmp_path / "photos")                  # 20 photos
    yaml_path = tiny.parent.parent.parent / "tiny_runstream.yaml"
    cmd = ["eval", yaml_path, "--images", tmp_path / "photos", "--precisions", "fp32", "--workspace", tmp_path]
    first = run_cli("tvmzoo", *cmd)
    result = tmp_path / "tiny_runstream-eval-fp32.result.txt"
    full = result.read_text()
    result.write_text("".join(full.splitlines(keepends=True)[:35]))        # as if stopped after 7 images
    again = run_cli("tvmzoo", *cmd, "--resume")
    assert "resume: 7 of 20 images already in" in again.stderr
    assert result.read_text() == full
    rows = [[line.split("|")[1:5] for line in out.stdout.splitlines() if line.startswith("| fp32")]
            for out in (first, again)]
    assert rows[0] == rows[1] and rows[0][0][1].strip() == "20"
