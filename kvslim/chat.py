"""Chat rendering and the one policy that fits a prompt into the context.

Used by the engine (a token prompt), the ``LLM`` API and ``kvslim run`` (a chat), and
the server (both). The policy: a prompt may keep ``prompt_limit(num_ctx, max_tokens)``
tokens, the rest of the context being room to answer. A chat too long for it loses its
oldest messages first, as Ollama's does (system messages and the latest message stay,
``fit_messages``); a token prompt longer than num_ctx, when truncation is asked for,
keeps its start token and its latest tokens (``fit_prompt``).

Tools: ``render_chat(..., tools=...)`` hands the tools (OpenAI's ``{"type": "function",
"function": {...}}``) to a template that takes a ``tools`` variable; a template that does
not gets them as a system message asking for ``<tool_call>{...}</tool_call>``, with the
history's tool calls and tool results written in the same form. ``parse_tool_calls``
reads calls back out of an answer (``<tool_call>`` tags, ``[TOOL_CALLS]``, or a bare JSON
object or list of ``{"name", "arguments"|"parameters"}``); ``ToolCallStream`` streams the
text of an answer while holding back what may be a call.
"""
from __future__ import annotations

import json
import re
from typing import Callable, Mapping, Sequence

__all__ = ["PromptTooLong", "render_chat", "prompt_limit", "max_length", "fit_prompt",
           "fit_messages", "fit_chat", "parse_tool_calls", "ToolCallStream"]


class PromptTooLong(ValueError):
    """A prompt that does not fit in the context and truncation was not asked for."""


def render_chat(tokenizer, messages: Sequence[Mapping], tools: list[dict] | None = None) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template, ready to answer: BOS
    once, whether or not the template writes it itself. ``tools``: see the module doc."""
    if tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        messages, extra = _tool_messages(tokenizer.chat_template, messages, tools)
    else:
        extra = {}
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
    ids = tokenizer.encode(text, add_special=True, parse_special=True)
    bos = tokenizer.bos_id
    if len(ids) > 1 and ids[0] == ids[1] == bos:
        ids = ids[1:]  # the template wrote BOS itself
    return ids


def prompt_limit(num_ctx: int, max_tokens: int | None) -> int:
    """Prompt tokens that leave room to answer: num_ctx less num_predict (at most half the
    context) or, without one, a quarter of the context up to 256 tokens."""
    room = min(256, num_ctx // 4) if max_tokens is None else min(max_tokens, num_ctx // 2)
    return max(1, num_ctx - room)


def max_length(n_prompt: int, num_ctx: int, max_tokens: int | None) -> int:
    """Tokens a request may reach, prompt included: what its pages are reserved for."""
    return num_ctx if max_tokens is None else min(num_ctx, n_prompt + max_tokens)


def fit_prompt(ids: list[int], *, num_ctx: int, vocab_size: int, model_max: int,
               truncate: bool, max_tokens: int | None = None,
               bos_id: int | None = None) -> list[int]:
    """``ids`` checked (ValueError) and, when longer than num_ctx, truncated (``truncate``)
    to its BOS and latest tokens within ``prompt_limit``, else PromptTooLong."""
    if not ids:
        raise ValueError("the prompt is empty")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size})")
    if len(ids) <= num_ctx:
        return ids
    if not truncate:
        raise PromptTooLong(f"the prompt has {len(ids)} tokens, more than the context "
                            f"length num_ctx={num_ctx}; raise num_ctx (model maximum "
                            f"{model_max}) or ask for truncation")
    keep = prompt_limit(num_ctx, max_tokens)
    head = ids[:1] if bos_id is not None and ids[0] == bos_id else []
    return head + ids[len(ids) - (keep - len(head)):]


def fit_messages(messages: list[dict], count: Callable[[list[dict]], int], limit: int) -> list[dict]:
    """The longest suffix of ``messages`` whose prompt (``count(msgs)`` tokens) fits
    ``limit``, with the system messages before it kept in place; at least the last message.

    Binary search over where the suffix starts (the count only grows as messages are
    added back), so a long history costs a few renders, not one per message.
    """
    if len(messages) <= 1 or count(messages) <= limit:
        return list(messages)

    def keep_from(i: int) -> list[dict]:
        return [m for m in messages[:i] if m.get("role") == "system"] + list(messages[i:])

    lo, hi = 1, len(messages) - 1  # start index; hi (only the last message) is the fallback
    while lo < hi:
        mid = (lo + hi) // 2
        if count(keep_from(mid)) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return keep_from(hi)


def fit_chat(render: Callable[[list[dict]], list[int]], messages: list[dict],
             limit: int) -> tuple[list[dict], list[int]]:
    """(messages kept, their token ids) for a prompt of at most ``limit`` tokens
    (``fit_messages``); rendered once when the whole chat fits. Only a last message too
    long on its own is then left over the limit, for ``fit_prompt`` to cut or refuse."""
    ids = render(messages)
    if len(ids) <= limit:  # the usual case
        return list(messages), ids
    kept = fit_messages(messages, lambda m: len(render(m)), limit)
    return kept, render(kept)


# ---------------------------------------------------------------- tools

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_PROMPT = (
    "You can call these functions (JSON schemas of their arguments):\n{tools}\n"
    "To call one, answer only with\n" + TOOL_OPEN
    + '{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}' + TOOL_CLOSE
    + "\nOtherwise answer normally.")


def _template_takes_tools(template: str) -> bool:
    return "tools" in template


def _arguments(value) -> dict:
    """A call's arguments as a dict: OpenAI sends them as a JSON string, Ollama as an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise ValueError(f"tool call arguments are not valid JSON: {value[:80]!r}") from None
    if not isinstance(value, dict):
        raise ValueError("tool call arguments must be a JSON object")
    return value


