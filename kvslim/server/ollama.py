"""Ollama's REST API (docs/api.md): generate, chat, tags, show, pull, ps, version.

Responses carry Ollama's fields and final statistics (durations in nanoseconds), plus
``prompt_cache_count``: prompt tokens whose K/V came from the prefix cache instead of
being evaluated (``prompt_eval_count`` counts the whole prompt, as Ollama's does).
"""
from __future__ import annotations

import asyncio
import functools
import json
import time
from pathlib import Path
from typing import AsyncIterator

import gguf
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

import kvslim
from kvslim import store
from kvslim.gguf_loader import ModelConfig, open_gguf
from kvslim.server.common import (APIError, ClientGone, collect, get_runner, keep_alive_seconds, ns,
                                  outputs_or_error, plan_request, registry, read_json, start_job,
                                  timestamp, with_keepalives)
from kvslim.server.models import Runner, model_details
from kvslim.server.scheduler import Job
from kvslim.server.schemas import ChatRequest, GenerateRequest, ModelRequest

router = APIRouter()

NDJSON = "application/x-ndjson"


def tagged(name: str) -> str:
    """Ollama's names carry a tag; an untagged name is ``:latest``."""
    return name if ":" in name else f"{name}:latest"


# ---------------------------------------------------------------- generation


def _unsupported(model: str, *, images=None, suffix="", fmt=None, template="", tools=None,
                 think=None) -> None:
    """APIError(400) for features this server does not have, in Ollama's words where it has them."""
    if images:
        raise APIError(400, f'"{model}" does not support images')
    if suffix:
        raise APIError(400, f'"{model}" does not support insert')
    if tools:
        raise APIError(400, f'"{model}" does not support tools')
    if think not in (None, False):
        raise APIError(400, f'"{model}" does not support thinking')
    if fmt not in (None, ""):
        raise APIError(400, "format (JSON mode and structured outputs) is not supported by kvslim")
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


async def _ndjson(job: Job, piece, final) -> AsyncIterator[bytes]:
    """One JSON object per line: a piece per text output, then the final statistics.

    While nothing comes (a long prefill), an empty piece now and then keeps proxies from
    closing the stream: Ollama's clients parse every line as JSON (a blank line breaks
    the official Python client) and already meet empty pieces from Ollama itself."""
    async for out in with_keepalives(outputs_or_error(job)):
        if out is None:
            yield _line(piece(""))
            continue
        if isinstance(out, Exception):
            yield _line({"error": str(out)})
            return
        if out.text:
            yield _line(piece(out.text))
        if out.finished:
            yield _line(final())


def _line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


async def _answer(request: Request, job: Job, stream: bool, piece, final, whole) -> object:
    if stream:
        return StreamingResponse(_ndjson(job, piece, final), media_type=NDJSON)
    try:
        text = await collect(job, request)
    except ClientGone:
        return PlainTextResponse("request canceled", status_code=499)
    return JSONResponse(whole(text))


