"""Grammar engines for constrained decoding, side by side on one tokenizer (issue 16).

For llguidance, xgrammar and outlines-core: the time to build the engine's table of the
vocabulary (once per tokenizer), to compile a JSON schema for it (once per request in a
server, since each request may bring its own schema), to start one sequence's parser,
and the time per step to compute the token mask and advance by one token, stepping
through the tokens of a valid answer.
Each mask is checked to allow the token that follows. An engine that is not installed
is skipped.

Then JSON-Schema keywords: for each, whether the engine compiles a schema using it and,
if it does, whether it enforces it: a text that breaks the keyword (and only it) is fed
to the engine's parser over a byte vocabulary, and "ignored" means it was accepted (a
text that keeps the keyword must be accepted first).

    python benchmarks/grammar.py                  # SmolLM2's 49,152-token vocabulary
    python benchmarks/grammar.py --model PATH.gguf --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kvslim.tokenizer import Tokenizer  # noqa: E402

SMOLLM2 = os.path.expanduser("~/.cache/kvslim/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "email", "tags", "address", "active", "role"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
          "tags": ["math", "engines", "poetry"], "address": {"city": "London", "zip": "W1"},
          "active": True, "role": "admin"}


def _tokens(tok: Tokenizer) -> list[bytes]:
    return [tok.token_to_piece(t) for t in range(tok.vocab_size)]


def run_llguidance(tok: Tokenizer, ids: list[int]):
    from kvslim.grammar import _ll_tokenizer, json_grammar

    t0 = time.perf_counter()
    _ll_tokenizer(tok)
    table_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = json_grammar(SCHEMA)
    g.constraint(tok)  # llguidance builds the lexer when the first parser starts
    compile_s = time.perf_counter() - t0

    def start():
        return g.constraint(tok)

    def step(c, t):
        m = c.allowed()
        ok = bool(m[t])
        c.advance(t)
        return ok
    return table_s, compile_s, start, step


def run_xgrammar(tok: Tokenizer, ids: list[int]):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(_tokens(tok), xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                             stop_token_ids=sorted(tok.eog_ids))
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    table_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, tok.vocab_size)

    def start():
        return xgr.GrammarMatcher(compiled)

    def step(m, t):
        m.fill_next_token_bitmask(mask)
        bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[:tok.vocab_size]
        ok = bool(bits[t])
        m.accept_token(t)
        return ok
    return table_s, compile_s, start, step


def run_outlines(tok: Tokenizer, ids: list[int]):
    import outlines_core as oc
    import torch

    t0 = time.perf_counter()
    eos = tok.eos_id
    table: dict[bytes, list[int]] = {}
    for t, piece in enumerate(_tokens(tok)):
        if t != eos and piece and not tok.is_special(t):
            table.setdefault(piece, []).append(t)
    vocab = oc.Vocabulary(eos, table)
    table_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    regex = oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    index = oc.Index(regex, vocab)
    compile_s = time.perf_counter() - t0
    words = torch.zeros(-(-tok.vocab_size // 32), dtype=torch.int32)

    def start():
        return oc.Guide(index)

    def step(g, t):
        g.write_mask_into(words.data_ptr(), words.numel(), words.element_size())
        bits = np.unpackbits(words.numpy().view(np.uint8), bitorder="little")[:tok.vocab_size]
        ok = bool(bits[t])
        g.advance(t)
        return ok
    return table_s, compile_s, start, step


ENGINES = {"llguidance": run_llguidance, "xgrammar": run_xgrammar, "outlines-core": run_outlines}

# keyword: (schema, a JSON text that breaks only that keyword, one that keeps it)
KEYWORDS = {
    "pattern": ({"type": "string", "pattern": "^[a-z]+-[0-9]+$"}, '"ab-x"', '"ab-12"'),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 4}, '"abcdef"', '"abc"'),
    "minimum/maximum": ({"type": "integer", "minimum": 3, "maximum": 17}, "18", "17"),
    "exclusiveMinimum (number)": ({"type": "number", "exclusiveMinimum": 0.5}, "0.5", "0.75"),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, "7", "15"),
    "enum / const": ({"enum": ["a", "b"]}, '"c"', '"b"'),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, "[1]", "[1, 2]"),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}],
                     "items": False}, '["x"]', "[1]"),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}},
                  "required": ["a"]}, "{}", '{"a": 1}'),
    "additionalProperties: false": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                     "additionalProperties": False}, '{"b": 1}', '{"a": 1}'),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, '"s"', "true"),
    "$ref (recursive)": ({"$defs": {"n": {"type": "object", "properties": {
        "c": {"$ref": "#/$defs/n"}}, "additionalProperties": False}}, "$ref": "#/$defs/n"},
        '{"c": {"d": 1}}', '{"c": {"c": {}}}'),
    "minProperties": ({"type": "object", "minProperties": 1}, "{}", '{"a": 1}'),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]", "[1, 2]"),
    "not": ({"not": {"type": "string"}}, '"a"', "1"),
    "if/then": ({"if": {"properties": {"a": {"const": 1}}, "required": ["a"]},
                 "then": {"required": ["b"]}}, '{"a": 1}', '{"a": 1, "b": 2}'),
}


def _bytes_engine(name: str):
    """compile(schema) -> accepts(text) over a vocabulary of the 256 bytes + an end token."""
    if name == "llguidance":
        import llguidance

        class Bytes:
            eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
            tokens = [bytes([i]) for i in range(256)] + [b"\xff<end>"]

            def __call__(self, s):
                return list(s.encode() if isinstance(s, str) else s)
        tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Bytes()))

        def compile_(schema):
            from kvslim.grammar import json_grammar
            source = json_grammar(schema).source
            return lambda text: _ll_accepts(llguidance.LLMatcher(tok, source, log_level=0), text)
        return compile_
    if name == "xgrammar":
        import xgrammar as xgr
        info = xgr.TokenizerInfo([bytes([i]) for i in range(256)] + [b""], vocab_size=257,
                                 stop_token_ids=[256])
        comp = xgr.GrammarCompiler(info)

        def compile_(schema):
            g = comp.compile_json_schema(json.dumps(schema))
            return lambda text: _xgr_accepts(xgr.GrammarMatcher(g), text)
        return compile_
    import outlines_core as oc

    def compile_(schema):
        regex = oc.json_schema.build_regex_from_schema(json.dumps(schema))
        import re
        return lambda text: re.fullmatch(regex, text) is not None
    return compile_


def _ll_accepts(m, text: str) -> bool:
    return m.consume_tokens(list(text.encode())) and m.is_accepting()


def _xgr_accepts(m, text: str) -> bool:
    return m.accept_string(text) and m.is_completed() if hasattr(m, "is_completed") else \
        m.accept_string(text)


def keyword_table(engines: list[str]) -> None:
    compilers = {}
    for name in engines:
        try:
            compilers[name] = _bytes_engine(name)
        except ImportError:
            pass
    print("\n| keyword | " + " | ".join(compilers) + " |")
    print("|---|" + "---|" * len(compilers))
    for kw, (schema, bad, good) in KEYWORDS.items():
        cells = []
        for name, compile_ in compilers.items():
            try:
                accepts = compile_(schema)
            except Exception:  # noqa: BLE001 - the engine refuses the schema
                cells.append("refused")
                continue
            if not accepts(good):  # refuses valid text too: the test says nothing
                cells.append("wrong (refuses a valid text)")
            else:
                cells.append("ignored" if accepts(bad) else "enforced")
        print(f"| {kw} | " + " | ".join(cells) + " |")


def measure(name: str, tok: Tokenizer, ids: list[int], repeats: int) -> dict | None:
    try:
        table_s, compile_s, start, step = ENGINES[name](tok, ids)
    except ImportError as e:
        print(f"{name}: not installed ({e})", file=sys.stderr)
        return None
    starts, steps, ok = [], [], True
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = start()
        starts.append(time.perf_counter() - t0)
        for t in ids:
            t0 = time.perf_counter()
            ok &= step(state, t)
            steps.append(time.perf_counter() - t0)
    return {"engine": name, "table_s": table_s, "compile_s": compile_s, "start_ms": 1e3 * float(np.median(starts)),
            "step_us_median": 1e6 * float(np.median(steps)),
            "step_us_p90": 1e6 * float(np.percentile(steps, 90)), "masks_right": ok}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=SMOLLM2, help="a .gguf whose vocabulary to use")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default=",".join(ENGINES))
    args = ap.parse_args(argv)
    tok = Tokenizer.from_gguf(args.model)
    from kvslim.grammar import _Wrapper
    ids = _Wrapper(tok)(json.dumps(ANSWER))  # an answer's tokens (no SentencePiece start space)
    print(f"vocabulary {tok.vocab_size} tokens; answer {len(ids)} tokens; {args.repeats} passes")
    print("| engine | vocabulary table (s) | compile schema (ms) | start a sequence (ms) | "
          "mask + advance, median (us) | p90 (us) | masks right |")
    print("|---|---|---|---|---|---|---|")
    for name in args.engines.split(","):
        r = measure(name, tok, ids, args.repeats)
        if r:
            print(f"| {r['engine']} | {r['table_s']:.2f} | {1e3 * r['compile_s']:.1f} | {r['start_ms']:.2f} | "
                  f"{r['step_us_median']:.0f} | {r['step_us_p90']:.0f} | {r['masks_right']} |")
    keyword_table(args.engines.split(","))


if __name__ == "__main__":
    main()
