"""Constrained decoding (kvslim.grammar, the sampler's mask) on the tiny random model.

The tiny vocabulary has every byte as a token, so any JSON text can be written with it;
its random weights make the grammar, not the model, decide that the answer is valid.
"""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from kvslim.engine import Engine
from kvslim.grammar import (GrammarError, format_grammar, json_grammar, mask_reference,
                            tool_call_grammar)
from kvslim.sampling import NoAllowedToken, SamplingParams, apply_mask, sample

import test_engine as engine_tests
from test_engine import drain

GREEDY = dict(temperature=0, repeat_penalty=1.0)
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"], "additionalProperties": False}


def continuation(tok, text: str) -> list[int]:
    """Tokens of ``text`` inside an answer: without SentencePiece's start-of-text space."""
    ids = tok.encode(text)
    assert tok.token_to_piece(ids[0]) == b" "
    return ids[1:]


def engine(tiny_parts, **kw) -> Engine:
    return engine_tests.engine(tiny_parts, **({"cache_type_k": "f16", "cache_type_v": "f16",
                                                "num_ctx": 256} | kw))


# ---------------------------------------------------------------- masks


def test_mask_equals_token_by_token_reference(tiny_parts):
    _, tok = tiny_parts
    g = json_grammar(PERSON)
    ids = continuation(tok, '{"name": "ab", "age": 7')
    for n in (0, 1, 3, len(ids) // 2, len(ids)):
        c = g.constraint(tok)
        for t in ids[:n]:
            c.advance(t)
        fast = c.allowed()
        assert fast.dtype == torch.bool and fast.shape == (tok.vocab_size,)
        ref = mask_reference(g, tok, ids[:n])
        # llguidance keeps one token per byte string (here the piece "a", not the byte
        # token <0x61>): the mask is the reference with such duplicates left out
        assert not (fast & ~ref).any(), n
        allowed_bytes = {tok.token_to_piece(t) for t in fast.nonzero().flatten().tolist()}
        assert allowed_bytes == {tok.token_to_piece(t) for t in ref.nonzero().flatten().tolist()}, n
        assert fast.any()


def test_finished_grammar_allows_only_end_tokens(tiny_parts):
    _, tok = tiny_parts
    c = json_grammar({"enum": ["ab"]}).constraint(tok)
    for t in continuation(tok, '"ab"'):
        assert not c.finished
        c.advance(t)
    assert c.finished
    assert set(c.allowed().nonzero().flatten().tolist()) <= tok.eog_ids | {tok.eos_id}


def test_bad_formats_are_grammar_errors():
    with pytest.raises(GrammarError, match="unsupported JSON schema"):
        json_grammar({"type": "frobnicate"})
    with pytest.raises(GrammarError, match="unsupported JSON schema"):
        json_grammar({"type": "array", "uniqueItems": True})  # refused, not silently ignored
    with pytest.raises(GrammarError, match="format must be"):
        format_grammar("yaml")
    with pytest.raises(GrammarError):
        format_grammar(["json"])
    assert format_grammar(None) is None and format_grammar("") is None
    assert format_grammar("json").name == "json"
    with pytest.raises(GrammarError, match="no tools"):
        tool_call_grammar([])


def test_apply_mask_and_sample_never_leave_the_mask():
    logits = torch.randn(300)
    allowed = torch.zeros(280, dtype=torch.bool)  # shorter than the logits: padded ids banned
    allowed[[3, 77, 150]] = True
    out = apply_mask(logits, allowed)
    assert torch.isinf(out).sum() == 297 and torch.equal(out[[3, 77, 150]], logits[[3, 77, 150]])
    g = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=1.5, top_k=0, top_p=1.0)
    assert {sample(logits, p, [], g, allowed) for _ in range(200)} <= {3, 77, 150}
    assert sample(logits, SamplingParams(**GREEDY), [], None, allowed) == \
        [3, 77, 150][int(logits[[3, 77, 150]].argmax())]
    with pytest.raises(NoAllowedToken):
        apply_mask(logits, torch.zeros(300, dtype=torch.bool))


