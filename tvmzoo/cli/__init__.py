"""Argument parsing for `tvmzoo`, `vamc` and `vamp`; every command is a thin layer over the library.

One module per stage of the flow holds its commands' parsers (`add_*`) and handlers (`cmd_*`):
model_cmds (export, reparam, info, models), compile_cmds (compile, tune, quant-report), run_cmds
(run, bench, image2npz, npz-decode, device, serve, deploy-cpp), eval_cmds (eval-topk, eval, report,
quickstart); args.py holds the arguments they share.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from ..errors import TvmzooError
from .args import add_set_arg
from .compile_cmds import add_compile_and_tune, cmd_quant_report
from .eval_cmds import add_eval, add_eval_topk_args, add_report, cmd_quickstart
from .model_cmds import add_export, add_info, add_models, add_reparam
from .run_cmds import (add_classify_args, add_deploy_cpp, add_device, add_image2npz_args, add_npz_decode_args,
                       add_serve, add_vamp_args)

log = logging.getLogger("tvmzoo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvmzoo", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    add_export(sub)
    add_reparam(sub)
    add_deploy_cpp(sub)
    add_compile_and_tune(sub)

    p = sub.add_parser("run", help="step 4: classify images with a compiled model (classification.py)")
    add_classify_args(p)

    p = sub.add_parser("bench", help="step 5: vamp")
    add_vamp_args(p)

    p = sub.add_parser("image2npz", help="images -> uint8 CHW RGB npz files and a datalist")
    add_image2npz_args(p)

    p = sub.add_parser("npz-decode", help="vamp output npz files -> result.txt")
    add_npz_decode_args(p)

    p = sub.add_parser("eval-topk", help="top-1 / top-5 of a result.txt")
    add_eval_topk_args(p)

    add_eval(sub)
    add_report(sub)
    add_device(sub)

    p = sub.add_parser("quant-report", help="int8: per-layer weight / activation SQNR table (CSV + markdown)")
    p.add_argument("yaml")
    add_set_arg(p)
    p.add_argument("--output", default=None, help="folder for the report (default: <workspace>/<name>_quant_report)")
    p.set_defaults(func=cmd_quant_report)

    add_info(sub)
    add_models(sub)
    add_serve(sub)

    p = sub.add_parser("quickstart", help="compile EfficientNet-Lite0 (real weights) and classify sample photos")
    p.add_argument("--workspace", default="workspace/deploy_weights")
    p.set_defaults(func=cmd_quickstart)
    return parser


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
    add_compile_and_tune(sub)
    return run(parser, argv)


vamp_main = script(add_vamp_args, "vamp: throughput / latency of a compiled model; --datalist writes outputs")
classification_main = script(add_classify_args, "runstream classification (vendor-compatible)")
image2npz_main = script(add_image2npz_args, "images -> npz (vendor-compatible)")
npz_decode_main = script(add_npz_decode_args, "vamp npz outputs -> result.txt (vendor-compatible)")
eval_topk_main = script(add_eval_topk_args, "top-1 / top-5 of a result file (vendor-compatible)")
