"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions (SSE streaming),
/v1/embeddings, /v1/models.

Sampling defaults follow Ollama's OpenAI layer (temperature 1, top_p 1 when absent).
Ollama options, cache types included, can ride along as an extension ``options``
object (``extra_body={"options": {...}}`` in the openai client). ``usage`` reports
the prompt tokens served from the prefix cache as ``prompt_tokens_details.cached_tokens``.
"""
from __future__ import annotations

import base64
import json
import secrets
import struct
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from kvslim.server.common import (APIError, ClientGone, collect, embed_inputs, get_runner,
                                  outputs_or_error, plan_request, registry, read_json, start_job,
                                  status_of, with_keepalives)
from kvslim.server.scheduler import Job
from kvslim.server.schemas import ChatCompletionRequest, CompletionRequest, OpenAIEmbeddingRequest

router = APIRouter(prefix="/v1")

FINGERPRINT = "fp_kvslim"


def error_body(status: int, message: str, code: str | None = None) -> dict:
    """OpenAI's error object."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _check(req, *, extra: dict | None = None, max_tokens: int | None = None) -> None:
    if max_tokens is not None and max_tokens < 1:  # Ollama's -1/-2 are not OpenAI's
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}")
    if req.n not in (None, 1):
        raise APIError(400, "n must be 1: kvslim returns one choice per request")
    for what, value in (extra or {}).items():
        if value:
            raise APIError(400, f"{what} is not supported by kvslim")


def usage(job: Job) -> dict:
    seq = job.seq
    return {"prompt_tokens": seq.n_prompt, "completion_tokens": seq.n_generated,
            "total_tokens": seq.n_prompt + seq.n_generated,
            "prompt_tokens_details": {"cached_tokens": seq.stats.prompt_cache_count}}


def _finish_reason(job: Job) -> str:
    return "length" if job.seq.finish_reason == "length" else "stop"


async def _sse(job: Job, chunk, first: dict | None, include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events: ``data: {chunk}`` per text output, the finish, usage, ``[DONE]``;
    a ``: keep-alive`` comment (which SSE clients skip) while nothing comes."""
    if first is not None:
        yield _event(chunk(first, None))
    async for out in with_keepalives(outputs_or_error(job)):
        if out is None:
            yield b": keep-alive\n\n"
            continue
        if isinstance(out, Exception):
            yield _event(error_body(status_of(out), str(out)))
            break
        if out.text:
            yield _event(chunk(out.text, None))
        if out.finished:
            yield _event(chunk(None, _finish_reason(job)))
            if include_usage:
                yield _event(chunk(None, None, final_usage=True))
    yield b"data: [DONE]\n\n"


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def _respond(request: Request, job: Job, stream: bool, chunk, first, whole, include_usage):
    if stream:
        return StreamingResponse(_sse(job, chunk, first, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        text = await collect(job, request)
    except ClientGone:
        return PlainTextResponse("request canceled", status_code=499)
    return JSONResponse(whole(text))


def _text(content) -> str:
    """A message's content: a string, or the text of its content parts."""
    if content is None or isinstance(content, str):
        return content or ""
    kinds = {p.type for p in content} - {"text"}
    if kinds:
        raise APIError(400, f"content parts of type {', '.join(sorted(kinds))} are not supported")
    return "".join(p.text or "" for p in content)


@router.post("/chat/completions")
async def chat_completions(request: Request):
    req = await read_json(request, ChatCompletionRequest)
    registry(request).resolve(req.model)
    fmt = req.response_format and req.response_format.get("type") not in (None, "text")
    # 0 is "at least 1" (a 400, as OpenAI answers it), not "no limit"
    max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    _check(req, extra={"tools": req.tools, "logprobs": req.logprobs, "response_format": fmt},
           max_tokens=max_tokens)
    messages = [{"role": m.role, "content": _text(m.content)} for m in req.messages]
    runner, _ = await get_runner(request, req.model)
    params, cache = plan_request(runner, req.ollama_options(max_tokens))
    job = await start_job(runner, lambda: runner.chat_ids(messages, cache, params.max_tokens), params,
                          cache, True)
    cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def head(obj: str) -> dict:
        return {"id": cid, "object": obj, "created": created, "model": req.model,
                "system_fingerprint": FINGERPRINT}

    def chunk(text, reason, final_usage=False) -> dict:
        if final_usage:
            return head("chat.completion.chunk") | {"choices": [], "usage": usage(job)}
        delta = {} if text is None else {"role": "assistant", "content": text}
        body = head("chat.completion.chunk") | {
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        return body | ({"usage": None} if include_usage else {})

    def whole(text: str) -> dict:
        return head("chat.completion") | {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": _finish_reason(job)}],
            "usage": usage(job)}

    return await _respond(request, job, req.stream, chunk, "", whole, include_usage)


@router.post("/completions")
async def completions(request: Request):
    req = await read_json(request, CompletionRequest)
    registry(request).resolve(req.model)
    _check(req, extra={"suffix": req.suffix, "echo": req.echo, "logprobs": req.logprobs,
                       "best_of > 1": (req.best_of or 1) > 1}, max_tokens=req.max_tokens)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "prompt must be one string: kvslim answers one prompt per request")
        prompt = prompt[0]
    if not prompt:
        raise APIError(400, "prompt must not be empty")
    runner, _ = await get_runner(request, req.model)
    params, cache = plan_request(runner, req.ollama_options(req.max_tokens))
    ids_fn = (lambda: runner.text_ids(prompt)) if isinstance(prompt, str) else (lambda: list(prompt))
    job = await start_job(runner, ids_fn, params, cache, True)
    cid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def head() -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                "system_fingerprint": FINGERPRINT}

    def chunk(text, reason, final_usage=False) -> dict:
        if final_usage:
            return head() | {"choices": [], "usage": usage(job)}
        body = head() | {"choices": [{"index": 0, "text": text or "", "logprobs": None,
                                      "finish_reason": reason}]}
        return body | ({"usage": None} if include_usage else {})

    def whole(text: str) -> dict:
        return head() | {"choices": [{"index": 0, "text": text, "logprobs": None,
                                      "finish_reason": _finish_reason(job)}],
                         "usage": usage(job)}

    return await _respond(request, job, req.stream, chunk, None, whole, include_usage)


@router.post("/embeddings")
async def embeddings(request: Request):
    """Vectors of ``input`` (a string, strings, token ids or lists of them), L2-normalised
    as Ollama's /api/embed; ``encoding_format`` base64: little-endian float32 bytes."""
    req = await read_json(request, OpenAIEmbeddingRequest)
    registry(request).resolve(req.model)
    inputs = req.input
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not inputs or any(len(x) == 0 for x in inputs):
        raise APIError(400, "input must not be empty")
    runner, _ = await get_runner(request, req.model)
    vectors, n = await embed_inputs(runner, inputs, req.options, dimensions=req.dimensions)
    data = [{"object": "embedding", "index": i,
             "embedding": _b64(v) if req.encoding_format == "base64" else v}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": n, "total_tokens": n}}


def _b64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _model_object(name: str, path) -> dict:
    return {"id": name, "object": "model", "created": int(path.stat().st_mtime), "owned_by": "kvslim"}


@router.get("/models")
async def models(request: Request):
    reg = registry(request)
    data = await run_in_threadpool(lambda: [_model_object(n, p) for n, p in reg.available()])
    return {"object": "list", "data": data}


@router.get("/models/{model:path}")
async def model(request: Request, model: str):
    name, path = registry(request).resolve(model)
    return _model_object(name, path)
