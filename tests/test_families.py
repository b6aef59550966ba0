"""The ModelFamily contract, checked the same way for every registered family (random weights in
each family's checkpoint layouts): prefixes and framework keys accepted, the first wrong key named,
the class count and batch taken from the checkpoint, the deploy parameter count equal to the graph's;
and every weights entry (family:arch:source[.tag]): found by its key, an arch and layout of its family
whose checkpoint has its class count, a graph at its input size, the packaged file fitting its arch."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from tvmzoo.errors import CheckpointError, ConfigError
from tvmzoo.models import FAMILIES, all_weights, get_family, get_weights, weights_for
from tvmzoo.models.info import model_info

CASES = [(name, source) for name in FAMILIES for source in get_family(name).sources]
ENTRIES = [w.key for w in all_weights()]
SMALL = {"repvgg": "A0", "regnet": "200MF", "efficientnet_lite": "lite0"}
SIZE = 64


def _state(name: str, source: str, num_classes: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    return get_family(name).random_state_dict(SMALL[name], source, np.random.default_rng(seed), num_classes)


def test_every_family_is_registered_with_its_own_name():
    for name in FAMILIES:
        family = get_family(name)
        assert family.name == name and family.archs and family.reference_source in family.sources


@pytest.mark.parametrize("name, source", CASES)
def test_prefixes_and_framework_keys_are_accepted(name, source):
    family = get_family(name)
    state = _state(name, source, num_classes=7)
    prefixed = {f"module.{k}": v for k, v in state.items()} | {"StructuredToParameterName@@": np.zeros(1)}
    checked, n = family.check_state(prefixed, SMALL[name], source)
    assert n == 7 and set(checked) == set(family.expected_shapes(SMALL[name], source, 7))


@pytest.mark.parametrize("name, source", CASES)
def test_the_first_wrong_key_is_named(name, source):
    family, arch = get_family(name), SMALL[name]
    state = _state(name, source)
    key, shape = next((k, s) for k, s in family.expected_shapes(arch, source, 1000).items() if len(s) == 4)
    missing = {k: v for k, v in state.items() if k != key}
    expected = ", ".join(map(str, shape))
    with pytest.raises(CheckpointError, match=rf"missing key '{key}' \(expected shape \[{expected}\]\)"):
        family.check_state(missing, arch, source)
    misshaped = dict(state, **{key: np.zeros((1, *shape[1:]), np.float32)})
    with pytest.raises(CheckpointError, match=rf"key '{key}' has shape \[1, "):
        family.deploy_onnx(misshaped, arch, source)
    extra = dict(state, **{"extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected key 'extra.weight'"):
        family.check_state(extra, arch, source)


@pytest.mark.parametrize("name, source", CASES)
def test_class_count_and_batch_come_from_the_checkpoint(name, source):
    model = get_family(name).deploy_onnx(_state(name, source, num_classes=10), SMALL[name], source,
                                         size_hw=(SIZE, SIZE), batch=2)
    onnx.checker.check_model(model)
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [2, 10]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_deploy_param_count_is_the_graph(name):
    family = get_family(name)
    source = family.reference_source
    model = family.deploy_onnx(_state(name, source), SMALL[name], source, size_hw=(SIZE, SIZE), batch=1)
    assert family.param_count(SMALL[name], source, 1000, True) == model_info(model).params_deploy
    assert family.param_count(SMALL[name], source, 1000, False) > model_info(model).params_deploy  # BN scales


@pytest.mark.parametrize("name", list(FAMILIES))
def test_unknown_layout_is_a_config_error(name):
    with pytest.raises(ConfigError, match="timm"):
        get_family(name).expected_shapes(SMALL[name], "timm", 1000)


# ---------------------------------------------------------------- weights entries

def test_every_family_has_entries_with_unique_keys():
    assert ENTRIES and len(ENTRIES) == len(set(ENTRIES))
    assert {w.family for w in all_weights()} == set(FAMILIES)


@pytest.mark.parametrize("key", ENTRIES)
def test_weights_entry_is_found_by_its_key_and_fits_its_family(key):
    entry = get_weights(key)
    family = get_family(entry.family)
    assert entry.key == key and entry.arch in family.archs and entry.source in family.sources
    assert get_weights(key.upper()) is entry   # names as users write them
    head = [shape for shape in family.expected_shapes(entry.arch, entry.source, entry.num_classes).values()
            if entry.num_classes in shape]
    assert head, f"{key}: no classifier of {entry.num_classes} classes"
    assert entry.top1 is None or 50 < entry.top1 < 100


@pytest.mark.parametrize("name", list(FAMILIES))
def test_entry_graph_takes_its_input_size(name):
    entry = next(w for w in get_family(name).weights if w.arch == SMALL[name])
    family = get_family(name)
    state = family.random_state_dict(entry.arch, entry.source, np.random.default_rng(0), entry.num_classes)
    model = family.deploy_onnx(state, entry.arch, entry.source, size_hw=entry.size_hw, batch=1)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, *entry.size_hw]
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, entry.num_classes]


def test_torchvision_regnet_v1_and_v2_are_two_entries():
    for arch in ("400MF_tv", "800MF", "32GF"):
        v1, v2 = weights_for("regnet", arch, "torchvision.v1"), weights_for("regnet", arch, "torchvision.v2")
        assert v1 is not v2 and weights_for("regnet", arch, "torchvision") is v1     # no tag: the first release
        assert (v1.preprocessing.resize_hw, v2.preprocessing.resize_hw) == ((256, 256), (232, 232))
        assert v1.preprocessing.crop_hw == v2.preprocessing.crop_hw == (224, 224)
        assert v2.top1 > v1.top1 and v1.url != v2.url
    with pytest.raises(ConfigError, match=r"no published weights regnet:800MF:torchvision.v3\. Known: "
                                          r"regnet:800MF:pycls, .*regnet:800MF:torchvision.v2"):
        weights_for("regnet", "800MF", "torchvision.v3")


def test_the_checkpoint_source_is_not_in_the_arch():
    """torchvision's RegNetX-400MF is its own arch (as timm's regnetx_004_tv): its widths differ."""
    family = get_family("regnet")
    assert {w.arch for w in family.weights if w.source == "torchvision"} >= {"400MF_tv"}
    tv = family.expected_shapes("400MF_tv", "torchvision", 1000)
    pycls_widths = family.expected_shapes("400MF", "torchvision", 1000)
    assert tv["fc.weight"] == (1000, 400) and pycls_widths["fc.weight"] == (1000, 384)


def test_packaged_weights_fit_their_entry():
    from tvmzoo.io.checkpoint import load_state_dict

    packaged = [w for w in all_weights() if w.packaged is not None]
    assert [w.key for w in packaged] == ["efficientnet_lite:lite0:lite_pytorch"]
    for entry in packaged:
        state, n = get_family(entry.family).check_state(load_state_dict(entry.packaged()), entry.arch, entry.source)
        assert n == entry.num_classes