@router.post("/api/generate")
async def generate(request: Request):
    req = await read_json(request, GenerateRequest)
    if not req.model:
        raise APIError(400, "model is required")
    if not req.prompt and not req.context:
        return await _load_or_unload(request, req.model, req.keep_alive, chat=False)
    registry(request).resolve(req.model)  # 404 before anything else
    _unsupported(req.model, images=req.images, suffix=req.suffix, fmt=req.format,
                 template=req.template, think=req.think)
    if req.raw and (req.system or req.context):
        raise APIError(400, "raw mode does not support template, system, or context")
    runner, load = await get_runner(request, req.model, req.keep_alive)
    params, cache = plan_request(runner, req.options)
    job = await start_job(runner, lambda: _generate_ids(runner, req), params, cache, req.truncate)

    def head(**fields) -> dict:
        return {"model": req.model, "created_at": timestamp(), **fields}

    def final(response: str = "") -> dict:
        body = head(response=response) | final_stats(job, load)
        if not req.raw:  # Ollama: "raw mode will not return a context"
            body["context"] = job.seq.token_ids[:job.seq.n_prompt] + job.seq.output_ids
        return body

    return await _answer(request, job, req.stream, lambda text: head(response=text, done=False),
                         final, final)


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
    _unsupported(req.model, images=any(m.images for m in req.messages), fmt=req.format,
                 tools=req.tools, think=req.think)
    runner, load = await get_runner(request, req.model, req.keep_alive)
    params, cache = plan_request(runner, req.options)
    messages = [{"role": m.role, "content": m.content} for m in req.messages]
    fit = cache if req.truncate else None  # truncate false: a long chat is a 400
    job = await start_job(runner, lambda: runner.chat_ids(messages, fit, params.max_tokens), params,
                          cache, req.truncate)

    def head(content: str, **fields) -> dict:
        return {"model": req.model, "created_at": timestamp(),
                "message": {"role": "assistant", "content": content}, **fields}

    return await _answer(request, job, req.stream, lambda text: head(text, done=False),
                         lambda: head("") | final_stats(job, load),
                         lambda text: head(text) | final_stats(job, load))


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
    template = info.get("tokenizer.chat_template") or ""
    return {
        "license": info.get("general.license", ""),
        "modelfile": f"# Modelfile generated by kvslim\nFROM {tagged(name)}\n",
        "parameters": "",
        "template": template,
        "details": model_details(config),
        "model_info": info,
        "capabilities": ["completion"],
        "modified_at": timestamp(path.stat().st_mtime),
    }


@router.post("/api/pull")
async def pull(request: Request):
    req = await read_json(request, ModelRequest)
    name = registry(request).canonical(req.model_name)
    if not name:
        raise APIError(400, "model is required")
    if store.lookup(name) is None:
        raise APIError(404, f"model '{name}' cannot be pulled: built-in models are "
                            f"{', '.join(store.builtin_names())}")

    def run() -> None:
        store.pull(name, progress=False)

    if not req.stream:
        await run_in_threadpool(run)
        return {"status": "success"}

    async def progress() -> AsyncIterator[bytes]:
        yield _line({"status": "pulling manifest"})
        try:
            await run_in_threadpool(run)
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            yield _line({"error": str(e)})
            return
        yield _line({"status": "success"})

    return StreamingResponse(progress(), media_type=NDJSON)


@router.get("/api/ps")
async def ps(request: Request):
    reg = registry(request)
    return {"models": await run_in_threadpool(lambda: [ps_entry(reg, r) for r in reg.loaded()])}


def ps_entry(reg, runner: Runner) -> dict:
    """Ollama's running-model entry, plus the K/V pool, attention path and request counts."""
    snap = runner.scheduler.snapshot
    size = runner.weight_bytes + snap["bytes"]
    on_cpu = runner.device.type == "cpu"
    counters = dict(runner.scheduler.counters)
    return {
        "name": tagged(runner.name), "model": tagged(runner.name), "size": size,
        "digest": reg.digest(runner.path), "details": model_details(runner.config),
        "size_vram": 0 if on_cpu else size, "context_length": snap["num_ctx"],
        "expires_at": timestamp(runner.expires_at()),
        "device": snap["device"], "num_parallel": snap["num_parallel"],
        "kv_cache": {k: snap[k] for k in (
            "type_k", "type_v", "requested_k", "requested_v", "fallback", "reason", "bytes",
            "bytes_per_token", "capacity_tokens", "page_size", "pages_total", "pages_in_use",
            "pages_sequences", "pages_prefix_cache", "prefix_cache_entries",
            "prefix_cache_tokens", "prefix_cache_evictions", "kv_rotation", "kv_centering",
            "kv_rounding", "kv_codec_note", "prefix_cache_files_written",
            "prefix_cache_files_restored")},
        "attention": {"backend": snap["backend"], "fused": snap["fused"],
                      "flash_attn": snap["flash_attn"]},
        "requests": {"running": snap["running"], "waiting": runner.scheduler.waiting(),
                     **counters},
    }


@router.get("/api/version")
async def version():
    return {"version": kvslim.__version__}


@router.get("/")
@router.head("/")
async def root():
    return PlainTextResponse("kvslim is running")
