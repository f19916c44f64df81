"""Settings, resolved once for the Python API, the CLI and the server.

Every value resolves the same way: an explicit argument (a keyword of ``LLM``, a flag)
beats the environment, which beats the default. The environment, like Ollama's
``OLLAMA_*``:

    KVSLIM_KV_CACHE_TYPE      K and V cache type (f16, q8_0, q4_0, ...; default f16)
    KVSLIM_FLASH_ATTENTION    auto | 1 | 0 (a quantized V cache needs it)
    KVSLIM_CONTEXT_LENGTH     default num_ctx (4096, at most the model's)
    KVSLIM_KV_ROTATION        auto | on | off: Hadamard rotation of quantized K/V (default auto)
    KVSLIM_KV_CENTERING       auto | on | off: keys stored minus the model's mean key (default auto)
    KVSLIM_KV_ROUNDING        auto | lsq | ggml: block scales of quantized K/V (default auto: lsq)
    KVSLIM_WEIGHTS            quantized | dequantize: weights as stored in the GGUF (default) or float
    KVSLIM_PREFIX_CACHE       0 turns prefix caching off (default on)

and for ``kvslim serve`` only (``ServerSettings``):

    KVSLIM_HOST               address, like OLLAMA_HOST (default 127.0.0.1:11434)
    KVSLIM_NUM_PARALLEL       sequences decoding together per model (default 4)
    KVSLIM_KV_MEMORY          K/V pool size per model, e.g. 2GiB (default num_ctx x num_parallel)
    KVSLIM_MAX_QUEUE          requests waiting per model before 503 (default 512, as Ollama)
    KVSLIM_MAX_LOADED_MODELS  models kept loaded at once (default 1)
    KVSLIM_MAX_BODY           largest request body, e.g. 16MiB (default)
    KVSLIM_PREFIX_CACHE_DIR   folder keeping the prefix cache across restarts (default: none)
    KVSLIM_PREFIX_CACHE_DISK  its disk budget, least recently used files go first (default 4GiB)

and ``KVSLIM_KEEP_ALIVE`` (how long an idle model stays loaded: 5m, 1h30m, seconds, -1
forever; default 5m as Ollama). Each setting Ollama has is also read from its ``OLLAMA_*``
name (``OLLAMA_NAMES``: OLLAMA_HOST, OLLAMA_KV_CACHE_TYPE, ...), the ``KVSLIM_*`` one
winning, so an Ollama user's environment works unchanged (``env_value``); the model
store's ``KVSLIM_MODELS`` / ``OLLAMA_MODELS`` is read by ``kvslim.store``.

Booleans and modes are read by one parser (``parse_mode``): 1/true/yes/on and
0/false/no/off, any case.
"""
from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Mapping

import torch

from kvslim import formats
from kvslim.attention import FLASH_MODES
from kvslim.codec import CodecSettings
from kvslim.engine import DEFAULT_NUM_CTX
from kvslim.units import parse_memory

__all__ = ["env_value", "OLLAMA_NAMES", "parse_mode", "pick_device", "compute_dtype", "resolve_cache_types",
           "AUTO", "resolve_max_kld",
           "resolve_flash_attn", "resolve_num_ctx", "resolve_codec", "resolve_prefix_cache",
           "ServerSettings", "parse_keep_alive", "DEFAULT_KEEP_ALIVE",
           "parse_host", "is_loopback", "DEVICES", "MODES", "ROUNDING_MODES"]

DEVICES = ("auto", "cpu", "cuda", "mps")
MODES = ("auto", "on", "off")
ROUNDING_MODES = ("auto", "lsq", "ggml")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

# Settings Ollama also has, under its name (read when the KVSLIM_* one is unset or empty)
OLLAMA_NAMES = {f"KVSLIM_{n}": f"OLLAMA_{n}" for n in (
    "HOST", "KV_CACHE_TYPE", "FLASH_ATTENTION", "NUM_PARALLEL", "MAX_LOADED_MODELS",
    "MAX_QUEUE", "CONTEXT_LENGTH", "KEEP_ALIVE")}


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """Setting ``name`` (a KVSLIM_* variable) from ``env``, else from its Ollama name."""
    return env.get(name) or env.get(OLLAMA_NAMES.get(name, name)) or None


def _source(env: Mapping[str, str], name: str) -> str:
    """Which variable ``env_value`` read ``name`` from, for error messages."""
    return name if env.get(name) or name not in OLLAMA_NAMES else OLLAMA_NAMES[name]


def parse_mode(name: str, value, choices: tuple[str, ...] = MODES, default: str = "auto") -> str:
    """One of ``choices`` from a bool, a word or None (``default``); where ``choices``
    has on/off, 1/true/yes and 0/false/no mean them. ValueError names ``name``."""
    raw = default if value is None or value == "" else value
    if isinstance(raw, bool):
        raw = "on" if raw else "off"
    text = str(raw).strip().lower()
    if "on" in choices:
        text = "on" if text in _TRUE else "off" if text in _FALSE else text
    if text not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return text


