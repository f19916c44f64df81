"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions (SSE streaming),
/v1/responses (text), /v1/embeddings, /v1/models.

Sampling defaults follow Ollama's OpenAI layer (temperature 1, top_p 1 when absent).
Ollama options, cache types included, can ride along as an extension ``options``
object (``extra_body={"options": {...}}`` in the openai client). ``usage`` reports
the prompt tokens served from the prefix cache as ``prompt_tokens_details.cached_tokens``.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import struct
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from kvslim.engine import StepOutput
from kvslim.server.common import (APIError, ClientGone, JobStream, chat_logprobs, embed_inputs,
                                  get_runner, outputs_or_error, plan_request, registry, read_json, start_job,
                                  status_of, token_text, unless_gone, with_keepalives,
                                  with_logprobs)
from kvslim.server.scheduler import Job
from kvslim.server.schemas import (ChatCompletionRequest, CompletionRequest, OpenAIEmbeddingRequest,
                                   ResponsesRequest)
from kvslim.server.structured import (history_message, one_grammar, openai_response_format,
                                      openai_tool_calls, plan_tools)

router = APIRouter(prefix="/v1")

FINGERPRINT = "fp_kvslim"


def error_body(status: int, message: str, code: str | None = None) -> dict:
    """OpenAI's error object."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _check(req, *, extra: dict | None = None, max_tokens: int | None = None) -> None:
    if max_tokens is not None and max_tokens < 1:  # Ollama's -1/-2 are not OpenAI's
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}")
    if req.n is not None and req.n < 1:
        raise APIError(400, f"n must be at least 1, got {req.n}")
    for what, value in (extra or {}).items():
        if value:
            raise APIError(400, f"{what} is not supported by kvslim")


def usage(jobs: list[Job]) -> dict:
    """Prompt tokens once per prompt (its n answers fork one prefill), completion tokens
    of every answer."""
    prompt = sum(j.seq.n_prompt for j in jobs)
    completion = sum(s.n_generated for j in jobs for s in j.seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(j.seq.stats.prompt_cache_count
                                                           for j in jobs)}}


def _finish_reason(seq, calls: list | None = None) -> str:
    if calls:
        return "tool_calls"
    return "length" if seq.finish_reason == "length" else "stop"


def _choices(jobs: list[Job]) -> list[tuple[int, object]]:
    """(index, sequence) of every answer: prompt i's j-th answer is choice i * n + j."""
    return [(i * j.ticket.n + k, s) for i, j in enumerate(jobs) for k, s in enumerate(j.seqs)]


async def _merged(jobs: list[Job]) -> AsyncIterator[tuple[Job, StepOutput | Exception]]:
    """The outputs of several jobs as they come; ends after the first error. Leaving
    early cancels every job that is still running."""
    if len(jobs) == 1:  # one prompt (its n answers included): read it directly, so that
        # leaving closes job.outputs() at once, as the Ollama routes do
        async with contextlib.aclosing(outputs_or_error(jobs[0])) as outputs:
            async for out in outputs:
                yield jobs[0], out
                if isinstance(out, Exception):
                    return
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(job: Job) -> None:  # cancelled: its outputs closed, the job cancelled
        async with contextlib.aclosing(outputs_or_error(job)) as outputs:
            async for out in outputs:
                await queue.put((job, out))
        await queue.put((job, None))

    tasks = [asyncio.ensure_future(pump(j)) for j in jobs]
    try:
        left = len(jobs)
        while left:
            job, out = await queue.get()
            if out is None:
                left -= 1
                continue
            yield job, out
            if isinstance(out, Exception):
                return
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)  # every job cancelled before this generator is closed


