"""ModelInferRequest off the wire with its tensors left where they arrived: protobuf parses everything but
`raw_input_contents` (a few hundred bytes), whose payloads become views of the received message. Parsing the
whole message copies each tensor twice (into protobuf's arena, then into a bytes object when the field is
read): 2 x 602 KB per Lite0 request, ~0.1 ms of the server's CPU. Only the top level of the message is
walked here (protobuf's wire format: a varint key, then a varint, 8 or 4 bytes, or a varint length and that
many bytes); every other field is handed to protobuf as it came."""
from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_RAW_FIELD = service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
RAW_INPUT_CONTENTS_KEY = (_RAW_FIELD << 3) | _LENGTH   # the key protobuf writes before each raw_input_contents


@dataclass(frozen=True)
class SplitRequest:
    message: service_pb2.ModelInferRequest   # everything but raw_input_contents
    raw: list[memoryview]                    # raw_input_contents in order: views of the received bytes


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while shift < 64:
        if pos >= len(data):
            raise DecodeError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
    raise DecodeError("varint over 10 bytes")


def split_request(data: bytes) -> SplitRequest:
    """The gRPC deserializer of ModelInfer / ModelStreamInfer requests."""
    view = memoryview(data)
    rest: list[memoryview] = []
    raw: list[memoryview] = []
    pos = 0
    while pos < len(view):
        start = pos
        key, pos = _varint(view, pos)
        wire = key & 7
        if wire == _LENGTH:
            length, pos = _varint(view, pos)
            if pos + length > len(view):
                raise DecodeError("truncated length-delimited field")
            if key == RAW_INPUT_CONTENTS_KEY:
                raw.append(view[pos:pos + length])
                pos += length
                continue
            pos += length
        elif wire == _VARINT:
            pos = _varint(view, pos)[1]
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
            if pos > len(view):
                raise DecodeError("truncated fixed-size field")
        else:
            raise DecodeError(f"unsupported wire type {wire}")
        rest.append(view[start:pos])
    return SplitRequest(service_pb2.ModelInferRequest.FromString(b"".join(rest)), raw)
