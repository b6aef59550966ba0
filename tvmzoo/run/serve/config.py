"""What `tvmzoo serve` is told: the model repository, addresses, batching and limits."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ...errors import ConfigError
from ...io.images import load_labels
from ...limits import check_not_special
from ...preprocess import MAX_PIXELS
from ..threads import check_per_core, tvm_num_threads, usable_cores

DEFAULT_MAX_REQUEST_BYTES = 64 << 20   # a batch of 64 FP32 224x224 images is 38.5 MB
# Pixels of one client image, checked in its header before decoding: each decode thread (one per core)
# holds the decoded image (3 bytes a pixel) and its resize. A 236 KB PNG can claim 9000 x 9000 pixels
# (480 MB of peak memory at the CLI's 100 M limit); 4096 x 4096 takes 48 MB and passes 12 MP photos.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# The JSON of one HTTP infer request: json.loads holds the event loop and keeps a Python number per element
# (a 64 MB body of JSON numbers: 11 s with every other client waiting, 720 MB). 16 MiB: a batch of 8 FP32
# 224 x 224 images written with full precision; larger tensors go as binary data (tritonclient's default).
DEFAULT_MAX_JSON_BYTES = 16 << 20
MAX_DRAIN_SECONDS = 24 * 3600
DEFAULT_IDLE_TIMEOUT_SECONDS = 60.0   # nginx's client_body_timeout; keep-alive clients reconnect after it
# Open connections per front end (HTTP, gRPC). Each can hold a request body of up to --max-request-bytes and
# holds a file descriptor (HTTP up to 2: refusals linger), so the server raises its open-file limit to 3 x this
# + 64 at start (server.ensure_descriptors); past that limit accept() failing with EMFILE stalls every new client.
DEFAULT_MAX_CONNECTIONS = 256
ADAPTIVE_INSTANCES = 4      # default instances per model at most (each a loaded model): on many cores, a share each


@dataclass(frozen=True)
class ServeConfig:
    repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000                  # 0: any free port (printed when serving)
    grpc_port: int = 8001
    instances: int | None = None           # per model; None: one per core (at most 4), or 1 with --threads
    threads: int | None = None             # TVM threads per instance, fixed; None: adaptive (batcher.Lanes)
    max_queue_delay_us: int = 0            # how long the oldest request waits for a fuller batch
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    auth_token: str | None = None          # bearer token guarding everything but health
    labels: Path | None = None             # class names for the classification extension
    drain_seconds: float = 30.0            # SIGTERM: how long in-flight requests may take to finish
    idle_timeout_seconds: float = DEFAULT_IDLE_TIMEOUT_SECONDS   # a connection that sends nothing is closed
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS   # BYTES images above it: 400 before decoding
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES       # the JSON part of an HTTP infer request; above it: 413
    # Triton's system shared memory extension (clients' /dev/shm objects); None: on when `host` is loopback only
    shared_memory: bool | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS   # per front end; past it HTTP gets 503, gRPC a closed socket
    # the native data path (C++ engine + HTTP pump, built at start); None: on when it builds here
    native: bool | None = None

    def __post_init__(self) -> None:
        for name in ("instances", "max_request_bytes", "max_image_pixels", "max_json_bytes", "max_connections"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"--max-queue-delay-us must be 0 or more, got {self.max_queue_delay_us}.")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}.")
        if self.max_image_pixels > MAX_PIXELS:   # the readers' own bound (an image's header size is trusted up to it)
            raise ConfigError(f"--max-image-pixels must be at most {MAX_PIXELS}, got {self.max_image_pixels}.")
        check_per_core("--instances", self.instances)
        check_per_core("--threads", self.threads)
        for name in ("http_port", "grpc_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"--{name.replace('_', '-')} must be a TCP port (0-65535), "
                                  f"got {getattr(self, name)}.")
        if not 0 <= self.drain_seconds <= MAX_DRAIN_SECONDS:   # also NaN
            raise ConfigError(f"--drain-seconds must be 0..{MAX_DRAIN_SECONDS} (how long SIGTERM waits for the "
                              f"requests in flight), got {self.drain_seconds}.")
        if not 0.1 <= self.idle_timeout_seconds <= MAX_DRAIN_SECONDS:   # also NaN
            raise ConfigError(f"--idle-timeout-seconds must be 0.1..{MAX_DRAIN_SECONDS} (how long a connection may "
                              f"send nothing before it is closed), got {self.idle_timeout_seconds}.")
        if self.labels is not None:   # one file for every model: unreadable is the server's mistake, not a model's
            load_labels(self.labels)
        repository = Path(self.repository)
        if not repository.is_dir():   # a file was read as a folder (was: NotADirectoryError traceback)
            what = "is a file" if repository.exists() else "does not exist"
            if (repository.parent / "mod.json").is_file():   # mod.json, mod.so or the runner's model prefix
                what += f" (it names part of the build {repository.parent}: give that folder)"
            raise ConfigError(f"model repository {repository} {what}: give a folder of compiled builds "
                              "(<name>/mod.so + mod.json) or one build folder.")

    @property
    def cores(self) -> list[int] | None:
        """Adaptive threads (no --threads): the cores the instances share, the first TVM_NUM_THREADS of
        those this process may use when it is set. None: fixed threads."""
        if self.threads is not None:
            return None
        cores = usable_cores()
        limit = tvm_num_threads()
        return cores[:limit] if limit else cores

    @cached_property   # is_loopback may resolve a name
    def shared_memory_on(self) -> bool:
        return is_loopback(self.host) if self.shared_memory is None else self.shared_memory

    @property
    def shared_memory_why(self) -> str:
        """Why system shared memory is on or off, and how to change it."""
        if self.shared_memory is not None:
            return f"started with --{'' if self.shared_memory else 'no-'}shared-memory"
        if self.shared_memory_on:
            return f"the default for the loopback --host {self.host}; --no-shared-memory turns it off"
        return (f"the default for --host {self.host or '(every address)'}, not a loopback address: clients of other "
                "hosts cannot use it, and it lets a client have the server open /dev/shm objects; --shared-memory "
                "turns it on")

    @property
    def instance_count(self) -> int:
        if self.instances is not None:
            return self.instances
        return min(len(self.cores), ADAPTIVE_INSTANCES) if self.cores else 1


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one ("" binds every address: no)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM) if host else []
    except (socket.gaierror, UnicodeError):   # binding fails later with its own message
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def read_token(path: str | Path) -> str:
    """The bearer token from --auth-token-file (first line, surrounding whitespace removed)."""
    check_not_special(path, "--auth-token-file")
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--auth-token-file {path}: cannot read it ({exc.strerror or exc}).") from None
    if not token:
        raise ConfigError(f"--auth-token-file {path} is empty: put the token on its first line.")
    return token
