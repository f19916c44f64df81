"""Chat rendering and the one policy that fits a prompt into the context.

Used by the engine (a token prompt), the ``LLM`` API and ``kvslim run`` (a chat), and
the server (both). The policy: a prompt may keep ``prompt_limit(num_ctx, max_tokens)``
tokens, the rest of the context being room to answer. A chat too long for it loses its
oldest messages first, as Ollama's does (system messages and the latest message stay,
``fit_messages``); a token prompt longer than num_ctx, when truncation is asked for,
keeps its start token and its latest tokens (``fit_prompt``).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

__all__ = ["PromptTooLong", "render_chat", "prompt_limit", "max_length", "fit_prompt",
           "fit_messages", "fit_chat"]


class PromptTooLong(ValueError):
    """A prompt that does not fit in the context and truncation was not asked for."""


def render_chat(tokenizer, messages: Sequence[Mapping]) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template, ready to answer: BOS
    once, whether or not the template writes it itself."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
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
