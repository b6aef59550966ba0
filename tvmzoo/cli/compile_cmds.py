"""Step 3: compile, tune, quant-report."""
from __future__ import annotations

from ..errors import TvmzooError, in_context
from .args import add_rpc_args, add_set_arg, overrides, remote_spec


def cmd_compile(args) -> int:
    from ..config import load_build_config

    cfg = load_build_config(args.yaml, overrides(args))  # before importing TVM: config errors come fast
    from ..compile.compiler import compile_model

    try:
        out = compile_model(cfg)
    except TvmzooError as exc:  # every compile error names the YAML it came from
        if str(exc).startswith(str(cfg.path)):
            raise
        raise in_context(exc, cfg.path) from None
    print(f"compiled {cfg.name} ({cfg.backend.dtype}) -> {out / 'mod.so'}")
    return 0


def cmd_tune(args) -> int:
    from ..compile.compiler import tune_build
    from ..config import load_build_config

    remote = remote_spec(args)  # before loading TVM: bad --rpc flags fail fast
    records = tune_build(load_build_config(args.yaml, overrides(args)), args.trials, args.per_task,
                         remote=remote)
    print(f"tuning records in {records}; `vamc compile` applies them")
    return 0


def cmd_quant_report(args) -> int:
    from ..compile.compiler import quant_report
    from ..config import load_build_config

    csv_path, md_path = quant_report(load_build_config(args.yaml, overrides(args)), args.output)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    return 0


def add_compile_and_tune(sub) -> None:
    p = sub.add_parser("compile", help="step 3: compile a build YAML into <workspace>/<name>/mod.so")
    p.add_argument("yaml")
    add_set_arg(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("tune", help="MetaSchedule-tune a build's kernels (resumable); compile applies the records")
    p.add_argument("yaml")
    p.add_argument("--trials", type=int, default=500,
                   help="trials in this run, over all kernels (0: only re-measure the default schedules "
                        "against the records, e.g. after upgrading tvmzoo)")
    p.add_argument("--per-task", type=int, default=None, help="at most this many trials per kernel")
    add_set_arg(p)
    add_rpc_args(p)  # measure candidates on TVM RPC devices (MetaSchedule's RPCRunner)
    p.set_defaults(func=cmd_tune)