def _calls(message: Mapping) -> list[dict]:
    """A history message's tool calls as ``{"type", "function": {"name", "arguments": dict}}``
    (arguments parsed, so templates that write ``arguments | tojson`` get JSON once)."""
    out = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ValueError("a tool call in the history needs function.name")
        out.append({**call, "type": "function",
                    "function": {"name": fn["name"], "arguments": _arguments(fn.get("arguments", {}))}})
    return out


def _tool_messages(template: str, messages: Sequence[Mapping],
                   tools: list[dict] | None) -> tuple[list[dict], dict]:
    """(messages, template keywords) for a chat with tools or tool turns."""
    msgs = [dict(m) for m in messages]
    for m in msgs:
        if m.get("tool_calls"):
            m["tool_calls"] = _calls(m)
    if _template_takes_tools(template):
        return msgs, ({"tools": tools} if tools else {})
    for m in msgs:  # the tool-less template sees tool turns as text it can render
        if m.get("tool_calls"):
            calls = "".join(TOOL_OPEN + json.dumps({"name": c["function"]["name"],
                                                    "arguments": c["function"]["arguments"]})
                            + TOOL_CLOSE for c in m.pop("tool_calls"))
            m["content"] = (m.get("content") or "") + calls
        elif m.get("role") == "tool":
            m.update(role="user", content=f"<tool_response>\n{m.get('content') or ''}\n</tool_response>")
    if tools:
        listing = "\n".join(json.dumps(t.get("function", t)) for t in tools)
        note = _TOOL_PROMPT.format(tools=listing)
        if msgs and msgs[0].get("role") == "system":
            msgs[0] = {**msgs[0], "content": f"{msgs[0].get('content') or ''}\n\n{note}"}
        else:
            msgs.insert(0, {"role": "system", "content": note})
    return msgs, {}


_TAGGED = re.compile(re.escape(TOOL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CLOSE) + r"|$)", re.S)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def _as_call(obj) -> dict | None:
    """``{"name", "arguments": dict}`` from a parsed call object, or None."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return {"name": name, "arguments": args}


def _calls_in(text: str) -> list[dict] | None:
    """The calls a JSON text (an object or a list of them) holds; None if it is not that."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(v) for v in items]
    return calls if calls and all(calls) else None


def parse_tool_calls(text: str, names: set[str] | None = None) -> tuple[str, list[dict]]:
    """(content, calls) of an answer: calls as ``{"name", "arguments": dict}`` in order;
    content is the text outside them. ``names``: only calls of these tools count (a JSON
    answer that names no known tool stays content)."""
    def known(calls):
        return calls is not None and (names is None or all(c["name"] in names for c in calls))

    if TOOL_OPEN in text:
        calls, rest = [], []
        pos = 0
        for m in _TAGGED.finditer(text):
            found = _calls_in(m.group(1))
            if not known(found):
                continue
            rest.append(text[pos:m.start()])
            calls += found
            pos = m.end()
        if calls:
            return ("".join(rest) + text[pos:]).strip(), calls
    body = text.strip()
    if body.startswith("[TOOL_CALLS]"):
        body = body[len("[TOOL_CALLS]"):].strip()
    fenced = _FENCE.match(body)
    found = _calls_in(fenced.group(1) if fenced else body)
    if known(found):
        return "", found
    return text, []


class ToolCallStream:
    """Streams an answer's text while holding back what may be a tool call: from a
    ``<tool_call>`` tag (or a tail that may start one) on, or the whole answer while it
    starts like a JSON call (``{``, ``[``, a code fence). ``finish()`` gives the text
    still held that is not a call, and the calls."""

    _STARTS = ("{", "[", "`")

    def __init__(self, names: set[str] | None = None):
        self.names = names
        self._text = ""
        self._sent = 0  # characters of _text released

    def push(self, piece: str) -> str:
        self._text += piece
        start = self._text.lstrip()
        if self._sent == 0 and (not start or start[0] in self._STARTS):
            return ""  # may be a bare JSON call: decided at the end
        tag = self._text.find(TOOL_OPEN, self._sent)
        if tag < 0:
            tag = next((len(self._text) - n for n in range(len(TOOL_OPEN) - 1, 0, -1)
                        if self._text.endswith(TOOL_OPEN[:n])), len(self._text))
        out, self._sent = self._text[self._sent:max(tag, self._sent)], max(tag, self._sent)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        held = self._text[self._sent:]
        content, calls = parse_tool_calls(held, self.names)
        return (content if calls else held), calls
