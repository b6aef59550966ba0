"""The protocol's HTTP/REST infer body <-> InferRequest / outputs: JSON tensors and Triton's binary
tensor extension (a JSON header of Inference-Header-Content-Length bytes, then each binary tensor's
bytes in order, sized by its binary_data_size parameter)."""
from __future__ import annotations

import json

from .shared_memory import shm_ref
from .tensors import (InferRequest, InputTensor, OutputTensor, RequestedOutput, check_datatype, check_shape,
                      from_buffer, from_list, invalid, to_bytes, to_json_data)

HEADER_LENGTH = "Inference-Header-Content-Length"


def _header(body: bytes | memoryview, header_length: int | None) -> dict:
    if header_length is not None and not 0 < header_length <= len(body):
        raise invalid(f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes")
    try:
        doc = json.loads(bytes(body[:header_length]) if header_length is not None else bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"malformed JSON in the inference request: {exc}") from None
    except RecursionError:
        raise invalid("malformed JSON in the inference request: it nests too deep (an infer request nests "
                      "4 levels, plus the data's dimensions)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise invalid('the inference request must be a JSON object with a non-empty "inputs" list')
    return doc


def _parameters(item: dict, where: str) -> dict:
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise invalid(f"{where}: parameters must be a JSON object")
    return params


def _flag(params: dict, key: str, where: str) -> bool:
    """A boolean parameter: JSON true / false only (the string "false" was taken as true)."""
    value = params.get(key, False)
    if type(value) is not bool:
        raise invalid(f"{where}: parameter {key} must be true or false, got {value!r}")
    return value


def _input(item, body: memoryview, offset: int) -> tuple[InputTensor, int]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise invalid('each input must be a JSON object with a "name"')
    name = item["name"]
    datatype = check_datatype(name, item.get("datatype"))
    shape = check_shape(name, item.get("shape"))
    params = _parameters(item, f"input '{name}'")
    if "shared_memory_region" in params:
        return _shm_input(item, name, datatype, shape, params), offset
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in item:
            raise invalid(f"input '{name}' has neither data nor a binary_data_size parameter")
        return from_list(name, datatype, shape, item["data"]), offset
    if type(size) is not int or size < 0 or offset + size > len(body):
        raise invalid(f"input '{name}': binary_data_size {size!r} runs past the {len(body)}-byte body")
    return from_buffer(name, datatype, shape, body[offset:offset + size]), offset + size


def _shm_input(item: dict, name: str, datatype: str, shape: tuple[int, ...], params: dict) -> InputTensor:
    """An input in a shared memory region (read before inference): no data, no binary_data_size."""
    if "data" in item or "binary_data_size" in params:
        raise invalid(f"input '{name}' must set only one of 'data', 'binary_data_size' and 'shared_memory_region'")
    return InputTensor(name, datatype, shape, None, shm_ref(params, f"input '{name}'"))


def _output(item) -> RequestedOutput:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise invalid('each requested output must be a JSON object with a "name"')
    params = _parameters(item, f"output '{item['name']}'")
    k = params.get("classification", 0)
    if type(k) is not int:
        raise invalid(f"output '{item['name']}': classification must be an integer, got {k!r}")
    shm = shm_ref(params, f"output '{item['name']}'")
    binary = _flag(params, "binary_data", f"output '{item['name']}'")
    if shm is not None and (k or binary):
        raise invalid(f"output '{item['name']}' can't set both 'shared_memory_region' and "
                      f"'{'classification' if k else 'binary_data'}'")
    return RequestedOutput(item["name"], k, binary, shm)


def parse_infer(body: bytes | memoryview, header_length: int | None, model: str, version: str) -> InferRequest:
    doc = _header(body, header_length)
    view = memoryview(body)
    offset = len(body) if header_length is None else header_length
    inputs = []
    for item in doc["inputs"]:
        tensor, offset = _input(item, view, offset)
        inputs.append(tensor)
    if offset != len(body):
        raise invalid(f"{len(body) - offset} bytes after the last binary input are not claimed by any "
                      "binary_data_size")
    outputs = doc.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise invalid('"outputs" must be a list')
    binary = _flag(_parameters(doc, "request"), "binary_data_output", "request")
    if not isinstance(doc.get("id", ""), str):   # echoed back as given: the protocol's id is a string
        raise invalid(f'"id" must be a string, got {doc["id"]!r}'[:200])
    return InferRequest(model, version, doc.get("id", ""), inputs,
                        None if outputs is None else [_output(o) for o in outputs], binary)


def encode_response(request: InferRequest, outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    items, blobs = [], []
    for out in outputs:
        item = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if out.in_shared_memory:   # as Triton: name, datatype and shape only
            pass
        elif out.binary:
            blob = to_bytes(out.data)
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = to_json_data(out.data)
        items.append(item)
    doc = {"model_name": request.model, "model_version": "1", "outputs": items}
    if request.id:
        doc["id"] = request.id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
