"""Steps 4-5 and deployment: run (classify), bench (vamp), image2npz, npz-decode, device, serve, deploy-cpp."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import TvmzooError
from ..run.filenames import quote_path
from .args import add_rpc_args, add_run_args, remote_spec, size


def cmd_classify(args) -> int:
    from ..run import runner, runstream

    options = runner.RunOptions(mode=args.infer_mode, batch=args.batch, instances=args.instances,
                                resume=args.resume, remote=remote_spec(args))
    summary = runstream.classify_to_file(args.model_prefix_path, args.file_path, args.save_result_txt,
                                         vdsp=args.vdsp_params_info, labels=args.label_txt,
                                         save_dir=args.save_dir, options=options)
    for path, reason in summary.failed:
        print(f"failed: {quote_path(path)}: {reason}", file=sys.stderr)
    if summary.skipped:
        print(f"resumed: {summary.skipped} image(s) were already in the result file")
    print(summary.speed_line())
    if summary.failed:
        print(f"{len(summary.failed)} image(s) could not be read (listed above)", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_vamp(args) -> int:
    from ..run import bench
    from ..run.runner import resolve_preprocessing
    from ..run.vendor_flags import vendor_notes

    for note in vendor_notes(args.processes, args.device_ids, args.dtype, args.vendor_extra):
        print(f"note: {note}", file=sys.stderr)
    if args.datalist:
        from ..run.npz import read_datalist

        pre = resolve_preprocessing(args.model_prefix, args.vdsp_params)
        n = bench.run_datalist(args.model_prefix, read_datalist(Path(args.datalist)), Path(args.path_output),
                               pre, batch=args.batch, remote=remote_spec(args))
        print(f"wrote {n} output npz files to {args.path_output}")
        return 0
    shape = args.shape if args.shape is None or len(args.shape) == 3 else \
        (3, *args.shape * (2 if len(args.shape) == 1 else 1))
    cfg = bench.BenchConfig(args.instance, args.batch, args.iterations, args.warmup, shape, args.threads)
    report = bench.benchmark(args.model_prefix, cfg, remote=remote_spec(args))
    e2e = None
    if args.images:
        from ..io.images import find_images

        paths = find_images(Path(args.images))
        if not paths:
            raise TvmzooError(f"no images found at {args.images}.")
        e2e = bench.end_to_end(args.model_prefix, paths, resolve_preprocessing(args.model_prefix, args.vdsp_params),
                               args.infer_mode, args.instance, args.batch, remote=remote_spec(args))
    if args.json:
        print(json.dumps({**report.as_dict(), "end_to_end": e2e.__dict__ if e2e else None}, indent=2))
    else:
        print(report.text() + (f"\n{e2e.text()}" if e2e else ""))
    return 0


def cmd_image2npz(args) -> int:
    from ..io.images import find_images
    from ..run.npz import images_to_npz

    written, failed = images_to_npz(find_images(args.dataset_path), Path(args.target_path), Path(args.text_path),
                                    root=Path(args.dataset_path))
    print(f"wrote {len(written)} npz files, list in {quote_path(args.text_path)}")
    for path, reason in failed:
        print(f"failed: {quote_path(path)}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def cmd_npz_decode(args) -> int:
    from ..eval.topk import decode_npz_outputs

    n = decode_npz_outputs(Path(args.datalist), Path(args.out_dir), Path(args.result), args.label_txt)
    print(f"wrote {n} results to {args.result}")
    return 0


def cmd_device(args) -> int:
    from ..run import devices

    if args.device_command == "tracker":
        cmd = devices.tracker_command(args.host, args.port)
    else:
        cmd = devices.serve_command(args.tracker, args.key, args.host, args.port)
    devices.exec_command(cmd)
    return 0  # not reached: exec replaces this process


def _given(args, *names: str) -> dict:
    """The flags the user gave (None: not given, ServeConfig's default applies)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_serve(args) -> int:
    from ..run.serve.config import ServeConfig, read_token
    from ..run.serve.server import serve

    cfg = ServeConfig(Path(args.repository), args.host, args.http_port, args.grpc_port, args.instances,
                      args.threads, args.max_queue_delay_us, args.max_request_bytes,
                      read_token(args.auth_token_file) if args.auth_token_file else None,
                      Path(args.labels) if args.labels else None, args.drain_seconds,
                      **_given(args, "max_image_pixels", "max_json_bytes", "idle_timeout_seconds", "max_connections"),
                      shared_memory=args.shared_memory, native=args.native)
    serve(cfg, lambda line: print(line, flush=True))
    return 0


def cmd_deploy_cpp(args) -> int:
    from ..run import cpp_runner

    if args.cmake_args:
        print(" ".join(cpp_runner.tvm_paths().cmake_args()))
        return 0
    print(f"built {cpp_runner.build(Path(args.build))}")
    return 0


def add_classify_args(p) -> None:
    p.add_argument("--file_path", required=True, help="an image or a folder (searched recursively)")
    p.add_argument("--model_prefix_path", required=True, help="<workspace>/<name>/mod")
    p.add_argument("--vdsp_params_info", help="vdsp JSON (default: the preprocessing recorded in mod.json)")
    p.add_argument("--label_txt", help="class names, one per line (default: ImageNet-1k)")
    p.add_argument("--save_dir", default="./runstream_output")
    p.add_argument("--save_result_txt", default="result.txt", help="written inside --save_dir unless absolute")
    p.add_argument("--infer_mode", choices=("sync", "async"), default="sync")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device_id", type=int, default=0, help="accepted for vendor compatibility")
    add_run_args(p)
    p.set_defaults(func=cmd_classify)


def add_vamp_args(p) -> None:
    p.add_argument("-m", "--model_prefix", required=True, help="<workspace>/<name>/mod")
    p.add_argument("--vdsp_params", help="vdsp JSON (default: the preprocessing recorded in mod.json)")
    p.add_argument("-i", "--instance", type=int, default=1, help="model instances run in parallel (throughput mode)")
    p.add_argument("-b", "--batch", "--batch_size", type=int, default=1)
    p.add_argument("-s", "--shape", type=size, default=None, help="input shape C,H,W (default: the module's)")
    p.add_argument("--iterations", type=int, default=50, help="batches per instance")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="threads per instance, each instance on its own cores (default: cores / instances)")
    p.add_argument("-d", "--device_ids", default="[0]", help="accepted for vendor compatibility (CPU: one device)")
    p.add_argument("-p", "--processes", type=int, default=None, help="vendor: processes per card (ignored, noted)")
    p.add_argument("--dtype", default=None, help="vendor: input dtype (ignored, noted: the module's is used)")
    p.add_argument("vendor_extra", nargs="*", help=argparse.SUPPRESS)  # `-i 2 p 2` in vendor READMEs
    p.add_argument("--datalist", help="npz list from image2npz: infer each and write output npz files")
    p.add_argument("--path_output", default="./vamp_output", help="where --datalist outputs go")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--images", help="also time the whole runner (decode + preprocess + infer) over these images")
    p.add_argument("--infer_mode", choices=("sync", "async"), default="sync", help="runner mode for --images")
    add_rpc_args(p)
    p.set_defaults(func=cmd_vamp)


