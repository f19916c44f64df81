"""kvslim.chat: chat rendering (BOS once) and the one context-fitting policy shared by
the engine, the LLM API, `kvslim run` and the server."""
from __future__ import annotations

import pytest

from kvslim.chat import (PromptTooLong, fit_chat, fit_messages, fit_prompt, max_length,
                         prompt_limit, render_chat)

BOS = 1


class Tok:
    """A tokenizer stand-in: one id per character (+2), BOS added by encode."""

    bos_id = BOS

    def __init__(self, template_bos: bool):
        self.template_bos = template_bos

    def apply_chat_template(self, messages, add_generation_prompt):
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"
        return ("\x01" if self.template_bos else "") + text

    def encode(self, text, add_special, parse_special):
        ids = [BOS if c == "\x01" else ord(c) + 2 for c in text]
        return [BOS] + ids if add_special else ids


@pytest.mark.parametrize("template_bos", [False, True])
def test_render_chat_writes_bos_once(template_bos):
    msgs = [{"role": "user", "content": "hi"}]
    ids = render_chat(Tok(template_bos), msgs)
    assert ids[0] == BOS and ids[1] != BOS
    assert ids == render_chat(Tok(not template_bos), msgs)


def test_fit_prompt_checks_and_keeps_bos_and_the_latest_tokens():
    kw = dict(num_ctx=16, vocab_size=100, model_max=64)
    ids = [BOS] + list(range(2, 30))
    assert fit_prompt(ids[:16], truncate=False, **kw) == ids[:16]
    with pytest.raises(PromptTooLong, match="29 tokens.*num_ctx=16.*maximum 64"):
        fit_prompt(ids, truncate=False, **kw)
    with pytest.raises(ValueError, match="empty"):
        fit_prompt([], truncate=True, **kw)
    with pytest.raises(ValueError, match=r"in \[0, 100\)"):
        fit_prompt([5, 100], truncate=True, **kw)
    cut = fit_prompt(ids, truncate=True, max_tokens=4, bos_id=BOS, **kw)
    assert cut == [BOS] + ids[-11:] and len(cut) == prompt_limit(16, 4) == 12
    assert fit_prompt(ids, truncate=True, max_tokens=4, **kw) == ids[-12:]  # no BOS to keep
    assert max_length(12, 16, 4) == 16 and max_length(5, 16, 4) == 9 and max_length(5, 16, None) == 16


def test_fit_chat_renders_once_when_it_fits():
    tok, calls = Tok(False), []

    def render(ms):
        calls.append(ms)
        return render_chat(tok, ms)

    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * 20} for i in range(5)]
    kept, ids = fit_chat(render, msgs, 1000)
    assert kept == msgs and ids == render_chat(tok, msgs) and len(calls) == 1
    kept, ids = fit_chat(render, msgs, 70)
    assert kept == msgs[-2:] and ids == render_chat(tok, kept) and len(ids) <= 70


def test_fit_messages_drops_the_oldest_and_keeps_system_and_last():
    count = lambda ms: sum(len(m["content"]) for m in ms)  # noqa: E731
    msgs = [{"role": "system", "content": "s" * 5}] + \
        [{"role": "user" if i % 2 == 0 else "assistant", "content": str(i) * 10} for i in range(8)]
    assert fit_messages(msgs, count, 1000) == msgs
    kept = fit_messages(msgs, count, 40)  # the system message + the last three
    assert kept == [msgs[0]] + msgs[-3:] and count(kept) <= 40
    assert fit_messages(msgs, count, 3) == [msgs[0], msgs[-1]]  # the last always stays
    mid = [msgs[1], {"role": "system", "content": "t"}, *msgs[2:]]  # a system turn later on
    assert fit_messages(mid, count, 32) == [mid[1]] + mid[-3:]
    assert prompt_limit(256, None) == 192 and prompt_limit(4096, None) == 3840
    assert prompt_limit(256, 10) == 246 and prompt_limit(256, 1000) == 128
