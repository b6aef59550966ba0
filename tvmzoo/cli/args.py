"""Arguments several commands share: sizes, --set, RPC devices, runner options."""
from __future__ import annotations

import argparse


def overrides(args) -> dict:
    """The command's --set values, each read as YAML once."""
    from ..config import parse_set

    return parse_set(args.set)


def size(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.strip("[]() ").replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 224 or 3,224,224") from None


def remote_spec(args):
    from ..run.devices import RemoteSpec

    return RemoteSpec.from_args(args.rpc, args.rpc_tracker, args.rpc_key)


def add_set_arg(p) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a YAML value, e.g. --set backend.dtype=fp16 --set dataset.path=/data/calib "
                        "(read as YAML once: --set name=\"'010'\" keeps the string 010)")


def add_rpc_args(p) -> None:
    p.add_argument("--rpc", metavar="HOST:PORT", help="run on one TVM RPC server (tvmzoo device serve)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="run on every device registered under --rpc-key at this TVM RPC tracker")
    p.add_argument("--rpc-key", metavar="KEY", help="the device key the servers registered with")


def add_run_args(p) -> None:
    p.add_argument("--instances", type=int, default=1, help="model instances run in parallel (--infer_mode async)")
    p.add_argument("--resume", action="store_true",
                   help="keep the images already in the result file and classify only the rest")
    add_rpc_args(p)


def add_checkpoint_args(p, output_help: str) -> None:
    p.add_argument("--family", required=True, help="repvgg | efficientnet_lite | regnet")
    p.add_argument("--arch", required=True, help="e.g. A0, B1g2, D2se, lite0")
    p.add_argument("--source", required=True, help="checkpoint layout: official | mmcls | ppcls | ...")
    p.add_argument("--weights", required=True, help="checkpoint file (.pth, .pdparams, .npz) or 'package'")
    p.add_argument("--output", required=True, help=output_help)