async def _sse(jobs: list[Job], chunk, first: dict | None, include_usage: bool,
               tools=None) -> AsyncIterator[bytes]:
    """Server-sent events: ``data: {chunk}`` per text output of each choice, its finish,
    usage, ``[DONE]``; a ``: keep-alive`` comment (which SSE clients skip) while nothing comes.
    ``tools`` (a ``ToolCallStream``, one choice only): text that may be a call is held
    back; calls come in one chunk (``chunk(index, text, None, calls=...)``) before the finish."""
    if first is not None:
        for index in range(sum(j.ticket.n for j in jobs)):
            yield _event(chunk(index, first, None))
    async with contextlib.aclosing(with_keepalives(_merged(jobs))) as items:
        async for item in items:
            if item is None:
                yield b": keep-alive\n\n"
                continue
            job, out = item
            if isinstance(out, Exception):
                yield _event(error_body(status_of(out), str(out)))
                break
            index = jobs.index(job) * job.ticket.n + job.seqs.index(out.seq)
            text = tools.push(out.text) if tools is not None and out.text else out.text
            if text or out.logprobs:
                yield _event(chunk(index, text, None, out))
            if out.finished:
                calls = None
                if tools is not None:
                    text, calls = tools.finish()
                    if text or calls:
                        yield _event(chunk(index, text, None, calls=calls))
                yield _event(chunk(index, None, _finish_reason(out.seq, calls)))
        else:
            if include_usage:
                yield _event(chunk(None, None, None, final_usage=True))
    yield b"data: [DONE]\n\n"


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def _finish_all(jobs: list[Job], request: Request) -> None:
    """Wait until every job ends; ClientGone (and the jobs cancelled) if the client leaves."""
    async def drain() -> None:
        async for _, out in _merged(jobs):
            if isinstance(out, Exception):
                raise out

    await unless_gone(drain(), request)


async def _respond(request: Request, jobs: list[Job], stream: bool, chunk, first, whole,
                   include_usage, tools=None):
    if stream:
        return JobStream(_sse(jobs, chunk, first, include_usage, tools),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        await _finish_all(jobs, request)
    except ClientGone:
        return PlainTextResponse("request canceled", status_code=499)
    return JSONResponse(whole())


def _text(content) -> str:
    """A message's content: a string, or the text of its content parts."""
    if content is None or isinstance(content, str):
        return content or ""
    kinds = {p.type for p in content} - {"text"}
    if kinds:
        raise APIError(400, f"content parts of type {', '.join(sorted(kinds))} are not supported")
    return "".join(p.text or "" for p in content)


# ---------------------------------------------------------------- logprobs


def completion_logprobs(tokenizer, ids: list[int], lps: list, offset: int = 0) -> dict:
    """The legacy completions' logprobs object (``text_offset`` from ``offset``)."""
    tokens = [token_text(tokenizer, t)[0] for t in ids]
    offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in lps],
            "top_logprobs": [_top_dict(tokenizer, top) for _, top in lps],
            "text_offset": offsets}


def _top_dict(tokenizer, top: list[tuple[int, float]]) -> dict[str, float]:
    """{token text: logprob}; tokens of the same text (partial UTF-8) keep the likeliest."""
    out: dict[str, float] = {}
    for tid, lp in top:
        out.setdefault(token_text(tokenizer, tid)[0], lp)
    return out


# ---------------------------------------------------------------- routes


