"""How `tvmzoo serve` spends the cores between and around requests: the dynamic batcher waits only for
clients it has seen (a real compiled batch-4 build), and an idle server's TVM pool does not spin."""
from __future__ import annotations

import asyncio
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

httpclient = pytest.importorskip("tritonclient.http")

from serve_client import ServerProcess  # noqa: E402
from tiny import build_tiny  # noqa: E402
from tvmzoo.preprocess import apply, read_image  # noqa: E402
from tvmzoo.run.runtime import ALIGNMENT, CompiledModel  # noqa: E402
from tvmzoo.run.serve.batcher import Arrivals, Closed, DynamicBatcher  # noqa: E402
from tvmzoo.run.serve.config import ADAPTIVE_INSTANCES, ServeConfig  # noqa: E402
from tvmzoo.run.serve.metrics import VERSION, Metrics  # noqa: E402
from tvmzoo.run.serve.tensors import ServeError, check_finite  # noqa: E402
from tvmzoo.run.threads import usable_cores  # noqa: E402

pytestmark = pytest.mark.reliability
NAME, DELAY_S = "tiny_b4", 1.5


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batcher")
    return build_tiny(root, NAME, resize_short=40, batch=4).parent


def test_arrivals_wait_for_the_rows_seen_in_flight_together():
    arrivals = Arrivals(max_batch=8)
    assert arrivals.expected == 8             # nothing known yet: a full batch, as Triton waits for
    arrivals.submitted(1)
    arrivals.taken()
    assert arrivals.expected == 1             # a lone client: the next batch runs at once
    for in_flight in (1, 2, 3, 2, 3, 4, 5):   # 5 clients: some answered, some queued, some running
        arrivals.submitted(in_flight)
    arrivals.taken()
    assert arrivals.expected == 5
    arrivals.submitted(20)
    arrivals.taken()
    assert arrivals.expected == 8             # never more than the batch
    arrivals.taken()                          # nothing came since (rows left queued by the last take)
    assert arrivals.expected == 1


def test_a_batch_waits_only_for_the_clients_it_has_seen(build, sample_images):
    model = CompiledModel.load(build)                 # batch 4
    rows = apply(model.preprocessing, read_image(sample_images[0]))[None]
    expected = model.run(np.repeat(rows, 4, axis=0))[:1]
    metrics = Metrics.create()
    metrics.count_model(NAME)
    batcher = DynamicBatcher(NAME, [model], 4, DELAY_S, metrics)

    def run(clients: int) -> float:
        """`clients` requests at once; returns the seconds until every answer (each checked) was in."""
        start = time.perf_counter()
        for future in [batcher.submit(rows) for _ in range(clients)]:
            np.testing.assert_array_equal(future.result(), expected)
        return time.perf_counter() - start

    def executions() -> float:
        return metrics.exec_count.value(NAME, VERSION)

    try:
        assert sum(run(4) for _ in range(3)) < DELAY_S    # 4 clients: full batches, no waiting the delay out
        assert executions() == 3
        assert run(1) >= DELAY_S      # 3 of the 4 clients left: the next batch waits for them once, as Triton would
        assert sum(run(1) for _ in range(5)) < DELAY_S    # a lone client: no later request waits in vain
        assert executions() == 3 + 1 + 5
        assert run(4) < 2 * DELAY_S   # 4 again: at most one wait while the batcher learns they are back
        assert executions() <= 9 + 3
        assert metrics.inference_count.value(NAME, VERSION) == 12 + 6 + 4
    finally:
        batcher.close()


