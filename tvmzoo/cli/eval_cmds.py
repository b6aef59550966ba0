"""Accuracy: eval-topk, eval (the harness), report, quickstart."""
from __future__ import annotations

from pathlib import Path

from .args import add_run_args, add_set_arg, overrides, remote_spec


def cmd_eval_topk(args) -> int:
    from ..eval.topk import evaluate_result_file

    print(evaluate_result_file(args.result, args.gt, args.label_wnids).line())
    return 0


def cmd_eval(args) -> int:
    from ..eval.accuracy import evaluate_precisions, format_table
    from ..run.runner import RunOptions

    options = RunOptions(mode=args.infer_mode, instances=args.instances, resume=args.resume, remote=remote_spec(args))
    rows = evaluate_precisions(args.yaml, args.images, args.precisions.split(","), args.limit, args.workspace,
                               options=options, overrides=overrides(args))
    print(format_table(rows))
    from ..eval.report import eval_paths, save_eval_table

    table, _ = eval_paths(args.yaml, args.workspace)
    save_eval_table(rows, table)
    print(f"wrote {table} (`tvmzoo report {args.yaml}` charts it with each build's speed)")
    return 0


def cmd_report(args) -> int:
    from ..eval.report import build_report, eval_paths, write_report

    from ..errors import ConfigError
    from ..io.outputs import check_output_dir

    if args.rounds < 1:   # was: no timing at all, "nan" ms / image in the report
        raise ConfigError(f"--rounds must be at least 1 (timing rounds per build), got {args.rounds}.")
    table, name = eval_paths(args.yaml, args.workspace)
    out = check_output_dir(Path(args.output) if args.output else table.parent / f"{name}-report", "--output")
    rows = build_report(Path(args.eval) if args.eval else table, name, args.rounds)
    md, png = write_report(rows, out, f"{name}: accuracy vs latency on {rows[0].target}")
    print(md.read_text())
    print(f"wrote {md} and {png}")
    return 0


def cmd_quickstart(args) -> int:
    from ..quickstart import run_quickstart

    run_quickstart(Path(args.workspace), print)
    return 0


def add_eval_topk_args(p) -> None:
    p.add_argument("result", help="result.txt")
    p.add_argument("--gt", help="ground-truth file '<file name> <class index>' for flat val folders")
    p.add_argument("--label_wnids", help="wnid list in class order (default: ImageNet-1k)")
    p.set_defaults(func=cmd_eval_topk)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy harness: compile precisions, classify a labelled folder, one table")
    p.add_argument("yaml")
    p.add_argument("--images", required=True, help="folder of wnid-named images or synset sub-folders")
    p.add_argument("--precisions", default="fp32,fp16", help="comma-separated: fp32,fp16,bf16,int8")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--workspace", default=None, help="where the evaluation builds go (default: the YAML's)")
    p.add_argument("--infer_mode", choices=("sync", "async"), default="async")
    add_set_arg(p)
    add_run_args(p)
    p.set_defaults(func=cmd_eval)


def add_report(sub) -> None:
    p = sub.add_parser("report", help="accuracy (tvmzoo eval) vs latency of every build of a model: chart + table")
    p.add_argument("yaml")
    p.add_argument("--eval", default=None, help="tvmzoo eval's table (default: <workspace>/<name>-eval.md)")
    p.add_argument("--workspace", default=None, help="where tvmzoo eval put its builds (default: the YAML's)")
    p.add_argument("--output", default=None, help="folder for report.md / report.png (default: <workspace>/<name>-report)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per build")
    p.set_defaults(func=cmd_report)
