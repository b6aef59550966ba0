"""`tvmzoo report`: accuracy (from `tvmzoo eval`) and speed of every build of a model, on one
accuracy-vs-latency chart (PNG) and one table: the picture to look at before choosing a precision.

`tvmzoo eval` writes its table to <workspace>/<name>-eval.md next to the builds it made
(<workspace>/<name>-eval-<precision>/); the report reads that table, times each build the way vamp does
(batch of the build, one instance on all cores, interleaved rounds) and writes report.md and report.png.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .accuracy import AccuracyRow, format_table
from ..io.atomic import atomic_path, write_text
from ..config import load_build_config
from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportRow:
    accuracy: AccuracyRow
    ms_per_image: float     # median over rounds of vamp's median latency / batch
    compute: str            # what the build computes in (fp16 on a CPU without AVX512-FP16: fp32)
    target: str


def eval_paths(yaml_path: str | Path, workspace: str | Path | None = None) -> tuple[Path, str]:
    """(<workspace>/<name>-eval.md, <name>): where `tvmzoo eval` puts its table and builds."""
    cfg = load_build_config(yaml_path)
    root = Path(workspace) if workspace is not None else Path(cfg.workspace)
    return root / f"{cfg.name}-eval.md", cfg.name


def save_eval_table(rows: Sequence[AccuracyRow], path: Path) -> None:
    write_text(path, format_table(rows) + "\n")


def read_eval_table(path: Path) -> list[AccuracyRow]:
    """The rows of a `tvmzoo eval` table (as it prints it)."""
    if not path.is_file():
        raise ConfigError(f"no accuracy table at {path}: run `tvmzoo eval <yaml> --images <folder>` first "
                          "(it writes it), or pass --eval <file> with its printed table.")
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or cells[0] in ("precision", "") or set(cells[0]) <= {"-"}:
            continue
        try:
            agree = None if cells[4] == "-" else float(cells[4])
            rows.append(AccuracyRow(cells[0], float(cells[2]), float(cells[3]), agree, float(cells[5]), int(cells[1])))
        except ValueError:
            raise ConfigError(f"{path}: cannot read the row '{line.strip()}': expected the table `tvmzoo eval` "
                              "prints (precision | images | top-1 % | top-5 % | agreement % | images/s).") from None
    if not rows:
        raise ConfigError(f"{path} holds no `tvmzoo eval` table rows.")
    return rows


def time_builds(directories: dict[str, Path], rounds: int = 3, iterations: int = 20) -> dict[str, float]:
    """ms / image of each build: vamp's median latency / batch, median over interleaved rounds."""
    from ..run.bench import BenchConfig, benchmark
    from ..run.runtime import CompiledModel

    times: dict[str, list[float]] = {name: [] for name in directories}
    for r in range(rounds):
        order = list(directories.items()) if r % 2 == 0 else list(directories.items())[::-1]
        for name, directory in order:
            meta = CompiledModel.load(directory).meta
            batch = max(1, int(meta["input"]["shape"][0]))
            report = benchmark(directory, BenchConfig(1, batch, iterations, 2, tuple(meta["input"]["shape"][1:])))
            times[name].append(report.latency_ms["p50"] / batch)
    return {name: float(np.median(v)) for name, v in times.items()}


def build_report(eval_table: Path, name: str, rounds: int = 3) -> list[ReportRow]:
    from ..run.runtime import read_meta

    rows = read_eval_table(eval_table)
    directories = {r.precision: eval_table.parent / f"{name}-eval-{r.precision}" for r in rows}
    missing = [str(d) for d in directories.values() if not (d / "mod.json").is_file()]
    if missing:
        raise ConfigError(f"the builds of {eval_table} are gone ({', '.join(missing)}): run `tvmzoo eval` again.")
    ms = time_builds(directories, rounds)
    metas = {p: read_meta(d) for p, d in directories.items()}
    return [ReportRow(r, ms[r.precision], metas[r.precision].get("compute", {}).get("precision", r.precision),
                      str(metas[r.precision]["target"].get("mcpu"))) for r in rows]


def report_table(rows: Sequence[ReportRow]) -> str:
    lines = ["| precision | computes in | target | images | top-1 % | top-5 % | top-1 agreement with fp32 % | "
             "ms / image | runner images/s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        a = row.accuracy
        agree = "-" if a.agreement is None else f"{a.agreement:.1f}"
        lines.append(f"| {a.precision} | {row.compute} | {row.target} | {a.images} | {a.top1:.2f} | {a.top5:.2f} | "
                     f"{agree} | {row.ms_per_image:.2f} | {a.images_per_second:.1f} |")
    return "\n".join(lines)


def report_chart(rows: Sequence[ReportRow], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("tvmzoo report draws its chart with matplotlib: pip install 'tvmzoo[report]'.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in enumerate(rows):
        ax.scatter(row.ms_per_image, row.accuracy.top1, s=60)
        label = row.accuracy.precision + (f" (computes in {row.compute})" if row.compute != row.accuracy.precision else "")
        label += f"\n{row.ms_per_image:.2f} ms, {row.accuracy.top1:.1f} %"
        ax.annotate(label, (row.ms_per_image, row.accuracy.top1), textcoords="offset points",
                    xytext=(6, 6 - 30 * (i % 2)), fontsize=8)  # alternate above / below: close points stay legible
    top1 = [row.accuracy.top1 for row in rows]
    ax.set_xlim(0, max(row.ms_per_image for row in rows) * 1.35)  # from 0: distances are speed ratios
    ax.set_ylim(min(top1) - 1.0, max(top1) + 1.0)
    ax.set_xlabel("ms / image (vamp, median; lower is better)")
    ax.set_ylabel("top-1 % (tvmzoo eval; higher is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_report(rows: Sequence[ReportRow], out_dir: Path, title: str) -> tuple[Path, Path]:
    md, png = out_dir / "report.md", out_dir / "report.png"
    report_chart(rows, png, title)
    write_text(md, f"# {title}\n\n{report_table(rows)}\n\n![accuracy vs latency]({png.name})\n")
    return md, png
