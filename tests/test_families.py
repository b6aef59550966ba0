"""The ModelFamily contract, checked the same way for every registered family (random weights in
each family's checkpoint layouts): prefixes and framework keys accepted, the first wrong key named,
the class count and batch taken from the checkpoint, the deploy parameter count equal to the graph's."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from tvmzoo.errors import CheckpointError, ConfigError
from tvmzoo.models import FAMILIES, get_family
from tvmzoo.models.info import model_info

CASES = [(name, source) for name in FAMILIES for source in get_family(name).sources]
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
                                         input_size=(SIZE, SIZE), batch=2)
    onnx.checker.check_model(model)
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [2, 10]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_deploy_param_count_is_the_graph(name):
    family = get_family(name)
    source = family.reference_source
    model = family.deploy_onnx(_state(name, source), SMALL[name], source, input_size=(SIZE, SIZE), batch=1)
    assert family.param_count(SMALL[name], source, 1000, True) == model_info(model).params_deploy
    assert family.param_count(SMALL[name], source, 1000, False) > model_info(model).params_deploy  # BN scales


@pytest.mark.parametrize("name", list(FAMILIES))
def test_unknown_layout_is_a_config_error(name):
    with pytest.raises(ConfigError, match="timm"):
        get_family(name).expected_shapes(SMALL[name], "timm", 1000)
