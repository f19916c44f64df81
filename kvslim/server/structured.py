"""Structured output and tools for both APIs: what a request's ``format`` /
``response_format``, ``tools`` and ``tool_choice`` ask for, as a grammar
(``kvslim.grammar``) for the engine, the tools for the chat template (``kvslim.chat``),
and the tool calls of an answer in each API's shape."""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from kvslim.chat import ToolCallStream, parse_tool_calls
from kvslim.grammar import Grammar, GrammarError, format_grammar, json_grammar, tool_call_grammar
from kvslim.server.common import APIError

__all__ = ["ToolPlan", "ollama_format", "openai_response_format", "plan_tools",
           "ollama_tool_calls", "openai_tool_calls"]


def _grammar(build, *args) -> Grammar | None:
    try:
        return build(*args)
    except GrammarError as e:
        raise APIError(400, str(e)) from None


def ollama_format(fmt) -> Grammar | None:
    """Ollama's ``format``: "json" or a JSON schema."""
    return _grammar(format_grammar, fmt)


def openai_response_format(rf: dict | None) -> Grammar | None:
    """OpenAI's ``response_format``: text, json_object, or json_schema ({name, schema,
    strict}); the schema is always enforced, strict or not."""
    kind = (rf or {}).get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return _grammar(json_grammar, None)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(400, "response_format.json_schema must be an object with a 'schema' object")
        return _grammar(json_grammar, spec.get("schema", {}))
    raise APIError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}")


def _check_tools(tools: list | None) -> list[dict]:
    """Tools as ``{"type": "function", "function": {"name", "description"?, "parameters"?}}``."""
    out = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                                f"{{\"name\": ..., \"parameters\": {{...}}}}}}")
        if tool.get("type", "function") != "function":
            raise APIError(400, f"tools[{i}].type must be 'function', got {tool.get('type')!r}")
        if not isinstance(fn.get("parameters", {}), dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": fn})
    return out


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses tools: those the template shows, the grammar that forces a
    call (tool_choice required or a named function), and whether the answer is parsed."""

    tools: list[dict] | None
    grammar: Grammar | None
    parse: bool

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools or []}

    def stream(self) -> ToolCallStream | None:
        return ToolCallStream(self.names) if self.parse else None

    def split(self, text: str) -> tuple[str, list[dict]]:
        """(content, calls) of a whole answer."""
        return parse_tool_calls(text, self.names) if self.parse else (text, [])


def plan_tools(tools: list | None, choice: Any = None) -> ToolPlan:
    """``tools`` with OpenAI's ``tool_choice``: "none" (no tools shown, none parsed),
    "auto" (default), "required" (a call of one of them, forced by a grammar), or
    ``{"type": "function", "function": {"name": ...}}`` (a call of that one)."""
    tools = _check_tools(tools)
    if not tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools")
        return ToolPlan(None, None, False)
    if choice in (None, "auto"):
        return ToolPlan(tools, None, True)
    if choice == "none":
        return ToolPlan(None, None, False)
    if choice == "required":
        return ToolPlan(tools, _grammar(tool_call_grammar, tools), True)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise APIError(400, 'tool_choice must be "none", "auto", "required" or '
                            '{"type": "function", "function": {"name": ...}}')
    chosen = [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        raise APIError(400, f"tool_choice names {name!r}, which is not in tools")
    return ToolPlan(tools, _grammar(tool_call_grammar, chosen), True)


def one_grammar(tool_plan: ToolPlan, output: Grammar | None) -> Grammar | None:
    """The request's grammar: a forced tool call, or the output format, not both."""
    if tool_plan.grammar is not None and output is not None:
        raise APIError(400, "a required tool call and a response format cannot both "
                            "constrain the answer")
    return tool_plan.grammar or output


def ollama_tool_calls(calls: list[dict]) -> list[dict]:
    return [{"function": {"index": i, "name": c["name"], "arguments": c["arguments"]}}
            for i, c in enumerate(calls)]


def openai_tool_calls(calls: list[dict], stream: bool = False) -> list[dict]:
    """OpenAI's shape: arguments as a JSON string, an id per call (and an index when streamed)."""
    out = []
    for i, c in enumerate(calls):
        call = {"id": "call_" + secrets.token_hex(12), "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
        out.append({"index": i} | call if stream else call)
    return out


def history_message(role: str, content: str | None, tool_calls=None, **extra) -> dict:
    """A history message for ``kvslim.chat``: tool calls and a tool turn's fields kept."""
    m = {"role": role, "content": content or ""}
    if tool_calls:
        m["tool_calls"] = list(tool_calls)
    m.update({k: v for k, v in extra.items() if v is not None})
    return m
