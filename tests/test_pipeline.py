"""The compile pipeline by name: its phases, one pass per rewrite, the kernel count, bad precision."""
from __future__ import annotations

import pytest
import tvm

from tvmzoo.config import PRECISIONS
from tvmzoo.compile.pipeline import get_pipeline, pass_names, phases
from tvmzoo.errors import ConfigError


@pytest.mark.parametrize("precision, first", [("fp32", ["Canonicalize"]),
                                              ("fp16", ["Canonicalize", "ToMixedPrecision"]),
                                              ("int8", ["LowerInt8", "Canonicalize"])])
def test_phases_by_name(precision, first):
    names = pass_names(precision)
    assert list(names) == ["import", "layout", "legalize", "schedule", "prepack"]
    assert names["import"] == first
    assert "Winograd" in names["layout"] and "SplitBatchPrefix" in names["layout"]
    # after the batch split: an op before the cut would move it (tvmzoo.compile.passes.batch_split)
    assert names["layout"].index("PadConvLanes") > names["layout"].index("SplitBatchPrefix")
    assert names["legalize"][-1] == "AttachAttrLayoutFreeBuffers"
    assert all(isinstance(p, tvm.transform.Pass) for passes in phases(precision).values() for p in passes)


def test_canonicalize_runs_once():
    names = [n for passes in pass_names("int8").values() for n in passes]
    assert names.count("Canonicalize") == 1


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(ConfigError, match="precision 'bf32' is not one of " + ", ".join(PRECISIONS)):
        get_pipeline(tvm.target.Target({"kind": "llvm"}), "bf32")
