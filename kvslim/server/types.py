"""Value types shared by the runner (``models``), its scheduler and the handlers.

The scheduler steps a ``Pool`` (the runner, as this protocol): it never imports the
runner, so ``models`` builds a ``Scheduler`` without a cycle between the two.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from kvslim.autotype import AutoChoice
from kvslim.codec import CodecSettings

if TYPE_CHECKING:
    from kvslim.engine import Engine

__all__ = ["ModelNotFound", "ServerBusy", "PoolTooLarge", "CacheConfig", "CacheRequest", "Pool"]


class ModelNotFound(LookupError):
    """No such model here (HTTP 404)."""

    def __str__(self) -> str:
        return self.args[0]


class ServerBusy(RuntimeError):
    """The server cannot take the request now; try again later (HTTP 503)."""


class PoolTooLarge(MemoryError):
    """A K/V pool that would not fit in the memory the device has free."""


@dataclass(frozen=True)
class CacheConfig:
    """What the pool of a loaded model is built with (the codec too: a pool is only ever
    read with the rotation / centering / rounding it was written with)."""

    type_k: str
    type_v: str
    codec: CodecSettings = CodecSettings()
    # when the types came from cache type auto; not part of the pool's identity: requests
    # whose budgets pick the same pair share one pool (reported with its builder's choice)
    auto: AutoChoice | None = field(default=None, compare=False)


@dataclass(frozen=True)
class CacheRequest:
    """What one request needs: the pool it runs in (its types, else the server's) and
    its own context limit, a per-sequence bound within that pool."""

    pool: CacheConfig
    num_ctx: int


class Pool(Protocol):
    """What a scheduler steps: one model's engines, one per ``CacheConfig``, and how to
    add one (``add_pool``: seconds it took, or None while busy pools hold the memory)."""

    name: str

    def engines(self) -> list["Engine"]: ...

    def engine_for(self, cfg: CacheConfig) -> "Engine | None": ...

    def add_pool(self, cfg: CacheConfig, busy: set[CacheConfig] = ...) -> float | None: ...

    def status(self) -> dict: ...
