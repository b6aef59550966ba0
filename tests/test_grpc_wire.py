"""grpc_wire.split_request: ModelInferRequest split into protobuf's parse of everything but the tensors and views
of the tensors, checked against protobuf's own parse of the same bytes (the server's gRPC infer methods read
requests this way; tests/test_serve.py drives them end to end with tritonclient.grpc)."""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from tvmzoo.run.serve.grpc_wire import split_request

SIZE = 224
N_PHOTOS = 2


def _check(message: service_pb2.ModelInferRequest) -> None:
    data = message.SerializeToString()
    split = split_request(data)
    assert [bytes(r) for r in split.raw] == list(message.raw_input_contents)
    expected = service_pb2.ModelInferRequest.FromString(data)
    expected.ClearField("raw_input_contents")
    assert split.message == expected


def test_photo_tensors_come_back_as_views_of_the_message(photos):
    message = service_pb2.ModelInferRequest(model_name="lite0", model_version="1", id="req-7")
    for i, x in enumerate(photos):
        message.inputs.add(name=f"input{i}", datatype="FP32", shape=[1, *x.shape])
        message.raw_input_contents.append(x.tobytes())
    out = message.outputs.add(name="output")
    out.parameters["classification"].int64_param = 5
    message.parameters["priority"].uint64_param = 3
    data = message.SerializeToString()
    split = split_request(data)
    for view, x in zip(split.raw, photos):
        assert view.obj is data   # not copied
        np.testing.assert_array_equal(np.frombuffer(view, np.float32).reshape(x.shape), x)
    _check(message)


def test_shared_memory_parameters_and_no_raw_contents():
    message = service_pb2.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="input", datatype="FP32", shape=[1, 3, 224, 224])
    tensor.parameters["shared_memory_region"].string_param = "in0"
    tensor.parameters["shared_memory_byte_size"].int64_param = 602112
    tensor.parameters["shared_memory_offset"].int64_param = 64
    _check(message)
    assert split_request(message.SerializeToString()).raw == []


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=40), request_id=st.text(max_size=40),
       blobs=st.lists(st.binary(max_size=300), max_size=4),
       params=st.dictionaries(st.text(min_size=1, max_size=8), st.integers(-2**63, 2**63 - 1), max_size=3),
       shape=st.lists(st.integers(-2**63, 2**63 - 1), max_size=4))
def test_any_request_splits_as_protobuf_parses_it(name, request_id, blobs, params, shape):
    message = service_pb2.ModelInferRequest(model_name=name, id=request_id)
    message.inputs.add(name="input", datatype="FP32", shape=shape)
    message.raw_input_contents.extend(blobs)
    for key, value in params.items():
        message.parameters[key].int64_param = value
    _check(message)


def test_a_field_the_proto_does_not_have_is_kept_for_protobuf():
    unknown = bytes([(15 << 3) | 0, 0x96, 0x01])   # field 15, varint 150
    data = service_pb2.ModelInferRequest(model_name="m").SerializeToString() + unknown
    split = split_request(data)
    assert split.message.model_name == "m"
    assert split.message.SerializeToString().endswith(unknown)


@pytest.mark.parametrize("data", [
    bytes([(7 << 3) | 2, 10, 1, 2]),           # a raw content's length past the end
    bytes([(1 << 3) | 2, 0x80]),               # a truncated length varint
    bytes([(1 << 3) | 0]) + b"\xff" * 11,      # a varint over 10 bytes
    bytes([(2 << 3) | 1, 1, 2, 3]),            # a truncated fixed64
    bytes([(2 << 3) | 3]),                     # a group (wire type 3)
])
def test_malformed_bytes_raise_protobufs_error(data):
    with pytest.raises(DecodeError):
        split_request(data)
    with pytest.raises(DecodeError):
        service_pb2.ModelInferRequest.FromString(data)   # the error grpc reports for a whole parse, too
