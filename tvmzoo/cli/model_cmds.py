"""Step 1 and the model registry: export, reparam, info, models."""
from __future__ import annotations

from .args import add_checkpoint_args, add_set_arg, overrides, size


def cmd_export(args) -> int:
    from ..models.export import ExportSpec, export_onnx

    size_hw = args.input_size if len(args.input_size) == 2 else args.input_size * 2
    path = export_onnx(ExportSpec(args.family, args.arch, args.source, args.weights, tuple(size_hw), args.batch),
                       args.output)
    print(f"wrote {path}")
    return 0


def cmd_reparam(args) -> int:
    from ..models.reparam import ReparamSpec, write_deploy_checkpoint

    path = write_deploy_checkpoint(ReparamSpec(args.family, args.arch, args.source, args.weights), args.output)
    print(f"wrote {path}")
    return 0


def cmd_info(args) -> int:
    from ..config.model_info import info_for

    print(info_for(args.model, overrides(args)).text())
    return 0


def add_reparam(sub) -> None:
    p = sub.add_parser("reparam", help="train checkpoint -> the source's own deploy checkpoint (.pth / .pdparams)")
    add_checkpoint_args(p, "deploy checkpoint to write, in --source's format (.pth; .pdparams for ppcls)")
    p.set_defaults(func=cmd_reparam)


def add_export(sub) -> None:
    p = sub.add_parser("export", help="step 1: checkpoint -> deploy ONNX (re-parameterized, BN folded)")
    add_checkpoint_args(p, "deploy ONNX to write")
    p.add_argument("--input-size", type=size, default=(224,), help="H,W (or one number)")
    p.add_argument("--batch", type=int, default=None, help="batch size in the ONNX (default: symbolic; the build YAML's frontend.shape fixes it)")
    p.set_defaults(func=cmd_export)


def add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters, multiply-adds, input size and layers of a model")
    p.add_argument("model", help="a build YAML, family:arch or a weights key family:arch:source[.tag], "
                                    "e.g. repvgg:A0, regnet:800MF:torchvision.v2")
    add_set_arg(p)
    p.set_defaults(func=cmd_info)


def cmd_models(args) -> int:
    from ..models import all_weights, get_family

    family = get_family(args.family).name if args.family else None
    for entry in all_weights():
        if family in (None, entry.family):
            print(entry.describe())
    return 0


def add_models(sub) -> None:
    p = sub.add_parser("models", help="the weights entries (family:arch:source[.tag]): input size, classes, top-1")
    p.add_argument("family", nargs="?", help="only this family, e.g. regnet")
    p.set_defaults(func=cmd_models)
