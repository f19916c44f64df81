"""Ollama's REST API (docs/api.md): generate, chat, embed, embeddings, tags, show, pull,
delete, copy, create, ps, version.

Responses carry Ollama's fields and final statistics (durations in nanoseconds), plus
``prompt_cache_count``: prompt tokens whose K/V came from the prefix cache instead of
being evaluated (``prompt_eval_count`` counts the whole prompt, as Ollama's does).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
from pathlib import Path
from typing import AsyncIterator

import gguf
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

import kvslim
from kvslim import modelfile, store
from kvslim.gguf_loader import ModelConfig, open_gguf
from kvslim.server.common import (APIError, ClientGone, JobStream, chat_logprobs, collect,
                                  embed_inputs, get_runner, keep_alive_seconds, ns, outputs_or_error, plan_request,
                                  registry, read_json, start_job, timestamp, with_keepalives,
                                  with_logprobs)
from kvslim.server.models import Runner, model_details
from kvslim.server.scheduler import Job
from kvslim.server.schemas import (ChatRequest, CopyRequest, CreateRequest, EmbeddingsRequest,
                                   EmbedRequest, GenerateRequest, ModelRequest)
from kvslim.server.structured import history_message, ollama_format, ollama_tool_calls, plan_tools

router = APIRouter()

NDJSON = "application/x-ndjson"


def tagged(name: str) -> str:
    """Ollama's names carry a tag; an untagged name is ``:latest``."""
    return name if ":" in name else f"{name}:latest"


# ---------------------------------------------------------------- generation


def _unsupported(model: str, *, images=None, suffix="", template="", think=None) -> None:
    """APIError(400) for features this server does not have, in Ollama's words where it has them."""
    if images:
        raise APIError(400, f'"{model}" does not support images')
    if suffix:
        raise APIError(400, f'"{model}" does not support insert')
    if think not in (None, False):
        raise APIError(400, f'"{model}" does not support thinking')
    if template:
        raise APIError(400, "a custom template is not supported: kvslim renders the model's own "
                            "chat template")