def test_asyncio_callers_get_their_own_rows_by_one_hand_back_per_batch(build, sample_images):
    """`DynamicBatcher.infer` (the server's path): 4 requests on one event loop run as one batch and are
    settled by one call_soon_threadsafe; a caller cancelled meanwhile is skipped; a closed batcher refuses."""
    model = CompiledModel.load(build)                 # batch 4
    rows = [apply(model.preprocessing, read_image(p))[None] for p in (sample_images * 4)[:4]]
    rows[3] = rows[3][:, :, ::-1].copy()               # 4 distinct inputs, whatever the sample count
    expected = model.run(np.concatenate(rows))
    metrics = Metrics.create()
    batcher = DynamicBatcher(NAME, [model], 4, DELAY_S, metrics)

    async def main() -> tuple[list, int]:
        loop = asyncio.get_running_loop()
        calls = []
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args, **kw: calls.append(args[0]) or original(*args, **kw)
        tasks = [asyncio.create_task(batcher.infer(r)) for r in rows]
        await asyncio.sleep(0)                          # all four queued: a full batch runs at once
        tasks[1].cancel()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        await asyncio.sleep(0.05)                       # the hand-back of the cancelled one, if any, has run
        return results, len(calls)

    try:
        results, hand_backs = asyncio.run(main())
        assert isinstance(results[1], asyncio.CancelledError)
        for i in (0, 2, 3):
            np.testing.assert_array_equal(results[i], expected[i:i + 1])
        assert metrics.exec_count.value(NAME, VERSION) == 1 and hand_backs == 1
    finally:
        batcher.close()
    with pytest.raises(Closed):
        asyncio.run(batcher.infer(rows[0]))


def test_a_refused_request_leaves_the_rest_of_its_batch_answered(build, sample_images):
    """check_rows runs on each request's rows as staged in the batch: a request with NaN / Inf gets the error,
    the others of the same batch their own rows' outputs; a batch of refused requests runs nothing."""
    model = CompiledModel.load(build)                 # batch 4
    rows = [apply(model.preprocessing, read_image(p))[None] for p in (sample_images * 4)[:4]]
    expected = model.run(np.concatenate(rows))
    rows[1] = rows[1].copy()
    rows[1][0, 2, 5, 7] = np.nan
    rows[3] = np.full_like(rows[3], np.inf)
    metrics = Metrics.create()
    batcher = DynamicBatcher(NAME, [model], 4, DELAY_S, metrics, check_rows=partial(check_finite, "input"))

    async def main(batch: list[np.ndarray]) -> list:
        return await asyncio.wait_for(asyncio.gather(*(batcher.infer(r) for r in batch), return_exceptions=True), 60)

    try:
        results = asyncio.run(main(rows))
        for i in (0, 2):
            np.testing.assert_array_equal(results[i], expected[i:i + 1])
        assert isinstance(results[1], ServeError) and results[1].status == "INVALID_ARGUMENT"
        assert str(results[1]).startswith("input 'input' holds 1 NaN or infinite values (the first at flat index "
                                          f"{np.ravel_multi_index((0, 2, 5, 7), rows[1].shape)})")
        assert f"holds {rows[3].size} NaN or infinite values (the first at flat index 0)" in str(results[3])
        assert metrics.exec_count.value(NAME, VERSION) == 1
        assert metrics.inference_count.value(NAME, VERSION) == 2   # the refused rows ran, unanswered
        refused = asyncio.run(main([rows[1], rows[3], rows[1], rows[3]]))
        assert all(isinstance(r, ServeError) for r in refused)
        assert metrics.exec_count.value(NAME, VERSION) == 1   # nothing ran for them
    finally:
        batcher.close()


def _runs_on(metrics: Metrics, threads: int) -> float:
    """Executions run with `threads` TVM threads (the tvmzoo_inference_threads histogram)."""
    def at_most(n: int) -> float:
        return metrics.registry.get_sample_value("tvmzoo_inference_threads_bucket",
                                                 {"model": NAME, "le": f"{float(n)}"}) or 0.0
    return at_most(threads) - at_most(threads - 1)


