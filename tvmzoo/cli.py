"""Argument parsing for `tvmzoo`, `vamc` and `vamp`; every command is a thin layer over the library."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import TvmzooError, in_context
from .run.filenames import quote_path

log = logging.getLogger("tvmzoo")


def _size(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.strip("[]() ").replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 224 or 3,224,224") from None


def _overrides(items: Sequence[str]) -> dict:
    """--set key.path=value, the value read as YAML once ('null' -> None, "'null'" -> the string null)."""
    import yaml

    from .limits import load_yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise TvmzooError(f"--set {item}: write it as key.path=value, e.g. --set backend.dtype=fp16")
        try:
            out[key] = load_yaml(value)  # nesting bounded: a value nested 100000 deep is kept as text
        except yaml.YAMLError:  # not a YAML scalar or list: the text as is; the config check says if it fits
            out[key] = value
    return out


# ---------------------------------------------------------------- commands


def cmd_export(args) -> int:
    from .models.export import ExportSpec, export_onnx

    size = args.input_size if len(args.input_size) == 2 else args.input_size * 2
    path = export_onnx(ExportSpec(args.family, args.arch, args.source, args.weights, tuple(size), args.batch),
                       args.output)
    print(f"wrote {path}")
    return 0


def cmd_reparam(args) -> int:
    from .models.reparam import ReparamSpec, write_deploy_checkpoint

    path = write_deploy_checkpoint(ReparamSpec(args.family, args.arch, args.source, args.weights), args.output)
    print(f"wrote {path}")
    return 0


def cmd_deploy_cpp(args) -> int:
    from .run import cpp_runner

    if args.cmake_args:
        print(" ".join(cpp_runner.tvm_paths().cmake_args()))
        return 0
    print(f"built {cpp_runner.build(Path(args.build))}")
    return 0


def cmd_compile(args) -> int:
    from .config import load_build_config

    cfg = load_build_config(args.yaml, _overrides(args.set))  # before importing TVM: config errors come fast
    from .compile.compiler import compile_model

    try:
        out = compile_model(cfg)
    except TvmzooError as exc:  # every compile error names the YAML it came from
        if str(exc).startswith(str(cfg.path)):
            raise
        raise in_context(exc, cfg.path) from None
    print(f"compiled {cfg.name} ({cfg.backend.dtype}) -> {out / 'mod.so'}")
    return 0


def _remote(args):
    from .run.devices import RemoteSpec

    return RemoteSpec.from_args(args.rpc, args.rpc_tracker, args.rpc_key)


def cmd_tune(args) -> int:
    from .compile.compiler import tune_build
    from .config import load_build_config

    remote = _remote(args)  # before loading TVM: bad --rpc flags fail fast
    records = tune_build(load_build_config(args.yaml, _overrides(args.set)), args.trials, args.per_task,
                         remote=remote)
    print(f"tuning records in {records}; `vamc compile` applies them")
    return 0


def cmd_classify(args) -> int:
    from .run import runner

    options = runner.RunOptions(mode=args.infer_mode, batch=args.batch, instances=args.instances,
                                resume=args.resume, remote=_remote(args))
    summary = runner.classify_to_file(args.model_prefix_path, args.file_path, args.save_result_txt,
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


def cmd_eval_topk(args) -> int:
    from .eval.topk import evaluate_result_file

    print(evaluate_result_file(args.result, args.gt, args.label_wnids).line())
    return 0


def cmd_image2npz(args) -> int:
    from .io.images import find_images
    from .run.npz import images_to_npz

    written, failed = images_to_npz(find_images(args.dataset_path), Path(args.target_path), Path(args.text_path),
                                    root=Path(args.dataset_path))
    print(f"wrote {len(written)} npz files, list in {quote_path(args.text_path)}")
    for path, reason in failed:
        print(f"failed: {quote_path(path)}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def cmd_npz_decode(args) -> int:
    from .eval.topk import decode_npz_outputs

    n = decode_npz_outputs(Path(args.datalist), Path(args.out_dir), Path(args.result), args.label_txt)
    print(f"wrote {n} results to {args.result}")
    return 0


def cmd_vamp(args) -> int:
    from .run import bench
    from .run.runner import resolve_preprocessing
    from .run.vendor_flags import vendor_notes

    for note in vendor_notes(args.processes, args.device_ids, args.dtype, args.vendor_extra):
        print(f"note: {note}", file=sys.stderr)
    if args.datalist:
        from .run.npz import read_datalist

        pre = resolve_preprocessing(args.model_prefix, args.vdsp_params)
        n = bench.run_datalist(args.model_prefix, read_datalist(Path(args.datalist)), Path(args.path_output),
                               pre, batch=args.batch, remote=_remote(args))
        print(f"wrote {n} output npz files to {args.path_output}")
        return 0
    shape = args.shape if args.shape is None or len(args.shape) == 3 else \
        (3, *args.shape * (2 if len(args.shape) == 1 else 1))
    cfg = bench.BenchConfig(args.instance, args.batch, args.iterations, args.warmup, shape, args.threads)
    report = bench.benchmark(args.model_prefix, cfg, remote=_remote(args))
    e2e = None
    if args.images:
        from .io.images import find_images

        paths = find_images(Path(args.images))
        if not paths:
            raise TvmzooError(f"no images found at {args.images}.")
        e2e = bench.end_to_end(args.model_prefix, paths, resolve_preprocessing(args.model_prefix, args.vdsp_params),
                               args.infer_mode, args.instance, args.batch, remote=_remote(args))
    if args.json:
        print(json.dumps({**report.as_dict(), "end_to_end": e2e.__dict__ if e2e else None}, indent=2))
    else:
        print(report.text() + (f"\n{e2e.text()}" if e2e else ""))
    return 0


def cmd_quant_report(args) -> int:
    from .compile.compiler import quant_report
    from .config import load_build_config

    csv_path, md_path = quant_report(load_build_config(args.yaml, _overrides(args.set)), args.output)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    return 0


def cmd_eval(args) -> int:
    from .eval.accuracy import evaluate_precisions, format_table

    from .run.runner import RunOptions

    options = RunOptions(mode=args.infer_mode, instances=args.instances, resume=args.resume, remote=_remote(args))
    rows = evaluate_precisions(args.yaml, args.images, args.precisions.split(","), args.limit, args.workspace,
                               options=options, overrides=_overrides(args.set))
    print(format_table(rows))
    from .eval.report import eval_paths, save_eval_table

    table, _ = eval_paths(args.yaml, args.workspace)
    save_eval_table(rows, table)
    print(f"wrote {table} (`tvmzoo report {args.yaml}` charts it with each build's speed)")
    return 0


def cmd_report(args) -> int:
    from .eval.report import build_report, eval_paths, write_report

    table, name = eval_paths(args.yaml, args.workspace)
    rows = build_report(Path(args.eval) if args.eval else table, name, args.rounds)
    out = Path(args.output) if args.output else table.parent / f"{name}-report"
    md, png = write_report(rows, out, f"{name}: accuracy vs latency on {rows[0].target}")
    print(md.read_text())
    print(f"wrote {md} and {png}")
    return 0


def cmd_device(args) -> int:
    from .run import devices

    if args.device_command == "tracker":
        cmd = devices.tracker_command(args.host, args.port)
    else:
        cmd = devices.serve_command(args.tracker, args.key, args.host, args.port)
    devices.exec_command(cmd)
    return 0  # not reached: exec replaces this process


def cmd_info(args) -> int:
    from .models.info import info_for

    print(info_for(args.model, _overrides(args.set)).text())
    return 0


def cmd_quickstart(args) -> int:
    from .quickstart import run_quickstart

    run_quickstart(Path(args.workspace), print)
    return 0


def cmd_serve(args) -> int:
    from .run.serve.config import ServeConfig, read_token
    from .run.serve.server import serve

    cfg = ServeConfig(Path(args.repository), args.host, args.http_port, args.grpc_port, args.instances,
                      args.threads, args.max_queue_delay_us, args.max_batch, args.max_request_bytes,
                      read_token(args.auth_token_file) if args.auth_token_file else None,
                      Path(args.labels) if args.labels else None, args.drain_seconds)
    serve(cfg, lambda line: print(line, flush=True))
    return 0


# ---------------------------------------------------------------- parsers


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve compiled models over KServe v2 / Triton's protocol (HTTP + gRPC)")
    p.add_argument("repository", help="a folder of builds (<name>/mod.so + mod.json) or one build folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--http-port", type=int, default=8000, help="0: any free port (printed)")
    p.add_argument("--grpc-port", type=int, default=8001, help="0: any free port (printed)")
    p.add_argument("--instances", type=int, default=1, help="model instances per model")
    p.add_argument("--threads", type=int, default=None, help="TVM threads per instance (default: all cores)")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="dynamic batching: how long a request may wait for a fuller batch")
    p.add_argument("--max-batch", type=int, default=8, help="batch size for builds with a dynamic batch axis")
    p.add_argument("--max-request-bytes", type=int, default=64 << 20, help="larger requests get 413")
    p.add_argument("--auth-token-file", help="require 'Authorization: Bearer <token>' (not on health)")
    p.add_argument("--labels", help="class names for classification (default: labels.txt by the build, "
                                    "else ImageNet-1k for 1000 classes)")
    p.add_argument("--drain-seconds", type=float, default=30.0, help="SIGTERM: time to finish requests")
    p.set_defaults(func=cmd_serve)



def _add_compile_and_tune(sub) -> None:
    p = sub.add_parser("compile", help="step 3: compile a build YAML into <workspace>/<name>/mod.so")
    p.add_argument("yaml")
    _add_set_arg(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("tune", help="MetaSchedule-tune a build's kernels (resumable); compile applies the records")
    p.add_argument("yaml")
    p.add_argument("--trials", type=int, default=500,
                   help="trials in this run, over all kernels (0: only re-measure the default schedules "
                        "against the records, e.g. after upgrading tvmzoo)")
    p.add_argument("--per-task", type=int, default=None, help="at most this many trials per kernel")
    _add_set_arg(p)
    _add_rpc_args(p)  # measure candidates on TVM RPC devices (MetaSchedule's RPCRunner)
    p.set_defaults(func=cmd_tune)


def _add_vamp_args(p) -> None:
    p.add_argument("-m", "--model_prefix", required=True, help="<workspace>/<name>/mod")
    p.add_argument("--vdsp_params", help="vdsp JSON (default: the preprocessing recorded in mod.json)")
    p.add_argument("-i", "--instance", type=int, default=1, help="model instances run in parallel (throughput mode)")
    p.add_argument("-b", "--batch", "--batch_size", type=int, default=1)
    p.add_argument("-s", "--shape", type=_size, default=None, help="input shape C,H,W (default: the module's)")
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
    _add_rpc_args(p)
    p.set_defaults(func=cmd_vamp)


def _add_set_arg(p) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a YAML value, e.g. --set backend.dtype=fp16 --set dataset.path=/data/calib "
                        "(read as YAML once: --set name=\"'010'\" keeps the string 010)")


def _add_rpc_args(p) -> None:
    p.add_argument("--rpc", metavar="HOST:PORT", help="run on one TVM RPC server (tvmzoo device serve)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="run on every device registered under --rpc-key at this TVM RPC tracker")
    p.add_argument("--rpc-key", metavar="KEY", help="the device key the servers registered with")


def _add_run_args(p) -> None:
    p.add_argument("--instances", type=int, default=1, help="model instances run in parallel (--infer_mode async)")
    p.add_argument("--resume", action="store_true",
                   help="keep the images already in the result file and classify only the rest")
    _add_rpc_args(p)


def _add_checkpoint_args(p, output_help: str) -> None:
    p.add_argument("--family", required=True, help="repvgg | efficientnet_lite | regnet")
    p.add_argument("--arch", required=True, help="e.g. A0, B1g2, D2se, lite0")
    p.add_argument("--source", required=True, help="checkpoint layout: official | mmcls | ppcls | ...")
    p.add_argument("--weights", required=True, help="checkpoint file (.pth, .pdparams, .npz) or 'package'")
    p.add_argument("--output", required=True, help=output_help)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="step 1: checkpoint -> deploy ONNX (re-parameterized, BN folded)")
    _add_checkpoint_args(p, "deploy ONNX to write")
    p.add_argument("--input-size", type=_size, default=(224,), help="H,W (or one number)")
    p.add_argument("--batch", type=int, default=None, help="fixed batch size (default: dynamic)")
    p.set_defaults(func=cmd_export)


def _add_deploy(sub) -> None:
    p = sub.add_parser("reparam", help="train checkpoint -> the source's own deploy checkpoint (.pth / .pdparams)")
    _add_checkpoint_args(p, "deploy checkpoint to write, in --source's format (.pth; .pdparams for ppcls)")
    p.set_defaults(func=cmd_reparam)

    p = sub.add_parser("deploy-cpp", help="the C++ runner (deploy/cpp): cmake arguments for this TVM, or build it")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--cmake-args", action="store_true", help="print the -D arguments naming this TVM's headers/libs")
    how.add_argument("--build", metavar="DIR", help="configure and build deploy/cpp into DIR")
    p.set_defaults(func=cmd_deploy_cpp)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy harness: compile precisions, classify a labelled folder, one table")
    p.add_argument("yaml")
    p.add_argument("--images", required=True, help="folder of wnid-named images or synset sub-folders")
    p.add_argument("--precisions", default="fp32,fp16", help="comma-separated: fp32,fp16,bf16,int8")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--workspace", default=None, help="where the evaluation builds go (default: the YAML's)")
    p.add_argument("--infer_mode", choices=("sync", "async"), default="async")
    _add_set_arg(p)
    _add_run_args(p)
    p.set_defaults(func=cmd_eval)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="accuracy (tvmzoo eval) vs latency of every build of a model: chart + table")
    p.add_argument("yaml")
    p.add_argument("--eval", default=None, help="tvmzoo eval's table (default: <workspace>/<name>-eval.md)")
    p.add_argument("--workspace", default=None, help="where tvmzoo eval put its builds (default: the YAML's)")
    p.add_argument("--output", default=None, help="folder for report.md / report.png (default: <workspace>/<name>-report)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per build")
    p.set_defaults(func=cmd_report)


def _add_device(sub) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvmzoo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_export(sub)
    _add_deploy(sub)
    _add_compile_and_tune(sub)

    p = sub.add_parser("run", help="step 4: classify images with a compiled model (classification.py)")
    add_classify_args(p)

    p = sub.add_parser("bench", help="step 5: vamp")
    _add_vamp_args(p)

    p = sub.add_parser("image2npz", help="images -> uint8 CHW RGB npz files and a datalist")
    add_image2npz_args(p)

    p = sub.add_parser("npz-decode", help="vamp output npz files -> result.txt")
    add_npz_decode_args(p)

    p = sub.add_parser("eval-topk", help="top-1 / top-5 of a result.txt")
    add_eval_topk_args(p)

    _add_eval(sub)
    _add_report(sub)
    _add_device(sub)

    p = sub.add_parser("quant-report", help="int8: per-layer weight / activation SQNR table (CSV + markdown)")
    p.add_argument("yaml")
    _add_set_arg(p)
    p.add_argument("--output", default=None, help="folder for the report (default: <workspace>/<name>_quant_report)")
    p.set_defaults(func=cmd_quant_report)

    p = sub.add_parser("info", help="parameters, multiply-adds, input size and layers of a model")
    p.add_argument("model", help="a build YAML or family:arch, e.g. repvgg:A0, regnet:400MF")
    _add_set_arg(p)
    p.set_defaults(func=cmd_info)

    _add_serve(sub)

    p = sub.add_parser("quickstart", help="compile EfficientNet-Lite0 (real weights) and classify sample photos")
    p.add_argument("--workspace", default="workspace/deploy_weights")
    p.set_defaults(func=cmd_quickstart)
    return parser


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
    _add_run_args(p)
    p.set_defaults(func=cmd_classify)


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


def add_eval_topk_args(p) -> None:
    p.add_argument("result", help="result.txt")
    p.add_argument("--gt", help="ground-truth file '<file name> <class index>' for flat val folders")
    p.add_argument("--label_wnids", help="wnid list in class order (default: ImageNet-1k)")
    p.set_defaults(func=cmd_eval_topk)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    try:
        return args.func(args)
    except TvmzooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def script(add_args: Callable, description: str) -> Callable[[Sequence[str] | None], int]:
    """A vendor-compatible script (common/...) with the same arguments as its tvmzoo subcommand."""
    def main(argv: Sequence[str] | None = None) -> int:
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("-v", "--verbose", action="store_true")
        add_args(parser)
        return run(parser, argv)
    return main


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


def vamc_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vamc", description="compile (and tune) build YAMLs")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compile_and_tune(sub)
    return run(parser, argv)


vamp_main = script(_add_vamp_args, "vamp: throughput / latency of a compiled model; --datalist writes outputs")
classification_main = script(add_classify_args, "runstream classification (vendor-compatible)")
image2npz_main = script(add_image2npz_args, "images -> npz (vendor-compatible)")
npz_decode_main = script(add_npz_decode_args, "vamp npz outputs -> result.txt (vendor-compatible)")
eval_topk_main = script(add_eval_topk_args, "top-1 / top-5 of a result file (vendor-compatible)")
