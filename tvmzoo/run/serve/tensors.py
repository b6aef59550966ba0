"""Tensors of the Open Inference Protocol <-> numpy: datatypes, Triton's BYTES encoding (4-byte
little-endian length before each element), and the errors a request can get, with their status."""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ShmRef:
    """A tensor's place in a registered region: the shared_memory_* parameters of an input or output."""
    region: str
    byte_size: int
    offset: int = 0


DATATYPES: dict[str, np.dtype] = {name: np.dtype(kind) for name, kind in {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.items()}
BYTES = "BYTES"

# status -> HTTP code; gRPC uses the status name itself (grpc.StatusCode[status])
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "ALREADY_EXISTS": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 413,
               "UNAUTHENTICATED": 401, "UNAVAILABLE": 503, "INTERNAL": 500}


class ServeError(Exception):
    """A request the server refuses or cannot answer; `status` is a key of HTTP_STATUS."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def http_code(self) -> int:
        return HTTP_STATUS[self.status]


def invalid(message: str) -> ServeError:
    return ServeError("INVALID_ARGUMENT", message)


def check_finite(name: str, rows: np.ndarray) -> None:
    """NaN / Inf inputs give plausible-looking scores: refuse them."""
    if rows.dtype.kind == "f" and not np.isfinite(rows).all():
        bad = np.flatnonzero(~np.isfinite(rows))
        raise invalid(f"input '{name}' holds {bad.size} NaN or infinite values (the first at flat index {bad[0]}): "
                      "the model's scores for it would mean nothing; send finite numbers")


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | None    # numeric, shaped; or a flat object array of bytes for BYTES; None: in `shm`
    shm: ShmRef | None = None  # sent by shared memory: read from the region before inference


@dataclass
class RequestedOutput:
    name: str
    classification: int = 0    # Triton's classification extension: top-k as "score:index:label"
    binary: bool = False       # HTTP binary tensor extension
    shm: ShmRef | None = None  # shared memory extension: written to the region, not the response body


@dataclass
class InferRequest:
    model: str
    version: str
    id: str
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None   # None: every output
    binary_output: bool = False                    # HTTP: outputs not named get binary data

    @property
    def shared_memory(self) -> bool:
        return any(t.shm for t in self.inputs) or any(o.shm for o in self.outputs or ())


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    binary: bool = False
    parameters: dict = field(default_factory=dict)
    in_shared_memory: bool = False   # written to its region: no data in the response


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == np.object_:
        return BYTES
    return next(name for name, kind in DATATYPES.items() if kind == array.dtype)


def check_shape(name: str, shape: Sequence) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
        raise invalid(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def check_datatype(name: str, datatype: str) -> str:
    if not isinstance(datatype, str) or datatype != BYTES and datatype not in DATATYPES:   # a list: was a 500
        raise invalid(f"input '{name}': unknown datatype {datatype!r}; the protocol's are "
                      f"{', '.join([*DATATYPES, BYTES])}")
    return datatype


def _count_error(name: str, got: int, shape: tuple[int, ...], what: str) -> ServeError:
    return invalid(f"input '{name}': {got} {what} do not fill shape {list(shape)} "
                   f"({math.prod(shape)} elements)")


def from_buffer(name: str, datatype: str, shape: tuple[int, ...], buf: bytes | memoryview) -> InputTensor:
    """A tensor sent as raw bytes (HTTP binary extension, gRPC raw_input_contents)."""
    if datatype == BYTES:
        data = deserialize_bytes(name, buf)
        if data.size != math.prod(shape):
            raise _count_error(name, data.size, shape, "BYTES elements")
        return InputTensor(name, datatype, shape, data)
    dtype = DATATYPES[datatype]
    if len(buf) != math.prod(shape) * dtype.itemsize:
        raise invalid(f"input '{name}': {len(buf)} bytes of data, but {datatype} {list(shape)} needs "
                      f"{math.prod(shape) * dtype.itemsize}")
    return InputTensor(name, datatype, shape, np.frombuffer(buf, dtype).reshape(shape))


def from_list(name: str, datatype: str, shape: tuple[int, ...], data) -> InputTensor:
    """A tensor sent as a JSON list (nested or flat, row-major); BYTES elements are strings."""
    if datatype == BYTES:
        flat = np.asarray(data, dtype=object).ravel()
        if not all(isinstance(x, (str, bytes)) for x in flat):
            raise invalid(f"input '{name}': BYTES data must be strings")
        array = object_array([x.encode() if isinstance(x, str) else x for x in flat])
    else:
        array = _numbers(name, datatype, data)
    if array.size != math.prod(shape):
        raise _count_error(name, array.size, shape, "elements")
    return InputTensor(name, datatype, shape, array if datatype == BYTES else array.reshape(shape))


def _numbers(name: str, datatype: str, data) -> np.ndarray:
    """JSON numbers as a flat array of `datatype`, refusing what the conversion would change: strings,
    booleans for a number type, fractions for an integer type, values outside the type's range."""
    dtype = DATATYPES[datatype]
    try:
        given = np.asarray(data).ravel()
    except (TypeError, ValueError, OverflowError) as exc:   # ragged lists, integers beyond 64 bits
        raise invalid(f"input '{name}': data is not a list of {datatype} numbers ({exc})") from None
    kinds = {"b": "b", "u": "biu", "i": "biu", "f": "iuf"}[dtype.kind] if given.size else given.dtype.kind
    if given.dtype.kind not in kinds:
        raise invalid(f"input '{name}': data is not a list of {datatype} numbers (it holds {given.dtype.name} "
                      f"values such as {str(given[0])[:30]})")
    if dtype.kind in "iu" and given.size and given.dtype.kind != "b":
        info = np.iinfo(dtype)
        low, high = given.min(), given.max()
        if low < info.min or high > info.max:
            raise invalid(f"input '{name}': {datatype} values must be {info.min}..{info.max}, got "
                          f"{low if low < info.min else high}")
    return given.astype(dtype, copy=False)


def deserialize_bytes(name: str, buf: bytes | memoryview) -> np.ndarray:
    """Triton's BYTES encoding -> a flat object array of bytes; malformed data is a client error."""
    items, offset, view = [], 0, memoryview(buf)
    while offset < len(view):
        if offset + 4 > len(view):
            raise invalid(f"input '{name}': malformed BYTES data (a length prefix is cut at byte {offset})")
        (size,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + size > len(view):
            raise invalid(f"input '{name}': malformed BYTES data (element of {size} bytes runs past the end)")
        items.append(bytes(view[offset:offset + size]))
        offset += size
    return object_array(items)


def object_array(items: list) -> np.ndarray:
    """A flat object array (np.array would turn equal-length bytes into a fixed-width dtype)."""
    array = np.empty(len(items), object)
    array[:] = items
    return array


def serialize_bytes(array: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in array.ravel())


def to_bytes(array: np.ndarray) -> bytes:
    """Raw bytes of an output, as the binary extension and gRPC raw_output_contents carry them."""
    return serialize_bytes(array) if array.dtype == np.object_ else np.ascontiguousarray(array).tobytes()


def to_json_data(array: np.ndarray) -> list:
    if array.dtype == np.object_:
        return [x.decode("utf-8", "replace") for x in array.ravel()]
    return array.ravel().tolist()