# ---------------------------------------------------------------- device


def pick_device(name: str | None = "auto") -> torch.device:
    """auto: cuda > mps > cpu. ValueError for an unknown or unavailable device."""
    name = (name or "auto").lower()
    base = name.split(":")[0]
    if base not in DEVICES:
        raise ValueError(f"unknown device {name!r}; valid: {', '.join(DEVICES)}")
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if base == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no CUDA/ROCm GPU")
    if base == "mps" and not has_mps:
        raise ValueError("device mps asked for, but torch sees no Apple MPS device")
    return torch.device(name)


def compute_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU, bf16 on CUDA (fp16 where bf16 is unsupported), fp16 on MPS."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


# ---------------------------------------------------------------- the K/V cache


def resolve_cache_types(kv_cache_type: str | None = None, cache_type_k: str | None = None,
                        cache_type_v: str | None = None,
                        env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(K type, V type): a per-tensor type beats the shared one, which beats
    KVSLIM_KV_CACHE_TYPE, which beats f16. ValueError listing valid types if unknown.
    ("auto", "auto"): the pair is chosen by measured quality (``kvslim.calibration``)."""
    shared = kv_cache_type or env_value(env, "KVSLIM_KV_CACHE_TYPE") or "f16"
    k, v = cache_type_k or shared, cache_type_v or shared
    if AUTO in (str(k).strip().lower(), str(v).strip().lower()):
        if str(k).strip().lower() != str(v).strip().lower():
            raise ValueError(f"cache type auto chooses K and V together; got K {k} / V {v}")
        return AUTO, AUTO
    return formats.get_format(k).name, formats.get_format(v).name


AUTO = "auto"  # the cache type that picks the smallest pair within a KLD budget


def resolve_max_kld(kv_max_kld=None, env: Mapping[str, str] = os.environ) -> float:
    """The KLD budget of ``auto``: an argument, else KVSLIM_KV_MAX_KLD, else
    autotype.DEFAULT_MAX_KLD."""
    from kvslim.autotype import DEFAULT_MAX_KLD, parse_max_kld

    value = _given(kv_max_kld, env, "KVSLIM_KV_MAX_KLD")
    return DEFAULT_MAX_KLD if value is None else parse_max_kld(value)


def resolve_weights(weights: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """quantized|dequantize from an argument or KVSLIM_WEIGHTS (default quantized)."""
    from kvslim.weights import WEIGHT_MODES

    value = (weights or env.get("KVSLIM_WEIGHTS") or "quantized").strip().lower()
    if value not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {value!r}")
    return value


def resolve_flash_attn(flash_attn: str | bool | None = None,
                       env: Mapping[str, str] = os.environ) -> str:
    """auto|on|off from an argument or KVSLIM_FLASH_ATTENTION (1/true/on, 0/false/off, auto)."""
    return parse_mode("flash attention", _given(flash_attn, env, "KVSLIM_FLASH_ATTENTION"),
                      FLASH_MODES)


def resolve_num_ctx(num_ctx: int | None, model_max: int, device: torch.device,
                    env: Mapping[str, str] = os.environ) -> int:
    """An explicit num_ctx must fit the model; env/default values are capped at its maximum.

    Default as Ollama's: 4096 on CPU/MPS and GPUs under 24 GiB, 32k under 48 GiB, 256k above.
    """
    if num_ctx is not None:
        if not 1 <= num_ctx <= model_max:
            raise ValueError(f"num_ctx {num_ctx} is outside [1, {model_max}] "
                             f"(the model's maximum context is {model_max})")
        return num_ctx
    if env_value(env, "KVSLIM_CONTEXT_LENGTH"):
        default = _int(env, "KVSLIM_CONTEXT_LENGTH", DEFAULT_NUM_CTX)
    else:
        default = DEFAULT_NUM_CTX
        if device.type == "cuda":
            vram = torch.cuda.get_device_properties(device).total_memory / 2**30
            default = 262144 if vram >= 48 else 32768 if vram >= 24 else DEFAULT_NUM_CTX
    return max(1, min(default, model_max))


def resolve_codec(rotation=None, centering=None, rounding=None,
                  env: Mapping[str, str] = os.environ,
                  base: CodecSettings | None = None) -> CodecSettings:
    """How quantized K/V rows are coded (``kvslim.codec``). Arguments beat
    KVSLIM_KV_ROTATION / _CENTERING / _ROUNDING, which beat auto; with ``base``, the
    environment is not read and an argument left None keeps ``base``'s value."""
    if base is not None:
        env = {"KVSLIM_KV_ROTATION": base.rotation, "KVSLIM_KV_CENTERING": base.centering,
               "KVSLIM_KV_ROUNDING": base.rounding}
    return CodecSettings(
        parse_mode("kv_rotation", _given(rotation, env, "KVSLIM_KV_ROTATION")),
        parse_mode("kv_centering", _given(centering, env, "KVSLIM_KV_CENTERING")),
        parse_mode("kv_rounding", _given(rounding, env, "KVSLIM_KV_ROUNDING"), ROUNDING_MODES))


def resolve_prefix_cache(prefix_cache: bool | str | None = None,
                         env: Mapping[str, str] = os.environ) -> bool:
    """Whether finished prompts keep their whole K/V pages for a later identical prefix:
    an argument, else KVSLIM_PREFIX_CACHE, else on."""
    value = _given(prefix_cache, env, "KVSLIM_PREFIX_CACHE")
    return parse_mode("KVSLIM_PREFIX_CACHE", value, ("on", "off"), default="on") == "on"


def _given(value, env: Mapping[str, str], name: str):
    return value if value is not None else env_value(env, name)


# ---------------------------------------------------------------- the server


DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 11434
_SCHEME_PORTS = {"http": 80}  # like OLLAMA_HOST: "http://host" means port 80


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


DEFAULT_KEEP_ALIVE = 300.0  # seconds, Ollama's 5m
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_keep_alive(value, name: str = "keep_alive") -> float:
    """Seconds an idle model stays loaded, read as Ollama reads keep_alive: a number of
    seconds, a Go duration ("5m", "1h30m", "1.5h", "0") or a whole number of seconds as
    text; anything negative is forever (inf). ValueError names ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be a duration like '5m' or a number of seconds, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
        parts = _DURATION.findall(body)
        if body.isdigit():  # "300": seconds, as OLLAMA_KEEP_ALIVE takes
            seconds = sign * int(body)
        elif parts and "".join(n + u for n, u in parts) == body:
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
        else:
            raise ValueError(f"{name} must be a duration like '5m', '1h30m' or a number of "
                             f"seconds (negative: forever), got {value!r}")
    else:
        seconds = float(value)
    if math.isnan(seconds):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    return math.inf if seconds < 0 else seconds


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env_value(env, name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{_source(env, name)} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{_source(env, name)} must be at least {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class ServerSettings:
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
    keep_alive: float = DEFAULT_KEEP_ALIVE  # seconds an idle model stays loaded (inf: forever)
    prefix_cache: bool = True
    device: str = "auto"
    codec: CodecSettings = field(default_factory=CodecSettings)  # K/V rotation, centering, rounding
    kv_max_kld: float = 0.005  # the KLD budget of cache type auto (autotype.DEFAULT_MAX_KLD)
    weights: str = "quantized"  # kvslim.weights mode
    prefix_cache_dir: str | None = None  # prefix cache files kept across restarts
    prefix_cache_disk: int = 4 * 2**30  # bytes that folder may hold
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "ServerSettings":
        """Settings from ``env`` (default os.environ); keyword overrides (flags) win when not None."""
        env = dict(os.environ if env is None else env)
        given = {k: v for k, v in overrides.items() if v is not None}
        host, port = parse_host(given.pop("host", None) or env_value(env, "KVSLIM_HOST"))
        k, v = resolve_cache_types(given.pop("kv_cache_type", None), given.pop("cache_type_k", None),
                                   given.pop("cache_type_v", None), env=env)
        memory = given.pop("kv_memory", None) or env.get("KVSLIM_KV_MEMORY")
        keep_alive = env_value(env, "KVSLIM_KEEP_ALIVE")
        codec = resolve_codec(given.pop("kv_rotation", None), given.pop("kv_centering", None),
                              given.pop("kv_rounding", None), env=env)
        settings = cls(
            host=host, port=port, cache_type_k=k, cache_type_v=v,
            flash_attn=resolve_flash_attn(given.pop("flash_attn", None), env=env),
            num_parallel=_int(env, "KVSLIM_NUM_PARALLEL", cls.num_parallel),
            kv_memory=parse_memory(memory) if memory else None,
            max_queue=_int(env, "KVSLIM_MAX_QUEUE", cls.max_queue, minimum=0),
            max_loaded_models=_int(env, "KVSLIM_MAX_LOADED_MODELS", cls.max_loaded_models),
            max_body=parse_memory(env["KVSLIM_MAX_BODY"]) if env.get("KVSLIM_MAX_BODY") else cls.max_body,
            keep_alive=parse_keep_alive(keep_alive, _source(env, "KVSLIM_KEEP_ALIVE"))
            if keep_alive else DEFAULT_KEEP_ALIVE,
            prefix_cache=resolve_prefix_cache(given.pop("prefix_cache", None), env=env),
            codec=codec, weights=resolve_weights(given.pop("weights", None), env=env), env=env,
            kv_max_kld=resolve_max_kld(given.pop("kv_max_kld", None), env=env),
            prefix_cache_dir=env.get("KVSLIM_PREFIX_CACHE_DIR") or None,
            prefix_cache_disk=parse_memory(env["KVSLIM_PREFIX_CACHE_DISK"])
            if env.get("KVSLIM_PREFIX_CACHE_DISK") else cls.prefix_cache_disk,
        )
        return replace(settings, **given)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"
