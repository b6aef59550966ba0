"""Remote devices through TVM RPC: a tracker and two servers on 127.0.0.1 (started with the real
`tvmzoo device` commands, bounded by `timeout`, killed in a finalizer); an evaluation of real photos
sharded across both gives the same result file as a local run, also when one server dies mid-run."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import copy_images, run_cli
from tiny import build_tiny
from tvmzoo.run.devices import RemoteSpec
from tvmzoo.run.sharded import classify_sharded
from tvmzoo.run.runner import resolve_preprocessing

KEY = "tvmzoo-test"
LIFETIME_S = 600        # every process started here is killed after this, whatever happens to pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args: str, log: Path) -> subprocess.Popen:
    tvmzoo = str(Path(sys.executable).parent / "tvmzoo")
    with open(log, "wb") as out:
        return subprocess.Popen(["timeout", "-s", "KILL", str(LIFETIME_S), tvmzoo, *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Kill the process group: the server forks a process per session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for_devices(port: int, count: int, logs: Path, deadline_s: float = 120) -> None:
    from tvm import rpc

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        errors = [log for log in logs.glob("*.log") if "Error" in log.read_text(errors="replace")]
        if errors:
            raise AssertionError(f"{errors[0].name}:\n{errors[0].read_text(errors='replace')[-2000:]}")
        try:
            free = rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"].get(KEY, {}).get("free", 0)
            if free >= count:
                return
        except RuntimeError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{count} RPC servers did not register within {deadline_s}s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("rpc-logs")
    port = free_port()
    procs = [start("device", "tracker", "--host", "127.0.0.1", "--port", str(port), log=logs / "tracker.log")]
    try:
        time.sleep(1)
        for i in range(2):
            procs.append(start("device", "serve", "--tracker", f"127.0.0.1:{port}", "--key", KEY,
                               "--host", "127.0.0.1", "--port", str(free_port()), log=logs / f"server{i}.log"))
        wait_for_devices(port, 2, logs)
        yield {"tracker": f"127.0.0.1:{port}", "servers": procs[1:], "logs": logs}
    finally:
        for proc in procs:
            stop(proc)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sample_images):
    root = tmp_path_factory.mktemp("rpc")
    return {"model": build_tiny(root, "tiny_rpc"), "photos": copy_images(sample_images[::10], root / "photos"),
            "root": root}


def test_device_commands_wrap_tvm(tmp_path):
    proc = run_cli("tvmzoo", "device", "serve", "--tracker", "nonsense", "--key", "k", check=False)
    assert proc.returncode == 2 and "host:port" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("tvmzoo", "run", "--file_path", tmp_path, "--model_prefix_path", tmp_path / "mod",
                   "--rpc-tracker", "127.0.0.1:1", check=False)
    assert proc.returncode == 2 and "--rpc-key" in proc.stderr
    proc = run_cli("vamc", "tune", tmp_path / "build.yaml", "--rpc-key", "k", check=False)
    assert proc.returncode == 2 and "--rpc-tracker" in proc.stderr and "Traceback" not in proc.stderr


def test_sharded_run_equals_local_run(cluster, setup, tmp_path):
    common = ["run", "--file_path", setup["photos"][0].parent, "--model_prefix_path", setup["model"],
              "--save_dir", tmp_path]
    run_cli("tvmzoo", *common, "--save_result_txt", "local.txt")
    proc = run_cli("tvmzoo", *common, "--save_result_txt", "remote.txt",
                   "--rpc-tracker", cluster["tracker"], "--rpc-key", KEY)
    assert "50 images in" in proc.stdout
    assert (tmp_path / "remote.txt").read_text() == (tmp_path / "local.txt").read_text()
    sessions = [(cluster["logs"] / f"server{i}.log").read_text().count("connected from") for i in range(2)]
    assert all(n >= 1 for n in sessions), f"both devices must have served: {sessions}"


def test_vamp_runs_one_instance_per_device(cluster, setup):
    import json

    proc = run_cli("vamp", "-m", setup["model"], "-s", "3,32,32", "--iterations", "4", "--json",
                   "--rpc-tracker", cluster["tracker"], "--rpc-key", KEY)
    report = json.loads(proc.stdout)
    assert report["instances"] == 2 and report["samples"] == 8 and report["throughput_qps"] > 0


def _table_without_speed(text: str) -> list[list[str]]:
    return [line.split("|")[1:-2] for line in text.splitlines() if line.startswith("|")]


def test_eval_sharded_across_devices(cluster, setup, tmp_path):
    yaml_path = setup["root"] / "tiny_rpc.yaml"
    common = ["eval", yaml_path, "--images", setup["photos"][0].parent, "--precisions", "fp32"]
    local = run_cli("tvmzoo", *common, "--workspace", tmp_path / "local")
    remote = run_cli("tvmzoo", *common, "--workspace", tmp_path / "remote",
                     "--rpc-tracker", cluster["tracker"], "--rpc-key", KEY)
    assert _table_without_speed(remote.stdout) == _table_without_speed(local.stdout)
    assert "| fp32 | 50 |" in remote.stdout
    name = "tiny_rpc-eval-fp32.result.txt"
    assert (tmp_path / "remote" / name).read_text() == (tmp_path / "local" / name).read_text()
    assert "on 2 device(s)" in remote.stderr


def _sessions_served(cluster) -> int:
    return sum((cluster["logs"] / f"server{i}.log").read_text().count("connected from") for i in range(2))


@pytest.mark.slow
def test_tune_measures_on_remote_devices(cluster, setup, tmp_path):
    """`vamc tune --rpc-tracker` measures MetaSchedule's candidates and the default-vs-tuned head to
    head on the devices (MetaSchedule's RPCRunner); the records apply and the build equals ONNX Runtime."""
    pytest.importorskip("xgboost")
    import json

    import numpy as np
    import onnxruntime as ort

    from tvmzoo.run.runtime import CompiledModel
    from tvmzoo.compile.records import RECORD_FILE, WORKLOAD_FILE, json_is_default, read_records, record_secs

    records, yaml_path = tmp_path / "records", setup["root"] / "tiny_rpc.yaml"
    before = _sessions_served(cluster)
    run_cli("vamc", "tune", yaml_path, "--trials", "2", "--per-task", "1", "--set", f"tuning.records={records}",
            "--rpc-tracker", cluster["tracker"], "--rpc-key", KEY)
    lines = (records / RECORD_FILE).read_text().splitlines()
    assert lines and (records / WORKLOAD_FILE).is_file()
    # every record was measured in an RPC session: 2 trials, then MEASURE_ROUNDS per candidate
    assert _sessions_served(cluster) - before >= len(lines) + 2

    run_cli("vamc", "compile", yaml_path, "--set", f"tuning.records={records}", "--set", "name=tiny_tuned")
    prefix = setup["root"] / "ws" / "tiny_tuned" / "mod"
    kernels = json.loads((prefix.parent / "mod.json").read_text())["kernels"]
    assert kernels["records"] == str(records)
    # kernels come from the records exactly where a tuned schedule beat the default on the devices
    best = {}
    for rec in read_records(records):
        best.setdefault(rec[0], []).append((record_secs(rec), json_is_default(rec)))
    assert (kernels["tuned"] > 0) == any(not min(recs)[1] for recs in best.values())
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    got = CompiledModel.load(prefix).run(x)
    session = ort.InferenceSession(str(setup["root"] / "tiny.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x})[0].astype(np.float64)
    want = np.exp(logits - logits.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    assert got.argmax(axis=1).tolist() == want.argmax(axis=1).tolist()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_server_dying_mid_run_loses_nothing(cluster, setup, tmp_path):
    from tvmzoo.run.runner import classify
    from tvmzoo.run.runtime import CompiledModel

    paths = setup["photos"] * 2                      # 100 images, 20 shards of 5
    pre = resolve_preprocessing(setup["model"], None)
    local = classify(CompiledModel.load(setup["model"]), paths, pre, progress=False).predictions
    seen: list[str] = []

    def kill_after_first_shard(pred) -> None:
        seen.append(pred.path)
        if len(seen) == 5:
            stop(cluster["servers"][1])

    spec = RemoteSpec.from_args(tracker=cluster["tracker"], key=KEY)
    run = classify_sharded(setup["model"], paths, pre, spec, shard_size=5, progress=False,
                           on_prediction=kill_after_first_shard)
    assert run.devices == 2 and run.reassigned >= 1
    assert [p.path for p in run.predictions] == [str(p) for p in paths]     # every image once, in order
    assert sorted(seen) == sorted(str(p) for p in paths)                    # no shard reported twice
    assert [(p.ids, p.probs) for p in run.predictions] == [(p.ids, p.probs) for p in local]


# ---------------------------------------------------------------- trust (issue 19): loopback, key, checksum
SECRET = "tvmzoo-secret-9f3c"


def _this_hosts_address() -> str | None:
    """A non-loopback address of this machine (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_listening(port: int, log: Path) -> None:
    tries = 0
    while not _listening(port):
        tries += 1
        assert tries < 300, f"no server on {port} after a minute:\n{log.read_text(errors='replace')[-2000:]}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, request):
    """`tvmzoo device serve --key SECRET` with the default host: 127.0.0.1, nothing else."""
    log = tmp_path_factory.mktemp("rpc-keyed") / "server.log"
    port = free_port()
    proc = start("device", "serve", "--key", SECRET, "--port", str(port), log=log)
    request.addfinalizer(lambda: stop(proc))
    _wait_listening(port, log)
    return {"address": f"127.0.0.1:{port}", "port": port, "log": log}


@pytest.mark.reliability
def test_device_commands_listen_on_loopback_by_default(keyed_server, caplog):
    from tvmzoo.run import devices

    address = _this_hosts_address()
    if address is not None:                              # reachable from this host's own address: refused
        with socket.socket() as s:
            assert s.connect_ex((address, keyed_server["port"])) != 0
    assert "listens on" not in keyed_server["log"].read_text()
    for command in (devices.serve_command(None, None), devices.tracker_command()):
        assert command[command.index("--host") + 1] == "127.0.0.1"
    assert not caplog.records
    for host in ("0.0.0.0", "::", "192.168.1.20", "device.example"):   # only the command line, nothing started
        caplog.clear()
        devices.serve_command(None, None, host=host)
        devices.tracker_command(host=host)
        assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"], host
        assert "run code on this machine" in caplog.records[0].getMessage()
        assert "ssh -N -L 9090:127.0.0.1:9090" in caplog.records[0].getMessage()
    caplog.clear()
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        devices.serve_command(None, None, host=host)
    assert not caplog.records


@pytest.mark.reliability
@pytest.mark.parametrize("key", [None, "wrong-key", SECRET])
def test_keyed_server_serves_only_its_key(key, keyed_server, setup):
    args = ["vamp", "-m", setup["model"], "-s", "3,32,32", "--iterations", "2", "--json",
            "--rpc", keyed_server["address"]]
    proc = run_cli(*args, *(["--rpc-key", key] if key else []), check=False)
    if key == SECRET:
        assert proc.returncode == 0, proc.stderr
        assert '"samples": 2' in proc.stdout
        return
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot reach rpc server {keyed_server['address']}" in proc.stderr
    assert "accepts only clients with the same --rpc-key" in proc.stderr


@pytest.mark.reliability
@pytest.mark.parametrize("damage", ["truncated", "replaced"])
def test_damaged_module_is_refused_before_upload(damage, keyed_server, cluster, setup, tmp_path):
    """A mod.so that differs from mod.json's sha256 is never sent to a device (vamp --rpc, tvmzoo run over
    a tracker): one clear error, as for a local load."""
    import shutil

    model = tmp_path / "tiny"
    shutil.copytree(Path(setup["model"]).parent, model)
    so = model / "mod.so"
    data = so.read_bytes()
    so.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:-64] + b"\x90" * 64)
    served = keyed_server["log"].read_text().count("connected from")
    proc = run_cli("vamp", "-m", model / "mod", "-s", "3,32,32", "--iterations", "1",
                   "--rpc", keyed_server["address"], "--rpc-key", SECRET, check=False)
    assert proc.returncode == 2 and "mod.so does not match mod.json" in proc.stderr, proc.stderr
    assert keyed_server["log"].read_text().count("connected from") == served     # nothing was sent
    proc = run_cli("tvmzoo", "run", "--file_path", setup["photos"][0], "--model_prefix_path", model / "mod",
                   "--save_dir", tmp_path, "--rpc-tracker", cluster["tracker"], "--rpc-key", KEY, check=False)
    assert proc.returncode == 2 and "mod.so does not match mod.json" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
