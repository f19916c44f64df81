"""Server-wide settings from the environment (``KVSLIM_*``, like Ollama's ``OLLAMA_*``) and flags.

    KVSLIM_HOST               address, like OLLAMA_HOST (default 127.0.0.1:11434)
    KVSLIM_KV_CACHE_TYPE      K and V cache type (f16, q8_0, q4_0, ...; default f16)
    KVSLIM_FLASH_ATTENTION    auto | 1 | 0 (a quantized V cache needs it)
    KVSLIM_CONTEXT_LENGTH     default num_ctx (4096, at most the model's)
    KVSLIM_NUM_PARALLEL       sequences decoding together per model (default 4)
    KVSLIM_KV_MEMORY          K/V pool size per model, e.g. 2GiB (default num_ctx x num_parallel)
    KVSLIM_MAX_QUEUE          requests waiting per model before 503 (default 512, as Ollama)
    KVSLIM_MAX_LOADED_MODELS  models kept loaded at once (default 1)
    KVSLIM_MAX_BODY           largest request body, e.g. 16MiB (default)
    KVSLIM_PREFIX_CACHE       0 turns prefix caching off (default on)
    KVSLIM_KV_ROTATION        auto | on | off: Hadamard rotation of quantized K/V (default auto)
    KVSLIM_KV_CENTERING       auto | on | off: keys stored minus the model's mean key (default auto)
    KVSLIM_KV_ROUNDING        auto | lsq | ggml: block scales of quantized K/V (default auto: lsq)
    KVSLIM_WEIGHTS            quantized | dequantize: weights as stored in the GGUF (default) or float
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, replace
from typing import Mapping

from kvslim.codec import CodecSettings

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 11434
_SCHEME_PORTS = {"http": 80}  # like OLLAMA_HOST: "http://host" means port 80

__all__ = ["Settings", "parse_host", "is_loopback"]


def parse_host(value: str | None) -> tuple[str, int]:
    """(host, port) from OLLAMA_HOST-style text: host, host:port, :port, [v6]:port, http://host:port.

    Unlike Ollama, an empty host (":8080") stays on loopback: binding beyond it is explicit.
    """
    text = (value or "").strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    if scheme not in _SCHEME_PORTS:
        raise ValueError(f"KVSLIM_HOST {value!r}: only http:// is served (put a TLS proxy in front)")
    default_port = _SCHEME_PORTS[scheme] if sep else DEFAULT_PORT
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):  # [v6] or [v6]:port
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:  # a name, a v4 address or a bare v6 address
        host, port = rest, ""
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"KVSLIM_HOST {value!r}: bad port {port!r}")
    return host or DEFAULT_HOST, int(port) if port else default_port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1/0 (true/false), got {raw!r}")


@dataclass(frozen=True)
class Settings:
    """Everything ``kvslim serve`` is configured with; per-request options refine the cache."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    num_ctx: int | None = None  # None: KVSLIM_CONTEXT_LENGTH or 4096, capped per model
    num_parallel: int = 4
    kv_memory: int | None = None  # bytes of K/V pool per model; None: num_ctx x num_parallel
    max_queue: int = 512
    max_loaded_models: int = 1
    max_body: int = 16 * 2**20
    prefix_cache: bool = True
    device: str = "auto"
    codec: CodecSettings = field(default_factory=CodecSettings)  # K/V rotation, centering, rounding
    weights: str = "quantized"  # kvslim.weights mode
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Settings from ``env`` (default os.environ); keyword overrides (flags) win when not None."""
        from kvslim.llm import resolve_cache_types, resolve_flash_attn, resolve_weights
        from kvslim.planner import parse_memory

        env = dict(os.environ if env is None else env)
        given = {k: v for k, v in overrides.items() if v is not None}
        host, port = parse_host(given.pop("host", None) or env.get("KVSLIM_HOST"))
        k, v = resolve_cache_types(given.pop("kv_cache_type", None), given.pop("cache_type_k", None),
                                   given.pop("cache_type_v", None), env=env)
        memory = given.pop("kv_memory", None) or env.get("KVSLIM_KV_MEMORY")
        codec = CodecSettings.resolve(given.pop("kv_rotation", None), given.pop("kv_centering", None),
                                      given.pop("kv_rounding", None), env=env)
        settings = cls(
            host=host, port=port, cache_type_k=k, cache_type_v=v,
            flash_attn=resolve_flash_attn(given.pop("flash_attn", None), env=env),
            num_parallel=_int(env, "KVSLIM_NUM_PARALLEL", cls.num_parallel),
            kv_memory=parse_memory(memory) if memory else None,
            max_queue=_int(env, "KVSLIM_MAX_QUEUE", cls.max_queue, minimum=0),
            max_loaded_models=_int(env, "KVSLIM_MAX_LOADED_MODELS", cls.max_loaded_models),
            max_body=parse_memory(env["KVSLIM_MAX_BODY"]) if env.get("KVSLIM_MAX_BODY") else cls.max_body,
            prefix_cache=_flag(env, "KVSLIM_PREFIX_CACHE", True),
            codec=codec, weights=resolve_weights(given.pop("weights", None), env=env), env=env,
        )
        return replace(settings, **given)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"
