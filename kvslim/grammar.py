"""Constrained decoding: a grammar (any JSON object, a JSON schema, a tool call) becomes
a mask of the tokens allowed at each step of one sequence.

The grammar engine is llguidance (``benchmarks/README.md`` compares it with xgrammar and
outlines-core on SmolLM2's 49k vocabulary: it computes a mask in tens of microseconds
with nothing precomputed per schema, and covers the JSON-Schema subset the APIs need).
A ``Grammar`` is compiled once per request; each sequence gets its own ``Constraint``
(its parser state), which the sampler asks for a mask and the engine advances with
every accepted token. A grammar that has reached its end stops the sequence.

The tokenizer's table for llguidance (every token's bytes; control tokens marked so that
text never matches them) is built once per tokenizer and kept beside it.
"""
from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["GrammarError", "Grammar", "Constraint", "json_grammar", "format_grammar",
           "tool_call_grammar", "mask_reference"]


class GrammarError(ValueError):
    """A format or schema that cannot be compiled, or a sequence its grammar left with no
    allowed token."""


@dataclass(frozen=True)
class Grammar:
    """A compiled-on-demand llguidance grammar (its JSON text) and what it stands for."""

    source: str
    name: str  # for errors and logs: "json", "json schema", "tool call"

    def constraint(self, tokenizer) -> "Constraint":
        """A fresh parser state for one sequence."""
        return Constraint(self, tokenizer)


# llguidance's JSON compiler: compact separators (no run-away whitespace from a small
# model), any JSON string escapes; unknown keywords are errors, not silently ignored.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                 "lenient": False}


def json_grammar(schema: dict | bool | None = None, name: str = "json schema") -> Grammar:
    """A grammar for one JSON value matching ``schema``; None: any JSON object (Ollama's
    ``format: "json"``, OpenAI's ``json_object``)."""
    llguidance = _llguidance()
    if schema is None:
        schema, name = {"type": "object"}, "json"
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        source = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), overrides=_JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(f"invalid JSON schema: {e}") from e
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source)
    if is_error:
        raise GrammarError(f"unsupported JSON schema: {messages[0]}")
    return Grammar(source, name)


def format_grammar(fmt: Any) -> Grammar | None:
    """Ollama's ``format``: None or "" (free text), "json", or a JSON schema (a dict)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return json_grammar(None)
    if isinstance(fmt, dict):
        return json_grammar(fmt)
    raise GrammarError(f'format must be "json" or a JSON schema, got {fmt!r}')


def tool_call_grammar(tools: list[dict]) -> Grammar:
    """One call of one of ``tools`` (OpenAI's ``{"type": "function", "function": {name,
    parameters}}``) as the JSON object ``{"name": ..., "arguments": {...}}``, the form
    ``kvslim.chat.parse_tool_calls`` reads."""
    calls = []
    for tool in tools:
        fn = tool.get("function", tool)
        params = fn.get("parameters") or {"type": "object"}
        calls.append({"type": "object", "properties": {"name": {"const": fn["name"]},
                                                      "arguments": params},
                      "required": ["name", "arguments"], "additionalProperties": False})
    if not calls:
        raise GrammarError("a tool call was required but no tools were given")
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return json_grammar(schema, name="tool call")


# ---------------------------------------------------------------- per-sequence state


class Constraint:
    """One sequence's parser state: ``allowed()`` the tokens that may come next (bool
    [vocab]), ``advance(token)`` after one is accepted, ``finished`` at the grammar's end."""

    def __init__(self, grammar: Grammar, tokenizer):
        import llguidance

        self.grammar = grammar
        self.vocab_size = tokenizer.vocab_size
        self._matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer), grammar.source, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"{grammar.name}: {_short(self._matcher.get_error())}")
        self._words = np.zeros(-(-self.vocab_size // 32), dtype=np.int32)  # 1 bit per token

    def allowed(self) -> torch.Tensor:
        """bool [vocab_size]: the tokens the grammar accepts next (end-of-generation tokens
        included once the text so far is complete)."""
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if self._matcher.is_error():
            raise GrammarError(f"{self.grammar.name}: {_short(self._matcher.get_error())}")
        # bit i of word w is token 32w + i: little-endian words, little bit order
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")[:self.vocab_size]
        return torch.from_numpy(bits.view(np.bool_))

    def advance(self, token: int) -> None:
        """Consume an accepted token. A token the grammar refuses (or a parser limit hit)
        leaves the parser in error: the next ``allowed()`` raises, ending this sequence
        alone, from inside its own sampling."""
        self._matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """No token but end-of-generation can follow: the sequence stops here."""
        return self._matcher.is_stopped() and not self._matcher.is_error()


def mask_reference(grammar: Grammar, tokenizer, prefix: list[int]) -> torch.Tensor:
    """bool [vocab]: the tokens the parser accepts after ``prefix``, found the slow way
    (each token tried on its own copy of the parser), to test the bit mask against.
    ``allowed()`` equals it but for tokens whose bytes another token also has: llguidance
    keeps one token per byte string (a piece, not its byte-fallback twin)."""
    c = Constraint(grammar, tokenizer)
    for t in prefix:
        c.advance(t)
    if c._matcher.is_error():
        raise GrammarError(_short(c._matcher.get_error()))
    out = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    for t in range(tokenizer.vocab_size):
        out[t] = c._matcher.deep_copy().try_consume_tokens([t]) == 1
    return out


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise GrammarError("structured output needs the llguidance package: "
                           "pip install 'kvslim[structured]'") from e
    return llguidance


def _short(error: str) -> str:
    """llguidance's error line, without the parser state it dumps around it."""
    lines = [ln for ln in error.splitlines() if ln.startswith("Error:")]
    return lines[0][len("Error:"):].strip() if lines else error.splitlines()[0] if error else error


# ---------------------------------------------------------------- tokenizer table

_TABLES: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer):
    """llguidance's view of a kvslim tokenizer (about a second for 49k tokens: cached)."""
    with _TABLES_LOCK:
        table = _TABLES.get(tokenizer)
        if table is None:
            table = _TABLES[tokenizer] = _build_table(tokenizer)
        return table


class _Wrapper:
    """What ``llguidance.TokenizerWrapper`` reads: token bytes, special ids, an encoder."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        special = [t for t in range(tokenizer.vocab_size) if tokenizer.is_special(t)]
        self.special_token_ids = special
        tokens = [tokenizer.token_to_piece(t) for t in range(tokenizer.vocab_size)]
        for t in special:  # llguidance's mark for a special token: never matched by text
            tokens[t] = b"\xff" + tokens[t]
        self.tokens = tokens

    def __call__(self, text: str | bytes) -> list[int]:
        """Tokens of text that continues an answer: llguidance tokenizes the bytes a
        grammar forces with it, so SentencePiece's space prefix (a start-of-text rule)
        must not be added."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if self._tok.is_spm:
            out: list[int] = []
            self._tok._encode_spm_text(text, out)
            return out
        return self._tok.encode(text)


def _build_table(tokenizer):
    import llguidance

    eog = sorted(tokenizer.eog_ids) or [tokenizer.eos_id]
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapper(tokenizer)),
                                  n_vocab=tokenizer.vocab_size, eos_token=eog)
