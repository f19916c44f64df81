"""What the Ollama and OpenAI handlers share: errors, body parsing, options, running a job."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from kvslim.engine import StepOutput, truncate_dimensions
from kvslim.sampling import SamplingParams
from kvslim.server.models import Registry, Runner
from kvslim.server.scheduler import Job
from kvslim.server import security
from kvslim.server.schemas import Options
from kvslim.server.types import CacheRequest, ModelNotFound, PoolTooLarge, ServerBusy
from kvslim.settings import parse_keep_alive

log = logging.getLogger("kvslim.server")


# No request of either API nests more than a few levels; deeper is an attack or a bug.
MAX_JSON_DEPTH = 64
# A stream quiet this long (a long prefill, a wait for pages) sends a keep-alive, so proxies
# that cut idle connections (nginx: 60 s by default) do not end it.
STREAM_KEEPALIVE_S = 10.0


class APIError(Exception):
    """An error answered with ``status`` and the API's error body."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


# ---------------------------------------------------------------- requests


async def read_json(request: Request, schema: type[BaseModel]) -> Any:
    """The body parsed and validated against ``schema``; APIError(400) says what is wrong."""
    body = await request.body()
    if not body.strip():
        raise APIError(400, "missing request body")
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, "invalid JSON in the request body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"invalid JSON in the request body: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    depth, chars = _shape(data)
    if depth > MAX_JSON_DEPTH:
        raise APIError(400, f"invalid JSON in the request body: nested deeper than {MAX_JSON_DEPTH} levels")
    limit = request.app.state.guard.prompt_chars_limit(_num_ctx(data))
    if chars > limit:
        raise APIError(413, f"the request holds {chars:,} characters of text, more than the limit "
                            f"of {limit:,} (KVSLIM_MAX_PROMPT_CHARS; default 32 per token of num_ctx)")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise APIError(400, describe(e)) from None


def _shape(value) -> tuple[int, int]:
    """(nesting depth, characters in strings) of parsed JSON, without recursion (the
    validators recurse over it later)."""
    deepest, chars, level = 0, 0, [(value, 1)]
    while level:
        v, d = level.pop()
        deepest = max(deepest, d)
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        for c in children:
            if isinstance(c, (dict, list)):
                level.append((c, d + 1))
            elif isinstance(c, str):
                chars += len(c)
    return deepest, chars


def _num_ctx(data: dict) -> int | None:
    """The num_ctx a body asks for, if it names a sensible one (the schema checks it later)."""
    options = data.get("options")
    n = options.get("num_ctx") if isinstance(options, dict) else None
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    return n if isinstance(n, int) and 0 < n < 1 << 24 else None


def _no_constant(name: str):
    """NaN, Infinity and -Infinity are not JSON (RFC 8259), though Python's parser takes them."""
    raise ValueError(f"{name} is not a valid JSON value")


def describe(e: ValidationError) -> str:
    """One line per problem: 'options.num_predict: Input should be a valid integer'."""
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-"))
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def registry(request: Request) -> Registry:
    return request.app.state.registry


def keep_alive_seconds(value) -> float | None:
    """A request's keep_alive in seconds (None when absent); APIError(400) if malformed."""
    if value is None:
        return None
    try:
        return parse_keep_alive(value)
    except ValueError as e:
        raise APIError(400, str(e)) from None


async def get_runner(request: Request, name: str, keep_alive=None) -> tuple[Runner, float]:
    """The loaded model called ``name`` (loading it now if needed) and the load seconds.

    The model stays loaded for ``keep_alive`` (the request's; None: the server's) once
    idle; it is claimed until ``start_job`` queues the request.
    """
    if not name:
        raise APIError(400, "model is required")
    seconds = keep_alive_seconds(keep_alive)
    return await run_in_threadpool(registry(request).get, name, seconds)


# ---------------------------------------------------------------- options


def check_num_predict(n: int | None, runner: Runner) -> int | None:
    """Ollama's num_predict: -1 no limit, -2 until the context is full (both None here)."""
    if n is None or n in (-1, -2):
        return None
    top = runner.config.context_length
    if n < 1:
        raise APIError(400, f"num_predict must be -1 (no limit), -2 (fill the context) or at "
                            f"least 1, got {n}")
    if n > top:
        raise APIError(400, f"num_predict {n} is more than the model can ever generate "
                            f"(its maximum context is {top} tokens)")
    return n


