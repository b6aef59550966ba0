"""One inference request, whatever front end it came by: check it against the model, turn image bytes
into the module's input with the build's own preprocessing, queue it for the batcher, build the
outputs (and Triton's classification extension), and count it in the metrics."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor

import numpy as np

from ...errors import ImageError
from ...preprocess import Preprocessing, decode_image
from ...preprocess.transform import resized_size
from ..runner import model_input

from .batcher import Closed
from .metrics import VERSION, Metrics
from .repository import ModelEntry, Repository
from .shared_memory import Attached, SharedMemoryRegions
from .tensors import BYTES, InferRequest, InputTensor, OutputTensor, ServeError, invalid, object_array

log = logging.getLogger(__name__)

_REASONS = {"UNAVAILABLE": "REJECTED", "INTERNAL": "BACKEND"}   # Triton's failure reasons; bad input: OTHER
MAX_ROWS = 256   # images per request: bounds the memory one request can take


def _describe(entry: ModelEntry) -> str:
    shape = [-1, *entry.row_shape]
    return f"'{entry.input_name}' ({entry.input_datatype} {shape}, or BYTES [-1] encoded JPEG/PNG images)"


def _single_input(entry: ModelEntry, request: InferRequest) -> InputTensor:
    if len(request.inputs) != 1:
        raise invalid(f"model '{entry.name}' takes one input, {_describe(entry)}; got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != entry.input_name:
        raise invalid(f"unknown input '{tensor.name}' for model '{entry.name}': it takes {_describe(entry)}")
    return tensor


def check_tensor(entry: ModelEntry, tensor: InputTensor) -> np.ndarray:
    """A numeric input as the module's rows; wrong datatype or shape is the client's error."""
    if tensor.datatype != entry.input_datatype:
        raise invalid(f"input '{tensor.name}' is {tensor.datatype}; model '{entry.name}' takes {_describe(entry)}")
    if len(tensor.shape) != 1 + len(entry.row_shape) or tensor.shape[1:] != entry.row_shape \
            or not 1 <= tensor.shape[0] <= MAX_ROWS:
        raise invalid(f"input '{tensor.name}' has shape {list(tensor.shape)}; model '{entry.name}' takes "
                      f"[n, {', '.join(map(str, entry.row_shape))}] with 1 <= n <= {MAX_ROWS}")
    return tensor.data   # NaN / Inf: checked by the batcher, on the rows as staged (DynamicBatcher check_rows)


def decode_images(entry: ModelEntry, tensor: InputTensor, max_pixels: int) -> np.ndarray:
    """BYTES holding encoded images -> the module's rows, through the preprocessing the build records
    (host side of a fused build: decode and resize only, the rest runs inside the module). An image whose
    header claims more than `max_pixels` is refused before it is decoded."""
    if tensor.shape not in ((len(tensor.data),), (len(tensor.data), 1)) or not 1 <= len(tensor.data) <= MAX_ROWS:
        raise invalid(f"input '{tensor.name}': BYTES images have shape [n] or [n, 1] with 1 <= n <= {MAX_ROWS}, "
                      f"got {list(tensor.shape)}")
    pre = entry.instances[0].preprocessing
    if pre is None:
        raise invalid(f"model '{entry.name}' records no preprocessing (mod.json): send {entry.input_datatype} "
                      "tensors instead of image bytes")
    rows = []
    for i, item in enumerate(tensor.data):
        where = f"input '{tensor.name}' element {i}"
        try:
            image = decode_image(item, where, max_pixels)
            _check_resized(pre, image, where, max_pixels)
            rows.append(model_input(pre, image, entry.fused))
        except ImageError as exc:
            raise invalid(_for_clients(str(exc), max_pixels)) from None
    return np.stack(rows)


def _check_resized(pre: Preprocessing, image: np.ndarray, where: str, max_pixels: int) -> None:
    """A keep-aspect resize enlarges a thin strip: a 321-byte 1 x 62500 PNG would become 40 x 2.5 M (300 MB)."""
    width, height = resized_size(pre, image.shape[1], image.shape[0])
    if width * height > max_pixels:
        raise ImageError(f"cannot decode {where}: a {image.shape[1]}x{image.shape[0]} image resized to keep its "
                         f"aspect ratio would be {width}x{height}, above the limit of {max_pixels} pixels; "
                         "downscale the image first.")


def _for_clients(message: str, max_pixels: int) -> str:
    """The readers' advice is a file user's; a client is told what the server allows and which flag raises it."""
    message = message.replace("; re-copy or remove it.", ".")
    return message.replace("; downscale the image first.", f" (tvmzoo serve --max-image-pixels): downscale the image "
                                                          "before sending it, or start the server with a higher limit.")


def classification(values: np.ndarray, k: int, labels: tuple[str, ...] | None) -> np.ndarray:
    """Triton's classification extension: per row the top-k as "score:index[:label]", best first;
    the score is the output value itself (a probability when the build ends in softmax)."""
    k = min(k, values.shape[-1])
    top = np.argsort(-values, axis=-1, kind="stable")[:, :k]
    items = [f"{values[r, i]:f}:{i}" + (f":{labels[i]}" if labels and i < len(labels) else "")
             for r in range(len(values)) for i in top[r]]
    return object_array([s.encode() for s in items]).reshape(len(values), k)


def build_outputs(entry: ModelEntry, request: InferRequest, result: np.ndarray) -> list[OutputTensor]:
    wanted = request.outputs
    if wanted is None:
        return [OutputTensor(entry.output_name, "FP32", result.shape, result, request.binary_output)]
    outputs = []
    for out in wanted:
        if out.classification:
            data = classification(result, out.classification, entry.labels)
            outputs.append(OutputTensor(out.name, BYTES, data.shape, data, out.binary))
        else:
            outputs.append(OutputTensor(out.name, "FP32", result.shape, result, out.binary))
    return outputs


def _check_outputs(entry: ModelEntry, request: InferRequest) -> None:
    names = [out.name for out in request.outputs or ()]
    if len(set(names)) != len(names):
        raise invalid(f"an output is requested twice: {names}")
    for out in request.outputs or ():
        if out.name != entry.output_name:
            raise invalid(f"unknown output '{out.name}' for model '{entry.name}': it has '{entry.output_name}'")
        if out.classification < 0:
            raise invalid(f"output '{out.name}': classification count must be positive, got {out.classification}")


class Inference:
    """The request path shared by the HTTP and gRPC front ends."""

    def __init__(self, repository: Repository, metrics: Metrics, decode_pool: Executor,
                 max_image_pixels: int, shared_memory: SharedMemoryRegions | None = None) -> None:
        self.repository = repository
        self.max_image_pixels = max_image_pixels
        self.metrics = metrics
        self.decode_pool = decode_pool
        self.shared_memory = shared_memory or SharedMemoryRegions()
        self.in_flight = 0     # accepted requests not answered yet (the SIGTERM drain waits for 0)

    async def infer(self, request: InferRequest) -> list[OutputTensor]:
        start = time.perf_counter()
        entry = self.repository.get_ready(request.model, request.version)
        series = self.metrics.series(entry.name)
        series.pending.inc()
        self.in_flight += 1
        try:
            run = self._infer_shared_memory if request.shared_memory else self._infer
            outputs = await run(entry, request)
        except ServeError as exc:
            self.metrics.failure.labels(entry.name, VERSION, _REASONS.get(exc.status, "OTHER")).inc()
            raise
        except Exception as exc:  # noqa: BLE001 - a failed run: the client gets 500, the server goes on
            log.exception("model %s: inference failed", entry.name)
            self.metrics.failure.labels(entry.name, VERSION, "BACKEND").inc()
            raise ServeError("INTERNAL", f"model '{entry.name}' failed on this request: {exc}") from None
        finally:
            series.pending.dec()
            self.in_flight -= 1
        series.success.inc()
        self.metrics.last_inference[entry.name] = time.time()
        series.request_us.inc((time.perf_counter() - start) * 1e6)
        return outputs

    async def _infer_shared_memory(self, entry: ModelEntry, request: InferRequest) -> list[OutputTensor]:
        """Triton's shared memory extension: inputs read from their regions, outputs written to theirs."""
        with Attached(self.shared_memory, request) as attached:
            outputs = await self._infer(entry, request)
            attached.write(outputs)
        return outputs

    async def _infer(self, entry: ModelEntry, request: InferRequest) -> list[OutputTensor]:
        tensor = _single_input(entry, request)
        _check_outputs(entry, request)
        if tensor.datatype == BYTES:
            loop = asyncio.get_running_loop()
            rows = await loop.run_in_executor(self.decode_pool, decode_images, entry, tensor,
                                              self.max_image_pixels)
        else:
            rows = check_tensor(entry, tensor)
        try:
            result = await entry.batcher.infer(rows)
        except Closed as exc:  # the server is draining
            raise ServeError("UNAVAILABLE", str(exc)) from None
        return build_outputs(entry, request, result)
