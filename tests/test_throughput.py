"""Throughput mode (`vamp -i N -t T`: each instance on its own cores) and the vendor READMEs' vamp flags."""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from tvmzoo.errors import TvmzooError
from tvmzoo.run.host import num_cores
from tvmzoo.run.serve.config import ServeConfig
from tvmzoo.run.threads import instance_cores, pin_this_thread_pool, threads_per_instance, usable_cores
from tvmzoo.run.vendor_flags import vendor_notes

from conftest import run_cli
from tiny import build_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("throughput"), "tiny")


def test_instances_get_their_own_cores():
    assert [instance_cores(i, 2, [0, 1, 2, 3]) for i in range(2)] == [[0, 1], [2, 3]]
    assert [instance_cores(i, 1, [4, 5]) for i in range(3)] == [[4], [5], [4]]  # more instances than cores: wrap
    assert threads_per_instance(3, 2) == 2 and threads_per_instance(1, None) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value, threads", [("1", 1), (" 3 ", 3), ("0", None), ("-2", None), ("two", None), ("", None)])
def test_tvm_num_threads_is_read_one_way(monkeypatch, tmp_path, value, threads):
    """The compile target's num-cores and serve's shared cores read TVM_NUM_THREADS as TVM does: a positive
    integer, else the cores this process may use."""
    monkeypatch.setenv("TVM_NUM_THREADS", value)
    cores = usable_cores()
    assert num_cores() == (threads or len(cores))
    assert ServeConfig(repository=tmp_path).cores == (cores[:threads] if threads else cores)


def test_pinned_pool_runs_on_its_core(tiny):
    """For real: after pinning, a model run in a thread leaves that thread on the core it was given."""
    from tvmzoo.run.runtime import CompiledModel, stack_aligned

    model = CompiledModel.load(tiny)
    x = stack_aligned([np.zeros((3, 32, 32), np.float32)])
    core = max(os.sched_getaffinity(0))
    seen = []

    def worker():
        pin_this_thread_pool([core])
        model.run(x)
        seen.append(os.sched_getaffinity(0))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [{core}]


def test_vendor_flags_are_noted():
    notes = vendor_notes(None, "[0]", None, ["p", "2"])
    assert "'p 2' as -p 2" in notes[0] and "ignored on a CPU" in notes[1]
    assert vendor_notes(None, "0", None, []) == []
    assert any("-d 1" in n for n in vendor_notes(1, "1", "uint32", [], "float32"))
    with pytest.raises(TvmzooError, match="cannot read 'q 3'"):
        vendor_notes(None, "[0]", None, ["q", "3"])


def test_vamp_takes_the_readme_flags(tiny):
    """`-i 2 p 2 -b 1 -s [3,32,32] -d 0` as the vendor READMEs write it: runs, notes what it ignored, reports
    images/s of both instances, each on its own cores."""
    proc = run_cli("vamp", "-m", tiny, "-i", "2", "p", "2", "-b", "1", "-s", "[3,32,32]", "-d", "0",
                   "--iterations", "5", "--json")
    report = json.loads(proc.stdout)
    assert "ignored on a CPU" in proc.stderr and report["samples"] == 10 and report["instances"] == 2
    cores = report["cores"]
    assert len(cores) == 2 and all(len(c) == report["threads_per_instance"] for c in cores)
    if len(os.sched_getaffinity(0)) >= 2:
        assert not set(cores[0]) & set(cores[1])
    text = run_cli("vamp", "-m", tiny, "--instance", "2", "--processes", "1", "--batch_size", "2", "-t", "1",
                   "--iterations", "3", "-s", "3,32,32").stdout
    assert "throughput (images/s)" in text and "samples: 12" in text


AFFINITY_PROBE = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[2])})   # before numpy's BLAS threads start: every thread inherits it
import json
import numpy as np
from tvmzoo.run.runtime import CompiledModel
model = CompiledModel.load(sys.argv[1])
out = [model.run(np.full((1, 3, 32, 32), v, np.float32)).tolist() for v in (0.0, 0.5, 1.0)]
tasks = f"/proc/{os.getpid()}/task"
allowed = sorted({line.split()[1] for t in os.listdir(tasks) for line in open(f"{tasks}/{t}/status")
                  if line.startswith("Cpus_allowed_list")})
print(json.dumps({"allowed": allowed, "out": out}))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores: one to keep the run on, one to leave")
def test_a_run_keeps_to_the_cores_the_process_may_use(tiny):
    """Under taskset / numactl / a cpuset that is not cores 0.., TVM would bind a 2-thread pool to cores 0 and 1:
    a model run in a process given only the last core stays on it, and its answers are the unrestricted ones."""
    import subprocess
    import sys

    from tvmzoo.run.runtime import CompiledModel

    core = max(os.sched_getaffinity(0))
    done = subprocess.run([sys.executable, "-c", AFFINITY_PROBE, str(tiny), str(core)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TVM_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["allowed"] == [str(core)]
    model = CompiledModel.load(tiny)
    expected = [model.run(np.full((1, 3, 32, 32), v, np.float32)) for v in (0.0, 0.5, 1.0)]
    for got, want in zip(report["out"], expected):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-5, atol=1e-6)