async def _load_or_unload(request: Request, model: str, keep_alive, chat: bool) -> JSONResponse:
    """Ollama's empty request: load the model, or with keep_alive 0 unload it."""
    reg = registry(request)
    if keep_alive_seconds(keep_alive) == 0:
        reg.resolve(model)  # 404 for an unknown model
        if not await run_in_threadpool(reg.unload, model) and _is_loaded(reg, model):
            _unload_when_idle(reg, model)  # others are using it: it goes when they are done
        reason = "unload"
    else:
        runner, _ = await get_runner(request, model, keep_alive)
        runner.release()  # no job follows
        reason = "load"
    body = {"model": model, "created_at": timestamp()}
    body |= {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    return JSONResponse(body | {"done": True, "done_reason": reason})


_UNLOADS: dict[str, asyncio.Task] = {}  # model -> its pending unload (referenced until done)
UNLOAD_POLL_S = 0.05


def _unload_when_idle(reg, model: str) -> None:
    """Unload ``model`` at the first moment no request runs or waits on it, as Ollama
    does with keep_alive 0: one client's unload never cuts another's answer short."""
    name = reg.canonical(model)
    if name in _UNLOADS:
        return

    async def wait_and_unload():
        try:
            while _is_loaded(reg, name) and not await run_in_threadpool(reg.unload, name):
                await asyncio.sleep(UNLOAD_POLL_S)
        finally:
            _UNLOADS.pop(name, None)

    _UNLOADS[name] = asyncio.get_running_loop().create_task(wait_and_unload())


def _is_loaded(reg, model: str) -> bool:
    return any(r.name == reg.canonical(model) for r in reg.loaded())


def final_stats(job: Job, load: float) -> dict:
    """Ollama's closing statistics of a finished job."""
    seq, t = job.seq, job.ticket
    s = seq.stats
    return {
        "done": True, "done_reason": seq.finish_reason,
        "total_duration": ns(time.perf_counter() - t.created + load),
        "load_duration": ns(load + t.load_duration),
        "prompt_eval_count": seq.n_prompt, "prompt_eval_duration": ns(s.prompt_eval_duration),
        "eval_count": s.eval_count, "eval_duration": ns(s.eval_duration),
        "prompt_cache_count": s.prompt_cache_count,
    }


async def _ndjson(job: Job, piece, final, logprobs, tools=None) -> AsyncIterator[bytes]:
    """One JSON object per line: a piece per text output (with its tokens' ``logprobs``
    when asked), then the final statistics.

    While nothing comes (a long prefill), an empty piece now and then keeps proxies from
    closing the stream: Ollama's clients parse every line as JSON (a blank line breaks
    the official Python client) and already meet empty pieces from Ollama itself.
    ``tools`` (a ``ToolCallStream``): text that may be a tool call is held back, and
    the calls come in one piece (``piece(text, calls)``) before the statistics."""
    async with contextlib.aclosing(with_keepalives(outputs_or_error(job))) as items:
        async for out in items:
            if out is None:
                yield _line(piece(""))
                continue
            if isinstance(out, Exception):
                yield _line({"error": str(out)})
                return
            text = tools.push(out.text) if tools is not None and out.text else out.text
            if text or out.logprobs:
                yield _line(piece(text) | logprobs(out.token_ids, out.logprobs))
            if out.finished:
                if tools is not None:
                    text, calls = tools.finish()
                    if text or calls:
                        yield _line(piece(text, calls))
                yield _line(final())


def _line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


async def _answer(request: Request, job: Job, stream: bool, piece, final, whole,
                  tokenizer, tools=None) -> object:
    def logprobs(ids: list[int], lps: list | None) -> dict:
        return {"logprobs": chat_logprobs(tokenizer, ids, lps or [])} \
            if job.ticket.params.logprobs is not None else {}

    if stream:
        return JobStream(_ndjson(job, piece, final, logprobs, tools), media_type=NDJSON)
    try:
        text = await collect(job, request)
    except ClientGone:
        return PlainTextResponse("request canceled", status_code=499)
    return JSONResponse(whole(text) | logprobs(job.seq.output_ids, job.seq.logprobs))


def _logprobs(req) -> int | None:
    """Ollama's ``logprobs`` / ``top_logprobs`` as SamplingParams.logprobs."""
    return (req.top_logprobs or 0) if req.logprobs else None


@router.post("/api/generate")
async def generate(request: Request):
    req = await read_json(request, GenerateRequest)
    if not req.model:
        raise APIError(400, "model is required")
    if not req.prompt and not req.context:
        return await _load_or_unload(request, req.model, req.keep_alive, chat=False)
    registry(request).resolve(req.model)  # 404 before anything else
    _unsupported(req.model, images=req.images, suffix=req.suffix, template=req.template,
                 think=req.think)
    if req.raw and (req.system or req.context):
        raise APIError(400, "raw mode does not support template, system, or context")
    grammar = ollama_format(req.format)
    runner, load = await get_runner(request, req.model, req.keep_alive)
    params, cache = plan_request(runner, req.options)
    params = with_logprobs(params, _logprobs(req))
    job = await start_job(runner, lambda: _generate_ids(runner, req), params, cache, req.truncate,
                          grammar)

    def head(**fields) -> dict:
        return {"model": req.model, "created_at": timestamp(), **fields}

    def final(response: str = "") -> dict:
        body = head(response=response) | final_stats(job, load)
        if not req.raw:  # Ollama: "raw mode will not return a context"
            body["context"] = job.seq.token_ids[:job.seq.n_prompt] + job.seq.output_ids
        return body

    return await _answer(request, job, req.stream, lambda text: head(response=text, done=False),
                         final, final, runner.tokenizer)


def _generate_ids(runner: Runner, req: GenerateRequest) -> list[int]:
    """Prompt ids: the text as is (raw) or as a user turn of the chat template, after any
    ``context`` ids of an earlier answer."""
    if req.raw:
        return runner.text_ids(req.prompt)
    turns = ([{"role": "system", "content": req.system}] if req.system else []) + \
        [{"role": "user", "content": req.prompt}]
    ids = runner.chat_ids(turns)
    if req.context:
        bos = runner.tokenizer.bos_id
        ids = list(req.context) + (ids[1:] if ids and ids[0] == bos else ids)
    return ids


@router.post("/api/chat")
async def chat(request: Request):
    req = await read_json(request, ChatRequest)
    if not req.model:
        raise APIError(400, "model is required")
    if not req.messages:
        return await _load_or_unload(request, req.model, req.keep_alive, chat=True)
    registry(request).resolve(req.model)
    _unsupported(req.model, images=any(m.images for m in req.messages), think=req.think)
    grammar, tools = ollama_format(req.format), plan_tools(req.tools)
    runner, load = await get_runner(request, req.model, req.keep_alive)
    params, cache = plan_request(runner, req.options)
    params = with_logprobs(params, _logprobs(req))
    messages = [history_message(m.role, m.content, m.tool_calls, tool_name=m.tool_name)
                for m in req.messages]
    fit = cache if req.truncate else None  # truncate false: a long chat is a 400
    job = await start_job(runner, lambda: runner.chat_ids(messages, fit, params.max_tokens, tools.tools),
                          params, cache, req.truncate, grammar)

    def head(content: str, calls=None, **fields) -> dict:
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = ollama_tool_calls(calls)
        return {"model": req.model, "created_at": timestamp(), "message": message, **fields}

    def whole(text: str) -> dict:
        content, calls = tools.split(text)
        return head(content, calls) | final_stats(job, load)

    return await _answer(request, job, req.stream,
                         lambda text, calls=None: head(text, calls, done=False),
                         lambda: head("") | final_stats(job, load), whole, runner.tokenizer,
                         tools.stream())


# ---------------------------------------------------------------- embeddings


@router.post("/api/embed")
async def embed(request: Request):
    """Vectors of ``input`` (a string or a list): pooled final hidden states, L2-normalised;
    ``dimensions`` keeps the first values (renormalised); ``truncate`` false makes an input
    longer than num_ctx a 400 instead of cutting its end."""
    t0 = time.perf_counter()
    req = await read_json(request, EmbedRequest)
    if not req.model:
        raise APIError(400, "model is required")
    registry(request).resolve(req.model)
    inputs = [req.input] if isinstance(req.input, str) and req.input else \
        [] if isinstance(req.input, str) else req.input
    runner, load = await get_runner(request, req.model, req.keep_alive)
    vectors, n = await embed_inputs(runner, inputs, req.options, truncate=req.truncate,
                                    dimensions=req.dimensions)
    return {"model": req.model, "embeddings": vectors,
            "total_duration": ns(time.perf_counter() - t0), "load_duration": ns(load),
            "prompt_eval_count": n}


@router.post("/api/embeddings")
async def embeddings(request: Request):
    """Ollama's older route: one ``prompt``, its vector as the model gives it (not normalised)."""
    req = await read_json(request, EmbeddingsRequest)
    if not req.model:
        raise APIError(400, "model is required")
    registry(request).resolve(req.model)
    runner, _ = await get_runner(request, req.model, req.keep_alive)
    if not req.prompt:  # Ollama answers an empty prompt with an empty vector
        runner.release()
        return {"embedding": []}
    vectors, _ = await embed_inputs(runner, [req.prompt], req.options, normalize=False)
    return {"embedding": vectors[0]}


# ---------------------------------------------------------------- models


def _describe(path: Path) -> tuple[ModelConfig, gguf.GGUFReader]:
    reader = open_gguf(path)
    return ModelConfig.from_gguf(reader), reader


@functools.lru_cache(maxsize=64)
def _config(path: Path, mtime: float) -> ModelConfig:
    """A file's config, read once per version of the file (listing reads every model)."""
    return _describe(path)[0]


def _listing(reg, name: str, path: Path) -> dict:
    st = path.stat()
    config = _config(path, st.st_mtime)
    return {"name": tagged(name), "model": tagged(name), "modified_at": timestamp(st.st_mtime),
            "size": st.st_size, "digest": reg.digest(path), "details": model_details(config)}


@router.get("/api/tags")
async def tags(request: Request):
    reg = registry(request)
    models = await run_in_threadpool(lambda: [_listing(reg, n, p) for n, p in reg.available()])
    return {"models": models}


@router.post("/api/show")
async def show(request: Request):
    req = await read_json(request, ModelRequest)
    if not req.model_name:
        raise APIError(400, "model is required")
    reg = registry(request)
    name, path = reg.resolve(req.model_name)
    return await run_in_threadpool(_show, name, path, req.verbose)


def _show(name: str, path: Path, verbose: bool) -> dict:
    """Ollama's show answer; the model's name stands where a path would disclose the store."""
    config, reader = _describe(path)
    info = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        big_array = field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > 64
        info[key] = [] if big_array and not verbose else field.contents()
    card = store.card(path)  # a Modelfile's or the registry's additions
    template = card.template or info.get("tokenizer.chat_template") or ""
    extra = {"system": card.system} if card.system else {}
    return {
        "license": card.license or info.get("general.license", ""),
        "modelfile": modelfile.render(tagged(name), card),
        "parameters": modelfile.render_parameters(card),
        "template": template,
        **extra,
        "details": model_details(config),
        "model_info": info,
        "capabilities": ["completion", "tools"],  # tools: through the template or kvslim.chat's prompt
        "modified_at": timestamp(path.stat().st_mtime),
    }


class _PullCancelled(Exception):
    """The client of a streamed pull left: the download stops (its bytes stay, to resume)."""


@router.post("/api/pull")
async def pull(request: Request):
    """Ollama's pull: the registry, hf.co/USER/REPO[:QUANT] or a built-in model; the stream
    sends Ollama's progress lines (status, digest, total, completed)."""
    from kvslim import pull as pulls

    req = await read_json(request, ModelRequest)
    name = req.model_name
    if not name:
        raise APIError(400, "model is required")
    try:
        store.check_name(name)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    if not req.stream:
        try:
            await run_in_threadpool(pulls.pull, name)
        except store.PullError as e:
            raise APIError(404 if "not found" in str(e) else 500, str(e)) from None
        return {"status": "success"}

    loop, lines, gone = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

    def report(line: dict) -> None:
        if gone.is_set():
            raise _PullCancelled()
        loop.call_soon_threadsafe(lines.put_nowait, line)

    job = loop.run_in_executor(None, functools.partial(pulls.pull, name, report))
    job.add_done_callback(lambda f: f.cancelled() or f.exception())  # read even if the client left

    async def progress() -> AsyncIterator[bytes]:
        try:
            while True:
                getter = asyncio.ensure_future(lines.get())
                await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield _line(getter.result())
                    continue
                getter.cancel()
                while not lines.empty():
                    yield _line(lines.get_nowait())
                if job.exception() is not None:  # the status lines are sent: report in the stream
                    yield _line({"error": str(job.exception())})
                return
        finally:
            gone.set()

    return StreamingResponse(progress(), media_type=NDJSON)


@router.delete("/api/delete")
async def delete(request: Request):
    req = await read_json(request, ModelRequest)
    name = req.model_name
    if not name:
        raise APIError(400, "model is required")
    reg = registry(request)
    if store.find(name) is None:
        raise APIError(404, f"model '{name}' not found")
    reg.unload(name)  # an idle loaded copy goes too; a busy one finishes from the open file
    await run_in_threadpool(store.remove, name)
    return PlainTextResponse("")


@router.post("/api/copy")
async def copy(request: Request):
    req = await read_json(request, CopyRequest)
    if not req.source or not req.destination:
        raise APIError(400, "source and destination are required")
    reg = registry(request)
    _, path = reg.resolve(req.source)  # the server's names and the store's, never a file path
    try:
        store.check_name(req.destination)
        await run_in_threadpool(store.copy_model, str(path), req.destination, store.card(path))
    except ValueError as e:
        raise APIError(400, str(e)) from None
    reg.unload(req.destination)  # an idle loaded model of that name reloads as the copy
    return PlainTextResponse("")


@router.post("/api/create")
async def create(request: Request):
    """Ollama's create: ``modelfile`` text, or ``from`` with template/system/parameters/license;
    FROM names a served model (never a file path)."""
    req = await read_json(request, CreateRequest)
    name = req.model_name
    if not name:
        raise APIError(400, "model is required")
    for field_, what in (("files", "files (GGUF blobs)"), ("adapters", "adapters"),
                         ("messages", "messages"), ("quantize", "quantize")):
        if getattr(req, field_):
            raise APIError(400, f"create with {what} is not supported by kvslim")
    try:
        store.check_name(name)
        mf = _modelfile(req)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    reg = registry(request)
    _, path = reg.resolve(mf.source)
    mf.source = str(path)
    try:
        await run_in_threadpool(modelfile.create, name, mf)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    reg.unload(name)
    done = [{"status": "writing manifest"}, {"status": "success"}]
    if not req.stream:
        return done[-1]
    return StreamingResponse(iter([_line(d) for d in done]), media_type=NDJSON)


def _modelfile(req: CreateRequest) -> modelfile.Modelfile:
    if req.modelfile:
        return modelfile.parse(req.modelfile)
    if not req.from_:
        raise ValueError("'from' (or a modelfile) is required")
    lic = "\n".join(req.license) if isinstance(req.license, list) else req.license
    return modelfile.Modelfile(source=req.from_, template=req.template, system=req.system,
                               license=lic,
                               parameters=modelfile.check_parameters(req.parameters or {}))


@router.get("/api/ps")
async def ps(request: Request):
    reg = registry(request)
    return {"models": await run_in_threadpool(lambda: [ps_entry(reg, r) for r in reg.loaded()])}


def ps_entry(reg, runner: Runner) -> dict:
    """Ollama's running-model entry, plus the K/V pool, attention path and request counts."""
    snap = runner.scheduler.snapshot
    size = runner.weight_bytes + sum(p["bytes"] for p in snap["pools"])
    on_cpu = runner.device.type == "cpu"
    counters = dict(runner.scheduler.counters)
    return {
        "name": tagged(runner.name), "model": tagged(runner.name), "size": size,
        "digest": reg.digest(runner.path), "details": model_details(runner.config),
        "size_vram": 0 if on_cpu else size, "context_length": snap["num_ctx"],
        "expires_at": timestamp(runner.expires_at()),
        "device": snap["device"], "num_parallel": snap["num_parallel"],
        "kv_cache": _kv_cache(snap),  # the pool that took the latest request
        "kv_pools": [_kv_cache(p) | {"running": p["running"], "waiting": p["waiting"]}
                     for p in snap["pools"]],  # every pool (type pair) of the model
        **{k: snap[k] for k in ("kv_auto", "kv_max_kld", "kv_measured_kld") if k in snap},
        "attention": {"backend": snap["backend"], "fused": snap["fused"],
                      "flash_attn": snap["flash_attn"]},
        "requests": {"running": snap["running"], "waiting": runner.scheduler.waiting(),
                     **counters},
    }


def _kv_cache(pool: dict) -> dict:
    return {k: pool[k] for k in (
        "type_k", "type_v", "requested_k", "requested_v", "fallback", "reason", "bytes",
        "bytes_per_token", "capacity_tokens", "page_size", "pages_total", "pages_in_use",
        "pages_sequences", "pages_prefix_cache", "prefix_cache_entries",
        "prefix_cache_tokens", "prefix_cache_evictions", "kv_rotation", "kv_centering",
        "kv_rounding", "kv_codec_note", "prefix_cache_files_written",
        "prefix_cache_files_restored")} \
        | {k: pool[k] for k in ("window", "window_bytes_per_sequence", "window_pages_total",
                                "window_pages_in_use") if k in pool}


@router.get("/api/version")
async def version():
    return {"version": kvslim.__version__}


@router.get("/")
@router.head("/")
async def root():
    return PlainTextResponse("kvslim is running")