def plan_request(runner: Runner, options: Options | None,
                 defaults: dict | None = None) -> tuple[SamplingParams, CacheRequest]:
    """Sampling parameters and cache request from Ollama-style options (ValueError -> 400).

    A request refused here ends the runner's claim (``get_runner``)."""
    try:
        return _plan(runner, options or Options(), defaults)
    except BaseException:
        runner.release()
        raise


def _plan(runner: Runner, options: Options, defaults: dict | None) -> tuple[SamplingParams, CacheRequest]:
    sampling = (defaults or {}) | runner.options | options.sampling()  # runner's: the model card's
    sampling["max_tokens"] = check_num_predict(sampling.pop("num_predict", None), runner)
    try:
        params = SamplingParams.from_options(**sampling)
        cache = runner.cache_request(options.kv_cache_type, options.cache_type_k,
                                     options.cache_type_v, options.num_ctx,
                                     kv_rotation=options.kv_rotation,
                                     kv_centering=options.kv_centering,
                                     kv_rounding=options.kv_rounding,
                                     kv_max_kld=options.kv_max_kld)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return params, cache


async def start_job(runner: Runner, ids_fn, params: SamplingParams, cache: CacheRequest,
                    truncate: bool, grammar=None, n: int = 1) -> Job:
    """Tokenize (in a worker thread), check the request fits, and queue it (``n`` answers
    to the prompt); the runner's claim (``get_runner``) ends here either way. ``grammar``
    (``kvslim.grammar``): the sequence's parser starts in the worker thread too, not in
    the scheduler's steps."""
    try:
        try:
            ids = await run_in_threadpool(ids_fn)
            runner.check_request(ids, params, cache, truncate, n)
            constraint = None if grammar is None else \
                await run_in_threadpool(grammar.constraint, runner.tokenizer)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        limit = security.current().max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise APIError(413, f"the prompt has {len(ids):,} tokens, more than the limit of "
                                f"{limit:,} (KVSLIM_MAX_PROMPT_TOKENS)")
        return Job.start(runner.scheduler, ids, params, cache, truncate, constraint, n)
    finally:
        runner.release()


# ---------------------------------------------------------------- embeddings


async def embed_inputs(runner: Runner, inputs: list, options: Options | None, *,
                       truncate: bool = True, dimensions: int | None = None,
                       normalize: bool = True) -> tuple[list, int]:
    """(vectors as lists, tokens evaluated) of texts or token-id lists, in the runner's
    default pool between its steps; the runner's claim (``get_runner``) ends here.
    ``options.num_ctx`` bounds each input (clamped to the model's)."""
    try:
        try:
            num_ctx = runner.cache_request(num_ctx=options.num_ctx if options else None).num_ctx
        except ValueError as e:
            raise APIError(400, str(e)) from None
        limit = security.current().max_prompt_tokens

        def work():
            ids = [runner.text_ids(x) if isinstance(x, str) else list(x) for x in inputs]
            if limit is not None and any(len(x) > limit for x in ids):
                raise APIError(413, f"an input has more than {limit:,} tokens "
                                    f"(KVSLIM_MAX_PROMPT_TOKENS)")
            vectors, n = runner.embed(ids, truncate, num_ctx, normalize)
            return truncate_dimensions(vectors, dimensions).tolist(), n

        try:
            return await run_in_threadpool(work)
        except ValueError as e:  # too long without truncate, bad ids, bad dimensions
            raise APIError(400, str(e)) from None
    finally:
        runner.release()


# ---------------------------------------------------------------- logprobs


