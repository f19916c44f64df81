"""Request bodies of the Ollama and OpenAI APIs, validated strictly (a string where a
number belongs is a 400, not a guess). Unknown fields are ignored, as both APIs do."""
from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from kvslim.sampling import MAX_PENALTY, MAX_TOP_LOGPROBS, SEED_RANGE

log = logging.getLogger("kvslim.server")

Stop = str | list[str] | None


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _integral(value):
    """8.0 -> 8: Ollama reads options from JSON numbers, so clients that write every number
    as a float (JavaScript's JSON.stringify(8.0) is "8", others write "8.0") work. 8.5
    and "8" are left for the strict int check to refuse."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral)]

# The ranges of kvslim.sampling.SamplingParams, checked here too so that a 400 names the field.
Penalty = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
Seed = Field(None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])


# ---------------------------------------------------------------- Ollama

# Ollama options that change nothing here (threads, GPU layers, mmap, mirostat ...):
# accepted without a word, like Ollama accepts them on any backend.
IGNORED_OPTIONS = frozenset({
    "num_keep", "typical_p", "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta",
    "penalize_newline", "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "vocab_only",
    "use_mmap", "use_mlock", "num_thread", "embedding_only", "logits_all", "f16_kv",
})
SAMPLING_OPTIONS = ("num_predict", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
                    "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty")


class Options(_Body):
    """Ollama's request ``options`` plus kvslim's cache types (each type pair has its own pool)."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    num_ctx: Int | None = Field(None, ge=1)
    num_predict: Int | None = None
    temperature: float | None = Field(None, ge=0)
    top_k: Int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: Int | None = Seed
    stop: Stop = None
    repeat_penalty: float | None = Field(None, ge=1 / MAX_PENALTY, le=MAX_PENALTY)
    repeat_last_n: Int | None = Field(None, ge=-1)
    presence_penalty: float | None = Penalty
    frequency_penalty: float | None = Penalty
    kv_cache_type: str | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    kv_rotation: str | None = None  # auto | on | off
    kv_centering: str | None = None  # auto | on | off
    kv_rounding: str | None = None  # auto | lsq | ggml
    kv_max_kld: float | None = Field(None, ge=0)  # the KLD budget of kv_cache_type auto

    def sampling(self) -> dict:
        """The sampling options that were given."""
        unknown = set(self.model_extra or {}) - IGNORED_OPTIONS
        if unknown:  # Ollama logs "invalid option provided" and goes on
            log.warning("invalid option(s) provided, ignored: %s", ", ".join(sorted(unknown)))
        return {k: getattr(self, k) for k in SAMPLING_OPTIONS if getattr(self, k) is not None}


class Message(_Body):
    role: str = Field(min_length=1)
    content: str | None = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None
    tool_name: str | None = None  # a "tool" turn: the tool that answered


class GenerateRequest(_Body):
    model: str = ""
    prompt: str = ""
    suffix: str = ""
    system: str = ""
    template: str = ""
    context: list[int] | None = None
    stream: bool = True
    raw: bool = False
    format: str | dict | None = None
    images: list[Any] | None = None
    options: Options | None = None
    keep_alive: str | int | float | None = None
    think: bool | str | None = None
    truncate: bool = True
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class ChatRequest(_Body):
    model: str = ""
    messages: list[Message] = []
    stream: bool = True
    format: str | dict | None = None
    options: Options | None = None
    keep_alive: str | int | float | None = None
    tools: list[Any] | None = None
    think: bool | str | None = None
    truncate: bool = True
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class ModelRequest(_Body):
    """/api/show and /api/pull: ``model`` (or the older ``name``)."""

    model: str = ""
    name: str = ""
    verbose: bool = False
    stream: bool = True
    insecure: bool = False

    @property
    def model_name(self) -> str:
        return self.model or self.name


class CopyRequest(_Body):
    """/api/copy."""

    source: str = ""
    destination: str = ""


class CreateRequest(_Body):
    """/api/create: a Modelfile's text (older clients), or ``from`` and the fields."""

    model: str = ""
    name: str = ""
    modelfile: str = ""
    from_: str = Field("", alias="from")
    template: str | None = None
    system: str | None = None
    license: str | list[str] | None = None
    parameters: dict | None = None
    files: dict | None = None
    adapters: dict | None = None
    messages: list | None = None
    quantize: str | None = None
    stream: bool = True

    @property
    def model_name(self) -> str:
        return self.model or self.name


# ---------------------------------------------------------------- OpenAI


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str = Field(min_length=1)
    content: str | list[ContentPart] | None = None
    tool_calls: list[Any] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a "tool" turn: the call it answers
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _OpenAIBody(_Body):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's documented ranges (its API answers 400 outside them)
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Seed
    stop: Stop = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    n: int | None = None
    options: Options | None = None  # kvslim extension: Ollama options (cache types, num_ctx)

    def ollama_options(self, max_tokens: int | None) -> Options:
        """These fields as Ollama options, under the extension ``options``.

        Defaults as Ollama's OpenAI layer: temperature 1 and top_p 1 when absent.
        """
        given = {"num_predict": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                 "seed": self.seed, "stop": self.stop, "frequency_penalty": self.frequency_penalty,
                 "presence_penalty": self.presence_penalty}
        base = (self.options.model_dump(exclude_none=True) if self.options else {})
        merged = {"temperature": 1.0, "top_p": 1.0} | base | \
            {k: v for k, v in given.items() if v is not None}
        return Options.model_validate(merged)


class ChatCompletionRequest(_OpenAIBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    response_format: dict | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_OpenAIBody):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(union_mode="left_to_right")
    suffix: str | None = None
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = None



# ---------------------------------------------------------------- embeddings


class EmbedRequest(_Body):
    """Ollama's /api/embed."""

    model: str = ""
    input: str | list[str] = Field(default="", union_mode="left_to_right")
    truncate: bool = True
    dimensions: Int | None = Field(None, ge=1)
    options: Options | None = None
    keep_alive: str | int | float | None = None


class EmbeddingsRequest(_Body):
    """Ollama's legacy /api/embeddings (one prompt, the vector not normalised)."""

    model: str = ""
    prompt: str = ""
    options: Options | None = None
    keep_alive: str | int | float | None = None


class OpenAIEmbeddingRequest(_Body):
    """OpenAI's /v1/embeddings; ``user`` is accepted and ignored."""

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]] = Field(union_mode="left_to_right")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    options: Options | None = None  # kvslim extension, as in the other /v1 routes


class ResponsesRequest(_OpenAIBody):
    """OpenAI's /v1/responses, text in and out (no tools, no stored conversations)."""

    input: str | list[dict] = Field(union_mode="left_to_right")
    instructions: str | None = None
    max_output_tokens: int | None = None
    tools: list[Any] | None = None
    previous_response_id: str | None = None
    text: dict | None = None
