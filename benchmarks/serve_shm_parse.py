"""What the server's event loop does per 602 KB FP32 request before the batcher, socket vs system shared memory,
in this process (no server, no model): the binary-tensor body parsed (`parse_infer`: the tensor is a view of
the received body; its bytes were copied once by the kernel's recv, which this does not count) against the JSON
header parsed and the tensor read from a registered /dev/shm region (`Attached`: fstat + pread into a new array).
Both then pass the same finiteness check. Interleaved rounds, median microseconds of CPU per request.

    .venv/bin/python benchmarks/serve_shm_parse.py [--rounds 7] [--n 2000]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tvmzoo.run.serve.http_codec import parse_infer  # noqa: E402
from tvmzoo.run.serve.shared_memory import Attached, SharedMemoryRegions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=2000, help="requests per round and way")
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    body = header + x.tobytes()
    shm_header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "parameters": {
        "shared_memory_region": "in", "shared_memory_byte_size": x.nbytes}}]}).encode()
    key = f"serve_shm_parse_{time.time_ns()}"
    path = Path("/dev/shm") / key
    path.write_bytes(x.tobytes())
    regions = SharedMemoryRegions()
    regions.register("in", "/" + key, 0, x.nbytes)

    def socket() -> np.ndarray:
        return parse_infer(body, len(header), "m", "").inputs[0].data

    def shared() -> np.ndarray:
        request = parse_infer(shm_header, None, "m", "")
        with Attached(regions, request):
            return request.inputs[0].data

    ways = {"socket (body parsed, tensor a view)": socket, "shm (header parsed, pread from /dev/shm)": shared}
    np.testing.assert_array_equal(socket(), shared())
    times: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(args.rounds):
            for name, way in ways.items():
                cpu = time.process_time()
                for _ in range(args.n):
                    np.isfinite(way()).all()   # the check every FP32 input gets (inference.check_tensor)
                times[name].append(1e6 * (time.process_time() - cpu) / args.n)
    finally:
        regions.close()
        path.unlink()
    for name, values in times.items():
        print(f"{name}: {np.median(values):.1f} us CPU / request (rounds {min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
