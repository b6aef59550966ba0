"""Triton's system shared memory extension: regions a co-located client registers (a POSIX shared memory
object, /dev/shm/<key>, from an offset, byte_size bytes), and tensors read from / written to them instead of
the request / response body.

The server does not map the objects: it keeps each one's file descriptor and copies with pread / pwrite.
A mapped object that its client truncates after registering raises SIGBUS on the next access and kills the
process (Python cannot recover from it); pread of a truncated object only returns fewer bytes, and pwrite
cannot fault. Each access also checks the object's current size (fstat) so a truncated object is a clear
400, not a short read. One copy either way: the tensor is read straight into a new array that the batcher
then stages into the batch, as a socket's body is.

A region a request uses stays open until the request is answered (an unregister in between only takes the
name away, as Triton's deferred unregister does).

The native fronts (the gRPC front, the HTTP pump) read and write the regions of the requests they answer
themselves: every registration is mirrored to them (`mirror`), with the object's descriptor, which they duplicate
and use the same way (native/shm_regions.h)."""
from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .tensors import InferRequest, InputTensor, OutputTensor, ServeError, ShmRef, from_buffer, invalid, to_bytes

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
CUDA_UNSUPPORTED = ("CUDA shared memory is not supported: tvmzoo serve runs models on the CPU; register the "
                    "tensors as system shared memory (v2/systemsharedmemory, tritonclient.utils.shared_memory)")


def shm_ref(params: dict, where: str) -> ShmRef | None:
    """The tensor's shared memory parameters (None when it has none); a missing or mistyped one is an error."""
    if REGION not in params:
        for key in (BYTE_SIZE, OFFSET):
            if key in params:
                raise invalid(f"{where}: '{key}' can not be specified without '{REGION}'")
        return None
    region, size, offset = params[REGION], params.get(BYTE_SIZE), params.get(OFFSET, 0)
    if not isinstance(region, str) or not region:
        raise invalid(f"{where}: '{REGION}' must be a region name (string), got {region!r}")
    if type(size) is not int or size < 0:
        raise invalid(f"{where}: '{BYTE_SIZE}' must be given with '{REGION}', a non-negative integer; got {size!r}")
    if type(offset) is not int or offset < 0:
        raise invalid(f"{where}: '{OFFSET}' must be a non-negative integer, got {offset!r}")
    return ShmRef(region, size, offset)


def _object_path(key: str) -> str:
    """/dev/shm/<name> for a shm_open key ("/name" or "name"); anything that could leave /dev/shm is refused."""
    name = key.lstrip("/") if isinstance(key, str) else ""
    if not name or "/" in name or "\0" in name or name in (".", "..") or len(name) > 255:
        raise invalid(f"shared memory key {key!r} is not a POSIX shared memory name: one '/' and then a name "
                      "without '/', as shm_open and tritonclient.utils.shared_memory take it")
    return os.path.join(SHM_DIR, name)


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    users: int = 0          # requests holding it
    gone: bool = False      # unregistered: close once no request holds it

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def _check(self, ref: ShmRef, nbytes: int, what: str) -> int:
        """The object position of `ref`'s bytes, once the object still holds them (fstat: its size now)."""
        end = self.offset + ref.offset + nbytes
        size = os.fstat(self.fd).st_size
        if end > size:
            raise invalid(f"{what}: shared memory object '{self.key}' of region '{self.name}' now has {size} bytes, "
                          f"the tensor needs bytes up to {end} (was it truncated after registering?)")
        return self.offset + ref.offset

    def read(self, ref: ShmRef, what: str) -> np.ndarray:
        at = self._check(ref, ref.byte_size, what)
        data = np.empty(ref.byte_size, np.uint8)
        got = os.preadv(self.fd, [data], at) if ref.byte_size else 0
        if got != ref.byte_size:   # truncated between fstat and the read
            raise invalid(f"{what}: shared memory object '{self.key}' of region '{self.name}' ended after {got} of "
                          f"{ref.byte_size} bytes (was it truncated?)")
        return data

    def write(self, ref: ShmRef, data: bytes | memoryview, what: str) -> None:
        at = self._check(ref, len(data), what)
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], at + done)


class Mirror(Protocol):
    """What keeps a copy of the registrations (the native gRPC front, the HTTP pump)."""

    def add_region(self, name: str, fd: int, offset: int, byte_size: int) -> None: ...

    def remove_region(self, name: str) -> None: ...   # "": every region


