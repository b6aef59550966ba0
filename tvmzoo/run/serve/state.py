"""What both front ends share: the repository, the request path, metrics, the token, draining, the
registered shared memory regions."""
from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field

from .inference import Inference
from .metrics import Metrics
from .repository import Repository
from .shared_memory import SharedMemoryRegions

SERVER_NAME = "tvmzoo"
SHARED_MEMORY = "system_shared_memory"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics", SHARED_MEMORY]


@dataclass
class AppState:
    repository: Repository
    inference: Inference
    metrics: Metrics
    version: str
    auth_token: str | None
    max_request_bytes: int
    max_json_bytes: int
    shared_memory: SharedMemoryRegions = field(default_factory=SharedMemoryRegions)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)   # SIGTERM: refuse new requests, end streams
    native_engines: dict[str, int] = field(default_factory=dict)   # --native: engine handles by model (pump, gRPC front)

    @property
    def extensions(self) -> list[str]:
        return [e for e in EXTENSIONS if e != SHARED_MEMORY or self.shared_memory.enabled]

    @property
    def draining(self) -> bool:
        return self.stopping.is_set()

    def statistics(self, name: str, version: str) -> dict:
        """Triton's statistics response: one model, or every model when `name` is empty."""
        names = [self.repository.get(name, version).name] if name else sorted(self.repository.models)
        return {"model_stats": [self.metrics.statistics(n) for n in names]}

    def authorized(self, header: str | None) -> bool:
        """`Authorization: Bearer <token>` (HTTP header, or gRPC metadata `authorization`)."""
        if self.auth_token is None:
            return True
        scheme, _, value = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.auth_token.encode())