@pytest.mark.skipif(len(usable_cores()) < 2, reason="adaptive threads need 2 cores")
def test_adaptive_threads_run_a_lone_batch_on_all_cores_and_a_crowd_side_by_side(build, sample_images):
    """Without --threads (batcher.Lanes): a batch runs on both cores when nothing else runs or waits,
    and on its instance's one core when others wait; the answers are the same exactly either way."""
    model = CompiledModel.load(build)                 # batch 4
    x = np.stack([apply(model.preprocessing, read_image(p)) for p in (sample_images * 4)[:4]])
    expected = model.run(x)
    metrics = Metrics.create()
    batcher = DynamicBatcher(NAME, [CompiledModel.load(build) for _ in range(2)], 4, DELAY_S, metrics,
                             cores=usable_cores()[:2])
    try:
        for i in range(4):                            # one client at a time: every batch on both cores
            np.testing.assert_array_equal(batcher.submit(x[i:i + 1]).result(timeout=60), expected[i:i + 1])
        assert _runs_on(metrics, 2) == 4 and _runs_on(metrics, 1) == 0
        with batcher._cond:                           # 12 rows queued before any instance looks
            futures = [batcher.submit(x) for _ in range(3)]
        for future in futures:
            np.testing.assert_array_equal(future.result(timeout=60), expected)
        assert _runs_on(metrics, 1) >= 2              # the first two batches had company: one core each
        assert _runs_on(metrics, 1) + _runs_on(metrics, 2) == 4 + 3
    finally:
        batcher.close()


def test_the_default_is_adaptive_with_an_instance_per_core_at_most_four(build, monkeypatch):
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    cores = usable_cores()
    default = ServeConfig(build)
    assert default.cores == cores and default.instance_count == min(len(cores), ADAPTIVE_INSTANCES)
    fixed = ServeConfig(build, threads=1)
    assert fixed.cores is None and fixed.instance_count == 1
    monkeypatch.setenv("TVM_NUM_THREADS", "1")              # the cores to use: the first one
    assert ServeConfig(build).cores == cores[:1] and ServeConfig(build).instance_count == 1


def test_short_batches_are_staged_aligned_padded_and_reused(build, sample_images):
    """`CompiledModel.stage` (the server's batches, and `run`'s padding of a short batch for everyone):
    one aligned buffer of a whole batch, zero padding rows, the same outputs as a batch padded by hand."""
    model = CompiledModel.load(build)                 # batch 4
    parts = [np.stack([apply(model.preprocessing, read_image(p)) for p in sample_images[i:j]])
             for i, j in ((0, 1), (1, 3))]
    three = np.concatenate(parts)
    padded_by_hand = model.run(np.concatenate([three, np.zeros_like(three[:1])]))[:3]   # a full batch: no staging
    batch = model.stage(parts)
    assert batch.shape[0] == 4 and batch.ctypes.data % ALIGNMENT == 0
    np.testing.assert_array_equal(batch[:3], three)
    assert not batch[3:].any()                        # the padding row is zeros
    np.testing.assert_array_equal(model.run(batch)[:3], padded_by_hand)
    np.testing.assert_array_equal(model.run(three), padded_by_hand)          # run pads through the same buffer
    np.testing.assert_array_equal(model.run(parts[0]), padded_by_hand[:1])
    again = model.stage(parts[:1])
    assert again.ctypes.data == batch.ctypes.data and not again[1:].any()
    big = model.stage(parts * 2)                      # 6 rows: more than a batch, run() splits them
    assert len(big) == 6
    np.testing.assert_array_equal(model.run(big), np.concatenate([padded_by_hand] * 2))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from /proc (Linux)")
@pytest.mark.parametrize("flags", [("--threads", "2"), ()], ids=["threads2", "adaptive"])
def test_an_idle_server_does_not_spin_after_a_request(build, sample_images, flags):
    """TVM's pool workers spin 300000 sched_yield()s after each task by default (50-60 ms of CPU after
    every request on Lite0 here), taking the cores the event loop and clients need; serve lowers it."""
    server = ServerProcess.start(build, *flags)
    try:
        model = CompiledModel.load(build)
        x = apply(model.preprocessing, read_image(sample_images[0]))[None]
        client = httpclient.InferenceServerClient(server.http)
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        for _ in range(3):
            client.infer(NAME, [tensor])
            before = _cpu_seconds(server.proc.pid)
            time.sleep(0.5)
            assert _cpu_seconds(server.proc.pid) - before < 0.03
    finally:
        assert server.stop() == 0, server.output()