@router.post("/chat/completions")
async def chat_completions(request: Request):
    req = await read_json(request, ChatCompletionRequest)
    registry(request).resolve(req.model)
    # 0 is "at least 1" (a 400, as OpenAI answers it), not "no limit"
    max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    _check(req, max_tokens=max_tokens)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs to be true")
    tools = plan_tools(req.tools, req.tool_choice)
    grammar = one_grammar(tools, openai_response_format(req.response_format))
    if (req.n or 1) > 1 and (tools.parse or grammar is not None):
        raise APIError(400, "n > 1 cannot be combined with tools or response_format")
    # OpenAI's newer "developer" role is the system prompt of chat templates
    messages = [history_message("system" if m.role == "developer" else m.role, _text(m.content),
                                m.tool_calls, tool_call_id=m.tool_call_id, name=m.name)
                for m in req.messages]
    runner, _ = await get_runner(request, req.model)
    params, cache = plan_request(runner, req.ollama_options(max_tokens))
    params = with_logprobs(params, (req.top_logprobs or 0) if req.logprobs else None)
    job = await start_job(runner, lambda: runner.chat_ids(messages, cache, params.max_tokens, tools.tools),
                          params, cache, True, grammar, n=req.n or 1)
    cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    tok = runner.tokenizer

    def head(obj: str) -> dict:
        return {"id": cid, "object": obj, "created": created, "model": req.model,
                "system_fingerprint": FINGERPRINT}

    def chunk(index, text, reason, out=None, final_usage=False, calls=None) -> dict:
        if final_usage:
            return head("chat.completion.chunk") | {"choices": [], "usage": usage([job])}
        delta = {} if text is None else {"role": "assistant", "content": text}
        if calls:
            delta["tool_calls"] = openai_tool_calls(calls, stream=True)
        lp = {"content": chat_logprobs(tok, out.token_ids, out.logprobs)} if out and out.logprobs else None
        body = head("chat.completion.chunk") | {
            "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}]}
        return body | ({"usage": None} if include_usage else {})

    def whole() -> dict:
        def logprobs(s):
            return {"content": chat_logprobs(tok, s.output_ids, s.logprobs), "refusal": None} \
                if params.logprobs is not None else None

        def choice(i: int, s) -> dict:
            content, calls = tools.split(s.text)
            message = {"role": "assistant", "content": content or (None if calls else "")}
            if calls:
                message["tool_calls"] = openai_tool_calls(calls)
            return {"index": i, "message": message, "logprobs": logprobs(s),
                    "finish_reason": _finish_reason(s, calls)}
        return head("chat.completion") | {"choices": [choice(i, s) for i, s in _choices([job])],
                                          "usage": usage([job])}

    return await _respond(request, [job], req.stream, chunk, "", whole, include_usage,
                          tools.stream())


@router.post("/responses")
async def responses(request: Request):
    """The Responses API for text: ``input`` (a string or message items), ``instructions``
    (the system prompt), ``max_output_tokens``, sampling fields; streamed as its events."""
    req = await read_json(request, ResponsesRequest)
    registry(request).resolve(req.model)
    fmt = ((req.text or {}).get("format") or {}).get("type") not in (None, "text")
    _check(req, extra={"tools": req.tools, "previous_response_id": req.previous_response_id,
                       "text.format": fmt}, max_tokens=req.max_output_tokens)
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + \
        _input_messages(req.input)
    runner, _ = await get_runner(request, req.model)
    params, cache = plan_request(runner, req.ollama_options(req.max_output_tokens))
    job = await start_job(runner, lambda: runner.chat_ids(messages, cache, params.max_tokens), params,
                          cache, True)
    rid, mid, created = "resp_" + secrets.token_hex(12), "msg_" + secrets.token_hex(12), int(time.time())

    def response(status: str, text: str | None) -> dict:
        done = status != "in_progress"
        item = {"type": "message", "id": mid, "status": "completed", "role": "assistant",
                "content": [_output_text(text)]}
        body = {"id": rid, "object": "response", "created_at": created, "status": status,
                "model": req.model, "output": [item] if done else [], "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
                "temperature": req.temperature, "top_p": req.top_p, "parallel_tool_calls": False,
                "tool_choice": "none", "tools": [], "store": False}
        if done:
            u = usage([job])
            body["usage"] = {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                             "total_tokens": u["total_tokens"],
                             "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"]},
                             "output_tokens_details": {"reasoning_tokens": 0}}
        return body

    def status() -> str:
        return "incomplete" if job.seq.finish_reason == "length" else "completed"

    if req.stream:
        return JobStream(_response_events(job, response, status, mid),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        await _finish_all([job], request)
    except ClientGone:
        return PlainTextResponse("request canceled", status_code=499)
    return JSONResponse(response(status(), job.seq.text))


def _output_text(text: str | None) -> dict:
    return {"type": "output_text", "text": text or "", "annotations": []}


def _input_messages(items) -> list[dict]:
    """Chat messages from a Responses ``input``: a string (one user turn) or message items
    whose content is a string or input_text / output_text parts."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out = []
    for item in items:
        kind, role, content = item.get("type", "message"), item.get("role"), item.get("content")
        if kind != "message" or not isinstance(role, str):
            raise APIError(400, f"input items of type {kind!r} are not supported: kvslim takes "
                                f"messages with a role")
        if isinstance(content, list):
            bad = sorted({str(p.get("type")) for p in content if isinstance(p, dict)}
                         - {"input_text", "output_text"})
            if bad or not all(isinstance(p, dict) for p in content):
                raise APIError(400, f"content parts of type {', '.join(bad) or '?'} are not supported")
            content = "".join(str(p.get("text") or "") for p in content)
        if not isinstance(content, str):
            raise APIError(400, "a message's content must be a string or a list of text parts")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if not out:
        raise APIError(400, "input must not be empty")
    return out


async def _response_events(job: Job, response, status, mid: str) -> AsyncIterator[bytes]:
    """The Responses API's server-sent events for one text message."""
    seq_no = iter(range(1 << 62))

    def event(kind: str, **fields) -> bytes:
        body = {"type": kind, "sequence_number": next(seq_no), **fields}
        return f"event: {kind}\ndata: ".encode() + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    yield event("response.created", response=response("in_progress", None))
    yield event("response.output_item.added", output_index=0,
                item={"type": "message", "id": mid, "status": "in_progress", "role": "assistant",
                      "content": []})
    yield event("response.content_part.added", part=_output_text(""), **where)
    text = ""
    async with contextlib.aclosing(with_keepalives(outputs_or_error(job))) as items:
        async for item in items:
            if item is None:
                yield b": keep-alive\n\n"
                continue
            if isinstance(item, Exception):
                yield event("error", code=None, message=str(item), param=None)
                return
            if item.text:
                text += item.text
                yield event("response.output_text.delta", delta=item.text, logprobs=[], **where)
    yield event("response.output_text.done", text=text, logprobs=[], **where)
    yield event("response.content_part.done", part=_output_text(text), **where)
    done = response(status(), text)
    yield event("response.output_item.done", output_index=0, item=done["output"][0])
    yield event("response.completed" if done["status"] == "completed" else "response.incomplete",
                response=done)


def _prompts(prompt) -> list:
    """The prompts of a completions request: one string or token-id list, or a list of them."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt or any(len(p) == 0 for p in prompt):
        raise APIError(400, "prompt must not be empty")
    return prompt


@router.post("/completions")
async def completions(request: Request):
    req = await read_json(request, CompletionRequest)
    registry(request).resolve(req.model)
    _check(req, extra={"suffix": req.suffix, "echo": req.echo,
                       "best_of > 1": (req.best_of or 1) > 1}, max_tokens=req.max_tokens)
    prompts = _prompts(req.prompt)
    runner, _ = await get_runner(request, req.model)
    params, cache = plan_request(runner, req.ollama_options(req.max_tokens))
    params = with_logprobs(params, req.logprobs)
    jobs: list[Job] = []
    try:
        for i, prompt in enumerate(prompts):
            if i:
                runner.claim(None)  # each start_job ends one claim
            ids_fn = (lambda p=prompt: runner.text_ids(p)) if isinstance(prompt, str) \
                else (lambda p=prompt: list(p))
            jobs.append(await start_job(runner, ids_fn, params, cache, True, n=req.n or 1))
    except BaseException:
        for job in jobs:  # one prompt refused: the others go too
            job.scheduler.cancel(job.ticket)
        raise
    cid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    tok, offsets = runner.tokenizer, {}

    def head() -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                "system_fingerprint": FINGERPRINT}

    def chunk(index, text, reason, out=None, final_usage=False) -> dict:
        if final_usage:
            return head() | {"choices": [], "usage": usage(jobs)}
        lp = None
        if out is not None and out.logprobs:
            lp = completion_logprobs(tok, out.token_ids, out.logprobs, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lp["tokens"])
        body = head() | {"choices": [{"index": index, "text": text or "", "logprobs": lp,
                                      "finish_reason": reason}]}
        return body | ({"usage": None} if include_usage else {})

    def whole() -> dict:
        def logprobs(s):
            return completion_logprobs(tok, s.output_ids, s.logprobs) if params.logprobs is not None \
                else None
        return head() | {"choices": [{"index": i, "text": s.text, "logprobs": logprobs(s),
                                      "finish_reason": _finish_reason(s)} for i, s in _choices(jobs)],
                         "usage": usage(jobs)}

    return await _respond(request, jobs, req.stream, chunk, None, whole, include_usage)


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