class SharedMemoryRegions:
    """The registered system shared memory regions, by name (thread-safe). An input is read into memory of its
    own: `max_input_bytes` bounds it as --max-request-bytes bounds a body."""

    def __init__(self, max_input_bytes: int = 64 << 20, enabled: bool = True,
                 why: str = "started with --no-shared-memory") -> None:
        self.max_input_bytes = max_input_bytes
        self.enabled = enabled   # off: nothing can be registered, so no region is ever read
        self.why = why           # why it is on or off, and how to change it (ServeConfig.shared_memory_why)
        self._regions: dict[str, Region] = {}
        self._mirrors: list[Mirror] = []
        self._lock = threading.Lock()

    def mirror(self, to: Mirror) -> None:
        """From now on every registration is also made in `to` (those already made are, at once)."""
        with self._lock:
            self._mirrors.append(to)
            for r in self._regions.values():
                to.add_region(r.name, r.fd, r.offset, r.byte_size)

    def register(self, name: str, key, offset, byte_size) -> None:
        if not self.enabled:
            raise invalid(f"system shared memory is off on this server ({self.why}): send the tensors in the request")
        if not isinstance(name, str) or not name:
            raise invalid("a region name is necessary to register a system shared memory region")
        for label, value in (("offset", offset), ("byte_size", byte_size)):
            if type(value) is not int or value < 0:
                raise invalid(f"register '{name}': '{label}' must be a non-negative integer, got {value!r}")
        if byte_size == 0:
            raise invalid(f"register '{name}': 'byte_size' must be positive")
        path = _object_path(key)
        with self._lock:
            if name in self._regions:
                raise ServeError("ALREADY_EXISTS", f"shared memory region '{name}' is already registered "
                                 "(unregister it first)")
        fd = self._open(name, key, path, offset, byte_size)
        with self._lock:
            if name in self._regions:   # registered meanwhile by another request
                os.close(fd)
                raise ServeError("ALREADY_EXISTS", f"shared memory region '{name}' is already registered")
            self._regions[name] = Region(name, key, offset, byte_size, fd)
            for m in self._mirrors:
                m.add_region(name, fd, offset, byte_size)
        log.info("registered shared memory region '%s': %s, offset %d, %d bytes", name, path, offset, byte_size)

    @staticmethod
    def _open(name: str, key: str, path: str, offset: int, byte_size: int) -> int:
        try:   # O_NOFOLLOW as glibc's shm_open: a symlink in /dev/shm does not lead elsewhere
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise invalid(f"register '{name}': cannot open shared memory object '{key}' ({path}: {exc.strerror}); "
                          "create it first (shm_open, tritonclient.utils.shared_memory.create_shared_memory_region) "
                          "and let the server's user read and write it") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise invalid(f"register '{name}': {path} is not a shared memory object")
            if offset + byte_size > info.st_size:
                raise invalid(f"register '{name}': offset {offset} + byte_size {byte_size} is past the end of "
                              f"shared memory object '{key}' ({info.st_size} bytes)")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def status(self, name: str = "") -> list[dict]:
        with self._lock:
            if not name:
                return [r.status() for r in self._regions.values()]
            if name not in self._regions:
                raise ServeError("NOT_FOUND", f"Unable to find system shared memory region: '{name}'")
            return [self._regions[name].status()]

    def unregister(self, name: str = "") -> None:
        """One region, or every region when `name` is empty; an unknown name is no error (as Triton)."""
        with self._lock:
            names = [name] if name else list(self._regions)
            for n in names:
                region = self._regions.pop(n, None)
                if region is not None:
                    region.gone = True
                    self._close_if_unused(region)
            for m in self._mirrors:
                m.remove_region(name)

    close = unregister   # at shutdown: every region

    def acquire(self, ref: ShmRef, what: str, nbytes: int | None = None) -> Region:
        """The region of `ref`, held open until `release`; `ref` must lie inside it."""
        with self._lock:
            region = self._regions.get(ref.region)
            if region is None:
                raise ServeError("NOT_FOUND", f"{what}: Unable to find shared memory region: '{ref.region}' "
                                 "(register it first: v2/systemsharedmemory/region/<name>/register)")
            size = ref.byte_size if nbytes is None else nbytes
            if ref.offset >= region.byte_size or ref.offset + size > region.byte_size:
                raise invalid(f"{what}: shared_memory_offset {ref.offset} + {size} bytes is outside region "
                              f"'{ref.region}' ({region.byte_size} bytes)")
            region.users += 1
            return region

    def release(self, region: Region) -> None:
        with self._lock:
            region.users -= 1
            self._close_if_unused(region)

    @staticmethod
    def _close_if_unused(region: Region) -> None:
        if region.gone and region.users == 0 and region.fd >= 0:
            os.close(region.fd)
            region.fd = -1

    def read_input(self, tensor: InputTensor) -> InputTensor:
        """An input sent by shared memory, read from its region and checked as a binary body's would be."""
        what = f"input '{tensor.name}'"
        if tensor.shm.byte_size > self.max_input_bytes:
            raise ServeError("RESOURCE_EXHAUSTED", f"{what}: {tensor.shm.byte_size} bytes from shared memory is over "
                             f"the limit of {self.max_input_bytes} (--max-request-bytes)")
        region = self.acquire(tensor.shm, what)
        try:
            data = region.read(tensor.shm, what)
        finally:
            self.release(region)
        return from_buffer(tensor.name, tensor.datatype, tensor.shape, memoryview(data))


class Attached:
    """One request's shared memory: its inputs read at once, its output regions held until written."""

    def __init__(self, regions: SharedMemoryRegions, request: InferRequest) -> None:
        self.regions = regions
        self.held: dict[str, tuple[Region, ShmRef]] = {}   # output name -> its region
        try:
            for out in request.outputs or ():
                if out.shm is not None:
                    self.held[out.name] = (regions.acquire(out.shm, f"output '{out.name}'"), out.shm)
            request.inputs = [regions.read_input(t) if t.shm is not None else t for t in request.inputs]
        except BaseException:
            self.close()
            raise

    def write(self, outputs: list[OutputTensor]) -> None:
        """Outputs asked for in shared memory go there and leave the response body (their data is dropped)."""
        for out in outputs:
            if out.name not in self.held:
                continue
            region, ref = self.held[out.name]
            blob = memoryview(to_bytes(out.data))
            if len(blob) > ref.byte_size:
                raise invalid(f"shared memory size specified with the request for output '{out.name}' "
                              f"({ref.byte_size} bytes) should be at least {len(blob)} bytes to hold the results")
            region.write(ref, blob, f"output '{out.name}'")
            out.in_shared_memory = True

    def close(self) -> None:
        for region, _ in self.held.values():
            self.regions.release(region)
        self.held.clear()

    def __enter__(self) -> Attached:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