# ---------------------------------------------------------------- in the engine


def test_constrained_and_free_sequences_in_one_batch(tiny_parts):
    """Each row has its own mask: the free stream equals its run alone, the constrained one
    parses and validates, and it stops at the grammar's end (not at max_tokens)."""
    _, tok = tiny_parts
    prompt = tok.encode("the cab", add_special=True)
    e = engine(tiny_parts, num_parallel=2)
    free = e.add_request(prompt, SamplingParams(max_tokens=20, ignore_eos=True, **GREEDY))
    json_seq = e.add_request(prompt, SamplingParams(max_tokens=200, **GREEDY),
                             constraint=json_grammar(PERSON).constraint(tok))
    drain(e)
    alone = engine(tiny_parts)
    a = alone.add_request(prompt, SamplingParams(max_tokens=20, ignore_eos=True, **GREEDY))
    drain(alone)
    assert free.output_ids == a.output_ids
    assert json_seq.finish_reason == "stop"
    jsonschema.validate(json.loads(json_seq.text), PERSON)
    assert e.cache.pages_in_use == 0


class _Nothing:
    """A constraint whose mask is empty: the sequence must end in error, alone."""

    def allowed(self):
        return torch.zeros(8, dtype=torch.bool)


def test_empty_mask_ends_only_its_own_request(tiny_parts):
    _, tok = tiny_parts
    e = engine(tiny_parts, num_parallel=2)
    ok = e.add_request([1, 270, 266], SamplingParams(max_tokens=6, ignore_eos=True, **GREEDY))
    bad = e.add_request([1, 270, 267], SamplingParams(max_tokens=6, **GREEDY))
    bad.sampler.constraint = _Nothing()
    drain(e)
    assert bad.finish_reason == "error" and isinstance(bad.error, NoAllowedToken)
    assert ok.finish_reason == "length" and len(ok.output_ids) == 6
    assert e.cache.pages_in_use == 0


# JSON Schema subset llguidance enforces, kept small enough to finish: bounded strings,
# numbers and arrays, enums, nested objects, required and optional properties.
_leaf = st.one_of(
    st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.builds(lambda lo, n: {"type": "integer", "minimum": lo, "maximum": lo + n},
              st.integers(-50, 50), st.integers(0, 100)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(lambda n: {"type": "number", "minimum": -n, "maximum": n}, st.integers(1, 9)),
    st.lists(st.text("abcxyz", min_size=1, max_size=4), min_size=1, max_size=3, unique=True)
      .map(lambda v: {"enum": v}),
)
_names = st.text("abcdefgh", min_size=1, max_size=5)


def _object(children):
    return st.dictionaries(_names, children, min_size=1, max_size=3).flatmap(
        lambda props: st.sets(st.sampled_from(sorted(props))).map(
            lambda req: {"type": "object", "properties": props, "required": sorted(req),
                         "additionalProperties": False}))


SCHEMAS = st.recursive(_leaf, lambda c: st.one_of(
    _object(c), c.map(lambda i: {"type": "array", "items": i, "maxItems": 3})), max_leaves=6)


@pytest.fixture(scope="module")
def schema_engine(tiny_parts):
    return engine(tiny_parts, num_parallel=1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, seed=st.integers(0, 2**31))
def test_every_answer_validates_against_its_schema(schema_engine, tiny_parts, schema, seed):
    _, tok = tiny_parts
    seq = schema_engine.add_request(tok.encode("the", add_special=True),
                                    SamplingParams(temperature=1.0, seed=seed, max_tokens=200),
                                    constraint=json_grammar(schema).constraint(tok))
    drain(schema_engine)
    assert seq.finish_reason == "stop", (seq.finish_reason, seq.text)
    jsonschema.validate(json.loads(seq.text), schema)
