"""`tvmzoo report`: the accuracy table `tvmzoo eval` writes, each build timed, one chart and one table."""
from __future__ import annotations

import pytest

from tvmzoo.errors import ConfigError
from tvmzoo.eval.report import read_eval_table

from conftest import SAMPLE_DIR, run_cli
from tiny import tiny_yaml

pytest.importorskip("matplotlib")


def test_eval_then_report(tmp_path, sample_images):
    yaml_path = tiny_yaml(tmp_path, "tinyrep")  # a narrow RepVGG, random weights
    out = run_cli("tvmzoo", "eval", yaml_path, "--images", SAMPLE_DIR, "--precisions", "fp32,fp16", "--limit", "6").stdout
    table = tmp_path / "ws" / "tinyrep-eval.md"
    assert str(table) in out
    evaluated = {r.precision: r for r in read_eval_table(table)}
    assert set(evaluated) == {"fp32", "fp16"} and evaluated["fp32"].images == 6

    proc = run_cli("tvmzoo", "report", yaml_path, "--rounds", "1")
    report_dir = tmp_path / "ws" / "tinyrep-report"
    png = (report_dir / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    rows = [line.split("|")[1:-1] for line in (report_dir / "report.md").read_text().splitlines()
            if line.startswith("| fp")]
    assert [r[0].strip() for r in rows] == ["fp32", "fp16"]
    for cells in rows:
        precision, top1, ms = cells[0].strip(), float(cells[4]), float(cells[7])
        assert top1 == pytest.approx(evaluated[precision].top1) and ms > 0
    assert "ms / image" in proc.stdout


def test_report_needs_an_eval_table(tmp_path):
    bad = tmp_path / "eval.md"
    bad.write_text("| precision | images | top-1 % | top-5 % | agree | images/s |\n|---|---|---|---|---|---|\n"
                   "| fp32 | many | 1 | 2 | - | 3 |\n")
    with pytest.raises(ConfigError, match="cannot read the row"):
        read_eval_table(bad)
    with pytest.raises(ConfigError, match="run `tvmzoo eval"):
        read_eval_table(tmp_path / "missing.md")