def add_image2npz_args(p) -> None:
    p.add_argument("--dataset_path", required=True)
    p.add_argument("--target_path", required=True)
    p.add_argument("--text_path", required=True)
    p.set_defaults(func=cmd_image2npz)


def add_npz_decode_args(p) -> None:
    p.add_argument("datalist", help="npz list written by image2npz")
    p.add_argument("out_dir", help="vamp --path_output folder")
    p.add_argument("result", help="result.txt to write")
    p.add_argument("label_txt", nargs="?", help="class names (default: ImageNet-1k)")
    p.set_defaults(func=cmd_npz_decode)


def add_device(sub) -> None:
    p = sub.add_parser("device", help="serve this machine as a TVM RPC device, or run the tracker")
    dev = p.add_subparsers(dest="device_command", required=True)
    q = dev.add_parser("tracker", help="python -m tvm.exec.rpc_tracker: devices register here")
    q.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only; see docs/runstream.md before "
                        "opening it to a network)")
    q.add_argument("--port", type=int, default=9190)
    q.set_defaults(func=cmd_device)
    q = dev.add_parser("serve", help="python -m tvm.exec.rpc_server: run models sent by tvmzoo")
    q.add_argument("--tracker", metavar="HOST:PORT", help="register with this tracker (else clients use --rpc)")
    q.add_argument("--key", help="device key to register under, e.g. sapphirerapids; without --tracker, "
                                 "only clients passing the same --rpc-key are served")
    q.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only). An RPC server runs what its "
                        "clients send: open it only to a trusted network, or use an SSH tunnel")
    q.add_argument("--port", type=int, default=9090, help="first port to try")
    q.set_defaults(func=cmd_device)


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve compiled models over KServe v2 / Triton's protocol (HTTP + gRPC)")
    p.add_argument("repository", help="a folder of builds (<name>/mod.so + mod.json) or one build folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--http-port", type=int, default=8000, help="0: any free port (printed)")
    p.add_argument("--grpc-port", type=int, default=8001, help="0: any free port (printed)")
    p.add_argument("--instances", type=int, default=None,
                   help="model instances per model (default: one per core, at most 4, without --threads; else 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="TVM threads per instance, fixed (default: adaptive, a batch runs on all cores when "
                        "nothing else runs or waits, else on its instance's share)")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="dynamic batching: how long a request may wait for a fuller batch")
    p.add_argument("--max-request-bytes", type=int, default=64 << 20, help="larger requests get 413")
    p.add_argument("--max-json-bytes", type=int, default=None,
                   help="the JSON part of an HTTP infer request (default 16 MiB; binary tensor data is not counted); "
                        "larger ones get 413")
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="pixels of one image sent as BYTES, read from its header before decoding; larger ones "
                        "get 400 (default 4096 x 4096 = 16777216: 48 MB decoded per decoding core)")
    p.add_argument("--auth-token-file", help="require 'Authorization: Bearer <token>' (not on health)")
    p.add_argument("--labels", help="class names for classification, for builds without a labels.txt of their own "
                                    "(else ImageNet-1k for 1000 classes)")
    p.add_argument("--drain-seconds", type=float, default=30.0, help="SIGTERM: time to finish requests")
    shm = p.add_mutually_exclusive_group()
    shm.add_argument("--shared-memory", dest="shared_memory", action="store_true", default=None,
                     help="accept Triton's system shared memory registrations whatever --host is (default: only when "
                          "--host is a loopback address; a client that may call the server can have it open /dev/shm "
                          "objects the server's user may read and write)")
    shm.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                     help="refuse system shared memory registrations, also on a loopback --host")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open connections per front end (HTTP, gRPC), default 256: each holds a file descriptor and "
                        "can hold a request of up to --max-request-bytes (the open-file limit is raised to 3 x this + 64, up to "
                        "the hard limit); past it HTTP answers 503 and closes, gRPC closes the connection")
    p.add_argument("--idle-timeout-seconds", type=float, default=None,
                   help="close a connection that sends nothing for this long, default 60 (408 when it stalled mid-request; "
                        "gRPC: no call for this long)")
    path = p.add_mutually_exclusive_group()
    path.add_argument("--native", action="store_true", default=None,
                      help="the native data path, or fail (default: on when it builds here, else the Python path "
                           "with a warning): models batched and run in C++, binary HTTP infer answered in C++; "
                           "built at first start with the C++ compiler and ninja, cached in ~/.cache/tvmzoo/native")
    path.add_argument("--no-native", dest="native", action="store_false",
                      help="the Python data path (asyncio front ends, the Python dynamic batcher)")
    p.set_defaults(func=cmd_serve)


def add_deploy_cpp(sub) -> None:
    p = sub.add_parser("deploy-cpp", help="the C++ runner (deploy/cpp): cmake arguments for this TVM, or build it")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--cmake-args", action="store_true", help="print the -D arguments naming this TVM's headers/libs")
    how.add_argument("--build", metavar="DIR", help="configure and build deploy/cpp into DIR")
    p.set_defaults(func=cmd_deploy_cpp)