def token_text(tokenizer, tid: int) -> tuple[str, list[int]]:
    """A token's text (invalid UTF-8 of a partial character replaced) and its bytes."""
    raw = tokenizer.token_to_piece(tid)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer, ids: list[int], lps: list) -> list[dict]:
    """Entries of token, logprob, bytes and top_logprobs (OpenAI's ``logprobs.content``
    and Ollama's ``logprobs``) for tokens ``ids`` and their ``Sequence.logprobs``."""
    def entry(tid: int, lp: float) -> dict:
        text, raw = token_text(tokenizer, tid)
        return {"token": text, "logprob": lp, "bytes": raw}
    return [entry(t, lp) | {"top_logprobs": [entry(i, p) for i, p in top]}
            for t, (lp, top) in zip(ids, lps)]


def with_logprobs(params: SamplingParams, top: int | None) -> SamplingParams:
    """``params`` asking for each token's logprob and ``top`` alternatives (None: off)."""
    try:
        return dataclasses.replace(params, logprobs=top)
    except ValueError as e:
        raise APIError(400, str(e)) from None


# ---------------------------------------------------------------- answers


async def collect(job: Job, request: Request) -> str:
    """All of a job's text; ClientGone (and the job cancelled) if the client leaves first."""
    async def drain() -> str:
        return "".join([out.text async for out in job.outputs()])

    return await unless_gone(drain(), request)


async def unless_gone(work, request: Request):
    """The result of the coroutine ``work`` (which reads jobs' outputs); ClientGone if the
    client leaves first, with ``work`` cancelled: leaving the outputs cancels the jobs."""
    answer = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if answer not in done:
        answer.cancel()
        raise ClientGone()
    return answer.result()


async def disconnected(request: Request) -> None:
    """Returns when the client has closed the connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def outputs_or_error(job: Job) -> AsyncIterator[StepOutput | Exception]:
    """A job's outputs, ending with the exception instead of raising it (a stream has
    already sent its status line, so an error becomes its last message). Closing this
    closes ``job.outputs()``, which cancels the job."""
    try:
        async with contextlib.aclosing(job.outputs()) as outputs:
            async for out in outputs:
                yield out
    except Exception as e:  # noqa: BLE001 - reported to the client in the stream
        log.warning("request failed while streaming: %s", e)
        yield e


async def with_keepalives(items: AsyncIterator, every: float | None = None) -> AsyncIterator:
    """``items``, with None whenever ``every`` seconds (STREAM_KEEPALIVE_S) pass without
    one. Leaving early cancels the pending read, or closes ``items`` between reads,
    which cancels the job."""
    it = items.__aiter__()
    pending = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=every or STREAM_KEEPALIVE_S)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(it.__anext__())
    finally:
        if not pending.done():
            pending.cancel()  # the read's cancellation ends ``it`` where it waits
        elif hasattr(it, "aclose"):
            await it.aclose()  # ``it`` waits at a yield: closing it runs its finally blocks


class JobStream(StreamingResponse):
    """A streaming response whose body (an async generator reading engine jobs) is closed
    as soon as the client leaves, or the response ends any other way: closing it cancels
    its jobs, so no sequence decodes for a gone client and its pages return at the next
    step, instead of whenever the garbage collector finalizes the generator.

    Starlette notices a disconnect itself only for ASGI spec < 2.4 (otherwise on the next
    write, which a long prefill may delay by STREAM_KEEPALIVE_S): this listens too."""

    async def __call__(self, scope, receive, send) -> None:
        body = asyncio.ensure_future(super().__call__(scope, receive, send))
        gone = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({body, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            body.cancel()  # nothing when it ended
            await asyncio.wait({body})
            await self.body_iterator.aclose()
        if not body.cancelled():
            body.result()  # its error, if any, as StreamingResponse raises it


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def status_of(e: Exception) -> int:
    """HTTP status for an error raised by a handler or a job."""
    if isinstance(e, APIError):
        return e.status
    if isinstance(e, ModelNotFound):
        return 404
    if isinstance(e, ServerBusy):
        return 503
    if isinstance(e, PoolTooLarge):
        return 500
    if isinstance(e, ValueError):
        return 400
    return 500


def ns(seconds: float) -> int:
    return int(seconds * 1e9)


def timestamp(t: float | None = None) -> str:
    """RFC 3339 in UTC with microseconds, as Ollama writes ``created_at``."""
    dt = datetime.fromtimestamp(time.time() if t is None else t, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
