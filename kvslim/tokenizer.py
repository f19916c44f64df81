"""Tokenizer read from a GGUF file's `tokenizer.ggml.*` metadata.

Two vocabulary kinds, as llama.cpp (llama-vocab.cpp) implements them, so token ids
match llama.cpp's for the same GGUF:

* ``gpt2``: byte-level BPE. Text is pre-split by the regex list that
  ``tokenizer.ggml.pre`` names, each word is mapped byte -> printable char (GPT-2's
  byte-to-unicode table) and merged by rank (lowest first, leftmost on ties).
* ``llama``: SentencePiece pieces with scores. Spaces become ``▁``; a leading space
  is added (``add_space_prefix``) at the start and after each special token; pieces
  merge by score (highest first, leftmost on ties); characters with no piece fall back
  to ``<0xXX>`` byte tokens.

Special tokens (control, user-defined, unknown) are split out of the text before
either algorithm runs, longest text first. With ``parse_special=False`` only
user-defined tokens are split out, so ``<|im_start|>`` typed by a user stays text.

Deliberate differences from llama.cpp, all on the decode side:

* ``decode`` never applies llama.cpp's ``clean_spaces`` pass (" ." -> "."), so decode
  is lossless and the streaming decoder yields exactly what ``decode`` returns.
* With ``add_space_prefix`` the space in front of the first *visible* piece is dropped
  (HF SentencePiece behaviour); llama.cpp keeps it when a BOS token precedes it.
"""
from __future__ import annotations

import array
import codecs
import dataclasses
import functools
import heapq
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import gguf
import numpy as np
import regex

from kvslim.gguf_loader import array_values

logger = logging.getLogger(__name__)

# gguf TokenType values (gguf.TokenType), kept as plain ints for speed.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE_MARK = "\u2581"  # SentencePiece's visible space, "▁"

# Pre-tokenized words longer than this are merged in slices of this many characters:
# ids differ from one whole-word merge only near the slice edges of such runs, and
# merging costs a Python heap operation per character, which no prompt should pay in
# one unbounded piece. Real words are far shorter, so their ids are llama.cpp's.
MAX_WORD_CHARS = 512
_WORD_START = regex.compile("(?<=[^\u2581])\u2581")  # a "▁" after a non-space

# ---------------------------------------------------------------------------
# Pre-tokenizer regexes, by llama.cpp pre-type. Each entry is applied in order; a
# regex splits every current chunk into its matches *and* the text between them.
# ---------------------------------------------------------------------------

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# "upper" = a letter that is not a-z, "lower" = a letter that is not A-Z (llama.cpp's
# ASCII-only reading of \p{Lu}/\p{Ll}, kept so ids match it).
_UP, _LO = r"(?:(?=\p{L})[^a-z])", r"(?:(?=\p{L})[^A-Z])"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UP}*{_LO}+|[^\r\n\p{{L}}\p{{N}}]?{_UP}+{_LO}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UP}*{_LO}+{_CONTRACTIONS}?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UP}+{_LO}*{_CONTRACTIONS}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is already a token skips merging
    add_bos: bool = False        # default when the GGUF has no add_bos_token


_PRE_GROUPS: dict[str, _PreTokenizer] = {
    "default": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    "gpt2": _PreTokenizer((_GPT2,)),
    "smollm": _PreTokenizer((r"\p{N}", _GPT2)),
    "llama3": _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    "dbrx": _PreTokenizer((_LLAMA3,)),  # llama3's regex without its merge/BOS flags
    "qwen2": _PreTokenizer((_QWEN2,)),
    "qwen35": _PreTokenizer((_QWEN35,)),
    "tekken": _PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
    "gpt4o": _PreTokenizer((_GPT4O,)),
    "falcon": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
    "bloom": _PreTokenizer((r" ?[^(\s|.,!?…。，、।۔،)]+",)),
}

# tokenizer.ggml.pre value -> group above (names as llama.cpp's converter writes them).
_PRE_NAMES: dict[str, str] = {
    **dict.fromkeys(["default"], "default"),
    **dict.fromkeys(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                     "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais",
                     "trillion", "granite-docling", "exaone4", "jina-v1-en", "jina-v2-code",
                     "roberta-bpe"], "gpt2"),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b", "mellum2"], "smollm"),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano"], "llama3"),
    **dict.fromkeys(["dbrx", "smaug-bpe", "glm4", "chatglm-bpe"], "dbrx"),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "megrez",
                     "hunyuan", "solar-open"], "qwen2"),
    **dict.fromkeys(["qwen35"], "qwen35"),
    **dict.fromkeys(["tekken"], "tekken"),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], "gpt4o"),
    **dict.fromkeys(["falcon"], "falcon"),
    **dict.fromkeys(["bloom", "poro-chat", "gpt3-finnish"], "bloom"),
}


def _pre_tokenizer(name: str) -> _PreTokenizer:
    """The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` == `name`."""
    if not name:
        logger.warning("GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' "
                       "pre-tokenizer (token ids may differ from the original model)")
        return _PRE_GROUPS["default"]
    group = _PRE_NAMES.get(name)
    if group is None:
        logger.warning("unknown pre-tokenizer %r; falling back to the GPT-2 regex "
                       "(token ids may differ from llama.cpp)", name)
        return _PRE_GROUPS["gpt2"]
    return _PRE_GROUPS[group]


def _split(chunks: list[str], pattern: regex.Pattern) -> list[str]:
    """Split each chunk into regex matches and the gaps between them, in order."""
    out: list[str] = []
    for chunk in chunks:
        pos = 0
        for m in pattern.finditer(chunk):
            start, end = m.span()
            if start > pos:
                out.append(chunk[pos:start])
            if end > start:
                out.append(chunk[start:end])
            pos = end
        if pos < len(chunk):
            out.append(chunk[pos:])
    return out


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> list[str]:
    """GPT-2's table: printable bytes map to themselves, the rest to U+0100 upwards."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


def _merge_pairs(syms: list[str], priority: Callable[[str, str], float | None]) -> list[str]:
    """Merge adjacent symbols, smallest priority first and leftmost on ties, until no
    adjacent pair has a priority. The shared core of BPE (priority = merge rank) and
    SentencePiece (priority = -piece score), with llama.cpp's queue order."""
    if len(syms) < 2:
        return syms
    nxt = [*range(1, len(syms)), -1]  # linked list over syms; merged-away slots are ""
    prv = list(range(-1, len(syms) - 1))
    heap = [(p, i, syms[i] + syms[i + 1]) for i in range(len(syms) - 1)
            if (p := priority(syms[i], syms[i + 1])) is not None]
    heapq.heapify(heap)
    while heap:
        _, left, text = heapq.heappop(heap)
        right = nxt[left]
        if right < 0 or not syms[left] or syms[left] + syms[right] != text:
            continue  # stale: one side was merged since this pair was queued
        syms[left], syms[right] = text, ""
        nxt[left] = nxt[right]
        if nxt[left] >= 0:
            prv[nxt[left]] = left
        for a, b in ((prv[left], left), (left, nxt[left])):
            if a >= 0 and b >= 0 and (p := priority(syms[a], syms[b])) is not None:
                heapq.heappush(heap, (p, a, syms[a] + syms[b]))
    return [s for s in syms if s]


def _merge_tables(merges: Sequence[str], to_id: Mapping[str, int]
                  ) -> tuple[array.array, array.array, dict[str, int]]:
    """BPE merge ranks by the token each merge makes: (rank, cut, others). A merge "x y"
    makes the token x + y; ``rank[t]`` is the rank of the first merge that makes token t
    and ``cut[t]`` its len(x) (0: none), so the rank of a pair (x, y) is ``rank[t]`` when
    t = x + y is a token whose ``cut[t]`` is len(x). ``others`` keys by text ("x y", first
    rank) the merges whose result is no token or is made by an earlier merge at another
    cut (none in SmolLM2's 48,900). The symbols merged are byte-level characters, never a
    space (the space maps to "Ġ"), so a merge with a space inside a side can never apply:
    left out. A dict of the merges' texts held 7 MB for SmolLM2; these 0.3 MB."""
    n = len(to_id) and max(to_id.values()) + 1
    rank, cut = array.array("i", [-1]) * n, array.array("H", [0]) * n
    others: dict[str, int] = {}
    for r, merge in enumerate(merges):
        c = merge.find(" ")
        if c <= 0 or merge.find(" ", c + 1) >= 0:
            continue
        t = to_id.get(merge[:c] + merge[c + 1:])
        if t is not None and cut[t] == 0 and c < 1 << 16:
            rank[t], cut[t] = r, c
        elif t is None or cut[t] != c:  # (the same text again keeps its first rank)
            others.setdefault(merge, r)
    return rank, cut, others


def _pair_ranker(tables: tuple, to_id: Mapping[str, int]) -> Callable[[str, str], int | None]:
    """The rank of the merge of a pair (x, y) from ``_merge_tables``' tables, or None."""
    rank_of, cut_of, others = tables

    def rank(x: str, y: str) -> int | None:
        t = to_id.get(x + y)
        if t is not None and cut_of[t] == len(x):
            return rank_of[t]
        return others.get(x + " " + y) if others else None
    return rank


# ---------------------------------------------------------------------------
# Vocabulary metadata
# ---------------------------------------------------------------------------

# Token texts that llama.cpp treats as end of generation, whatever the GGUF says.
_EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
    "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>",
    "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>",
    "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
])
# Candidates for the EOT token when the GGUF names none, most specific first.
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
              "<end_of_utterance>")
# FIM pad / repo / file-separator tokens also stop generation in llama.cpp.
_FIM_EOG_TEXTS = {
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's instruction format (Google's template for Gemma 2/3 text): a system message is
# folded into the first user turn; the assistant's role is "model". Used for gemma GGUFs
# that carry no template (llama.cpp's converter omits it when the tokenizer has none).
_GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
_DEFAULT_TEMPLATES = {"gemma2": _GEMMA_TEMPLATE, "gemma3": _GEMMA_TEMPLATE}


def _field(reader: Any, key: str) -> Any:
    """A GGUF metadata value as a Python scalar, str, list or numpy array (None if absent).

    Reads ReaderField.parts directly so it works across gguf package versions.
    """
    f = reader.fields.get(key)
    if f is None:
        return None
    main = f.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        return array_values(f)
    value = f.parts[f.data[0]]
    if main == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8", errors="replace")
    value = value.tolist()[0]
    return bool(value) if main == gguf.GGUFValueType.BOOL else value


@dataclass
class GGUFVocab:
    """Everything the tokenizer needs from `tokenizer.ggml.*`, already defaulted
    the way llama.cpp defaults it."""

    model: str                      # "gpt2" or "llama"
    pre: str                        # tokenizer.ggml.pre ("" when absent)
    tokens: list[str]
    types: list[int]                # gguf TokenType per id
    scores: list[float]             # SPM merge priorities (zeros for BPE)
    merges: list[str]               # "left right", rank = index (BPE only)
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: str | None = None
    fim_ids: dict[str, int] = field(default_factory=dict)
    # the merges as ``_merge_tables`` keeps them, once a Tokenizer has built them from
    # ``merges`` (which it then empties: its vocab holds the tables, not the texts)
    merge_tables: tuple | None = None

    @classmethod
    def from_gguf(cls, reader: Any) -> "GGUFVocab":
        model = _field(reader, "tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ValueError(f"unsupported tokenizer model {model!r} "
                             "(kvslim supports 'gpt2' byte-level BPE and 'llama' SentencePiece)")
        tokens = _field(reader, "tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF has no tokenizer.ggml.tokens")
        # an empty text would match everywhere; llama.cpp renames such tokens the same way
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        n = len(tokens)
        types = _field(reader, "tokenizer.ggml.token_type")
        scores = _field(reader, "tokenizer.ggml.scores")
        pre = _field(reader, "tokenizer.ggml.pre") or ""
        is_spm = model == "llama"
        vocab = cls(
            model=model,
            pre=pre,
            tokens=tokens,
            types=[int(t) for t in types[:n].tolist()] if types is not None else [NORMAL] * n,
            scores=[float(s) for s in scores[:n].tolist()] if scores is not None else [0.0] * n,
            merges=_field(reader, "tokenizer.ggml.merges") or [],
            # llama.cpp's defaults, overridden below by the GGUF's own flags
            add_bos=is_spm or _PRE_GROUPS[_PRE_NAMES.get(pre, "gpt2")].add_bos,
            add_space_prefix=is_spm,
            chat_template=(_field(reader, "tokenizer.chat_template")
                           or _DEFAULT_TEMPLATES.get(_field(reader, "general.architecture"))),
        )
        if model == "gpt2" and not vocab.merges:
            raise ValueError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
        if is_spm:  # llama.cpp's SentencePiece defaults, used when the keys are absent
            vocab.bos_id, vocab.eos_id, vocab.unk_id = 1, 2, 0
        vocab._read_special_ids(reader)
        for attr, key in (("add_bos", "add_bos_token"), ("add_eos", "add_eos_token"),
                          ("add_space_prefix", "add_space_prefix")):
            value = _field(reader, f"tokenizer.ggml.{key}")
            if value is not None:
                setattr(vocab, attr, bool(value))
        return vocab

    def _read_special_ids(self, reader: Any) -> None:
        n = len(self.tokens)
        for name, key in (("bos", "bos"), ("eos", "eos"), ("eot", "eot"), ("eom", "eom"),
                          ("unk", "unknown"), ("pad", "padding")):
            value = _field(reader, f"tokenizer.ggml.{key}_token_id")
            if value is not None and 0 <= int(value) < n:
                setattr(self, f"{name}_id", int(value))
            elif value is not None:
                logger.warning("tokenizer.ggml.%s_token_id=%s is outside the vocab; ignored", name, value)
            current = getattr(self, f"{name}_id")
            if current is not None and current >= n:
                setattr(self, f"{name}_id", None)
        for name in _FIM_EOG_TEXTS:
            value = _field(reader, f"tokenizer.ggml.{name}_token_id")
            if value is not None and 0 <= int(value) < n:
                self.fim_ids[name] = int(value)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


class Tokenizer:
    """Encode/decode text with a GGUF vocabulary; render its chat template.

    Attributes: ``vocab_size``; ``bos_id``, ``eos_id``, ``eot_id``, ``pad_id``,
    ``unk_id`` (``None`` when the model has none); ``eog_ids``, every id that ends
    generation (EOS, EOT, ``<|im_end|>``, ``<|endoftext|>``, FIM separators... as
    llama.cpp decides); ``add_bos`` / ``add_eos``, whether ``encode(add_special=True)``
    adds them.
    """

    def __init__(self, vocab: GGUFVocab, *, cache_size: int = 1 << 16) -> None:
        self.vocab = vocab
        self.is_spm = vocab.model == "llama"
        self.vocab_size = len(vocab.tokens)
        # reversed so that a duplicated text maps to its first id
        self.token_to_id = dict(zip(reversed(vocab.tokens), range(self.vocab_size - 1, -1, -1)))
        self._types = list(vocab.types)
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = (
            vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id)
        self.add_bos, self.add_eos = vocab.add_bos, vocab.add_eos
        self.add_space_prefix = vocab.add_space_prefix
        self.eot_id = vocab.eot_id if vocab.eot_id is not None else self._find_eot()
        self.eog_ids: set[int] = self._find_eog()
        if self.add_bos and self.bos_id is None:
            raise ValueError("tokenizer.ggml.add_bos_token is true but the GGUF has no BOS token")
        if self.add_eos and self.eos_id is None:
            raise ValueError("tokenizer.ggml.add_eos_token is true but the GGUF has no EOS token")
        # Longest (in bytes) first, as llama.cpp partitions; ties by id for a stable order.
        specials = [i for i, t in enumerate(self._types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
        self._specials = sorted(specials, key=lambda i: (-len(vocab.tokens[i].encode()), i))
        # filled as tokens are first decoded: building all 262k of Gemma's took most of a second
        self._pieces: list[bytes | None] = [None] * self.vocab_size
        if self.is_spm:
            self._init_spm(cache_size)
        else:
            self._init_bpe(cache_size)
        self._template = None
        self._template_source: str | None = None  # a model card's, rendered instead of the GGUF's
        self.default_system: str | None = None

    @classmethod
    def from_gguf(cls, reader_or_path: Any) -> "Tokenizer":
        """Build from a `gguf.GGUFReader` or a path to a .gguf file."""
        if isinstance(reader_or_path, (str, os.PathLike)):
            reader_or_path = gguf.GGUFReader(reader_or_path)
        return cls(GGUFVocab.from_gguf(reader_or_path))

    # -- special ids ---------------------------------------------------------

    def _find_eot(self) -> int | None:
        for text in _EOT_TEXTS:
            if text in self.token_to_id:
                return self._mark_control(self.token_to_id[text])
        return None

    def _mark_control(self, tid: int) -> int:
        # llama.cpp forces control type on end-of-turn-looking tokens (converter bugs).
        if self._types[tid] != CONTROL:
            logger.warning("token %d %r looks like a control token; treating it as one",
                           tid, self.vocab.tokens[tid])
            self._types[tid] = CONTROL
        return tid

    def _find_eog(self) -> set[int]:
        eog = {self._mark_control(self.token_to_id[t]) for t in _EOG_TEXTS if t in self.token_to_id}
        for name, texts in _FIM_EOG_TEXTS.items():
            tid = self.vocab.fim_ids.get(name)
            if tid is None:
                tid = next((self.token_to_id[t] for t in texts if t in self.token_to_id), None)
            if tid is not None:
                eog.add(self._mark_control(tid))
        eog.update(i for i in (self.eos_id, self.eot_id, self.vocab.eom_id) if i is not None)
        text_of = self.vocab.tokens
        texts = {text_of[i] for i in eog}
        # gpt-oss / solar-open use <|end|> between messages, not at the end of the answer.
        if {"<|return|>", "<|call|>", "<|end|>"} <= texts or {"<|calls|>", "<|flush|>", "<|end|>"} <= texts:
            eog.discard(self.token_to_id["<|end|>"])
        # gemma4 uses </s> inside tool responses.
        if {"<|tool_response>", "</s>"} <= texts:
            eog.discard(self.token_to_id["</s>"])
        return eog

    # -- byte-level BPE ------------------------------------------------------

    def _init_bpe(self, cache_size: int) -> None:
        pre = _pre_tokenizer(self.vocab.pre)
        self._regexes = [regex.compile(p) for p in pre.regexes]
        self._ignore_merges = pre.ignore_merges
        tables = self.vocab.merge_tables
        if tables is None or self.vocab.merges:
            tables = _merge_tables(self.vocab.merges, self.token_to_id)
            # the merges' texts are not kept (SmolLM2's 48,900: 4.2 MB), only the tables
            self.vocab = dataclasses.replace(self.vocab, merges=[], merge_tables=tables)
        self._pair_rank = _pair_ranker(tables, self.token_to_id)
        b2u = _byte_to_unicode()
        self._byte_map = {i: b2u[i] for i in range(256)}  # for str.translate on latin-1
        self._encode_word = functools.lru_cache(maxsize=cache_size)(self._bpe_word)

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        """Token ids of one pre-tokenized word (cached)."""
        mapped = word.encode("utf-8").decode("latin-1").translate(self._byte_map)
        if self._ignore_merges and mapped in self.token_to_id:
            return (self.token_to_id[mapped],)
        ids: list[int] = []
        for sym in _merge_pairs(list(mapped), self._pair_rank):
            tid = self.token_to_id.get(sym)
            if tid is not None:
                ids.append(tid)
            else:  # no such token: emit its byte characters one by one (rare)
                ids.extend(self.token_to_id[c] for c in sym if c in self.token_to_id)
        return tuple(ids)

    def _encode_bpe_text(self, text: str, out: list[int]) -> None:
        chunks = [text]
        for pattern in self._regexes:
            chunks = _split(chunks, pattern)
        encode_word = self._encode_word
        for word in chunks:
            if len(word) <= MAX_WORD_CHARS:
                out.extend(encode_word(word))
                continue
            # a long run of one character class (10 MB of spaces is one "word"): merged
            # in slices, so the work is linear and repeated slices hit the cache
            for i in range(0, len(word), MAX_WORD_CHARS):
                out.extend(encode_word(word[i:i + MAX_WORD_CHARS]))

    # -- SentencePiece -------------------------------------------------------

    def _init_spm(self, cache_size: int) -> None:
        self._scores = self.vocab.scores
        # Pieces that would join a word to the "▁" starting the next one (a "▁" after a
        # non-space): by length of their part before that "▁", the set of such parts.
        # A word start that none of them spans is a boundary no merge can cross.
        bridges: dict[int, dict[str, list[str]]] = {}  # j -> piece[:j] -> pieces
        for piece in self.token_to_id:
            for j in range(1, len(piece)):
                if piece[j] == SPACE_MARK and piece[j - 1] != SPACE_MARK:
                    bridges.setdefault(j, {}).setdefault(piece[:j], []).append(piece)
        self._bridges = sorted(bridges.items())
        self._encode_spm_word = functools.lru_cache(maxsize=cache_size)(self._spm_word)

    def _spm_word(self, word: str) -> tuple[int, ...]:
        """Merge characters into pieces by score: highest first, leftmost on ties."""
        to_id, scores = self.token_to_id, self._scores

        def priority(x: str, y: str) -> float | None:
            tid = to_id.get(x + y)
            return None if tid is None else -scores[tid]

        out: list[int] = []
        for sym in _merge_pairs(list(word), priority):
            self._emit_spm_symbol(sym, out)
        return tuple(out)

    def _spm_words(self, text: str) -> Iterator[str]:
        """``text`` cut before each "▁" that follows a non-space, where no piece spans
        the cut: merging the words one by one gives what merging the whole text does,
        in linear time, and repeated words hit the cache."""
        start = 0
        for m in _WORD_START.finditer(text):
            cut = m.start()
            if any(text.startswith(p, cut - j) for j, by_head in self._bridges if j <= cut
                   for p in by_head.get(text[cut - j:cut], ())):
                continue  # a piece spans this word start: keep the words together
            yield text[start:cut]
            start = cut
        yield text[start:]

    def _encode_spm_text(self, text: str, out: list[int]) -> None:
        encode_word = self._encode_spm_word
        for word in self._spm_words(text.replace(" ", SPACE_MARK)):
            if len(word) <= MAX_WORD_CHARS:
                out.extend(encode_word(word))
                continue
            # a long run with no word start (10 MB of spaces): merged in slices, so the
            # work stays linear, as for BPE's long words
            for i in range(0, len(word), MAX_WORD_CHARS):
                out.extend(encode_word(word[i:i + MAX_WORD_CHARS]))

    def _emit_spm_symbol(self, sym: str, out: list[int]) -> None:
        tid = self.token_to_id.get(sym)
        if tid is not None:
            out.append(tid)
            return
        for b in sym.encode("utf-8"):  # byte fallback: <0xXX>, else an ASCII byte's piece
            tid = self.token_to_id.get(f"<0x{b:02X}>")
            if tid is None and b < 0x80:
                tid = self.token_to_id.get(chr(b))
            tid = self.unk_id if tid is None else tid
            if tid is not None:
                out.append(tid)

    # -- encode --------------------------------------------------------------

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split special-token text out of `text`: a list of str fragments and ids."""
        frags: list[str | int] = [text] if text else []
        for tid in self._specials:
            if not parse_special and self._types[tid] != USER_DEFINED:
                continue  # control/unknown text is plain text unless asked
            needle = self.vocab.tokens[tid]
            if not any(isinstance(f, str) and needle in f for f in frags):
                continue
            new: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or needle not in frag:
                    new.append(frag)
                    continue
                parts = frag.split(needle)
                for k, part in enumerate(parts):
                    if k:
                        new.append(tid)
                    if part:
                        new.append(part)
            frags = new
        return frags

    def encode(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama.cpp's ``llama_tokenize``.

        add_special: prepend BOS / append EOS when the model asks for them
            (``add_bos`` / ``add_eos``).
        parse_special: map special-token text such as ``<|im_start|>`` to its id; when
            False such text is tokenized as ordinary characters (user-defined tokens are
            always matched, as in llama.cpp).
        """
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        prev_special = True  # SentencePiece adds its space prefix at the start...
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True  # ...and after every special token
            elif self.is_spm:
                prefix = " " if self.add_space_prefix and prev_special else ""
                self._encode_spm_text(prefix + frag, out)
                prev_special = False
            else:
                self._encode_bpe_text(frag, out)
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    # -- decode --------------------------------------------------------------

    def _piece(self, tid: int) -> bytes:
        """Bytes of token `tid` when special tokens are rendered as their text."""
        text, kind = self.vocab.tokens[tid], self._types[tid]
        if kind in (CONTROL, USER_DEFINED, UNKNOWN):
            return text.encode("utf-8")
        if kind == BYTE and len(text) == 6 and text.startswith("<0x"):
            return bytes([int(text[3:5], 16)])
        if kind != NORMAL:
            return b""  # unused / undefined tokens print nothing, as in llama.cpp
        if self.is_spm:
            return text.replace(SPACE_MARK, " ").encode("utf-8")
        return self._unbyte(text)

    @functools.cached_property
    def _unicode_to_byte(self) -> dict[str, int]:
        return {c: b for b, c in enumerate(_byte_to_unicode())}

    def _unbyte(self, text: str) -> bytes:
        u2b = self._unicode_to_byte
        # A char outside the byte table (malformed vocab) is kept as its UTF-8.
        return b"".join(bytes([u2b[c]]) if c in u2b else c.encode("utf-8") for c in text)

    def is_special(self, tid: int) -> bool:
        """True for control and unknown tokens: the ones ``skip_special`` hides."""
        return self._types[self._check_id(tid)] in (CONTROL, UNKNOWN)

    def _check_id(self, tid: Any) -> int:
        tid = int(tid)
        if not 0 <= tid < self.vocab_size:
            raise ValueError(f"token id {tid} is outside the vocabulary (size {self.vocab_size})")
        return tid

    def token_to_piece(self, tid: int, *, special: bool = True) -> bytes:
        """Raw bytes of one token (may be part of a multi-byte UTF-8 character).

        With ``special=False`` control and unknown tokens give ``b""``.
        """
        tid = self._check_id(tid)
        if not special and self._types[tid] in (CONTROL, UNKNOWN):
            return b""
        piece = self._pieces[tid]
        if piece is None:
            piece = self._pieces[tid] = self._piece(tid)
        return piece

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of `ids`.

        skip_special: hide control and unknown tokens (BOS, EOS, ``<|im_end|>``...), as
            llama.cpp's detokenizer does with ``special=false``; user-defined tokens are
            always shown. Invalid UTF-8 becomes U+FFFD. With ``add_space_prefix``
            (SentencePiece) the leading space of the text is dropped, undoing encode's.
        """
        data = b"".join(self.token_to_piece(t, special=not skip_special) for t in ids)
        if self.add_space_prefix and data.startswith(b" "):
            data = data[1:]  # the space that encode's add_space_prefix put there
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, *, skip_special: bool = True,
                       strip_leading_space: bool = False) -> "StreamDecoder":
        """An incremental decoder for streamed token ids.

        strip_leading_space: drop the first piece's leading space like ``decode`` does
            (for a stream that starts a text; generated continuations keep it).
        """
        return StreamDecoder(self, skip_special=skip_special,
                             strip_leading_space=strip_leading_space and self.add_space_prefix)

    # -- chat template -------------------------------------------------------

    def _text(self, tid: int | None) -> str:
        return "" if tid is None else self.vocab.tokens[tid]

    @property
    def chat_template(self) -> str:
        """The GGUF's `tokenizer.chat_template`; without one, the family's own format
        (gemma) or plain ChatML."""
        return self._template_source or self.vocab.chat_template or _CHATML_TEMPLATE

    def set_chat_defaults(self, chat_template: str | None = None, system: str | None = None) -> None:
        """What a model card (a Modelfile, the Ollama registry) adds: a Jinja chat template
        rendered instead of the GGUF's, and the system message of chats that have none."""
        if chat_template:
            _compile_template(chat_template)  # a broken one fails at load, not at the first chat
            self._template_source, self._template = chat_template, None
        self.default_system = system or None

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            add_generation_prompt: bool = True, **kw: Any) -> str:
        """Render `messages` with the model's chat template (jinja2, sandboxed, HF-style).

        Messages are ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``.
        A GGUF without a template gets its family's format (gemma) or ChatML
        (``<|im_start|>role\\ncontent<|im_end|>``).
        Extra keywords (``tools=``, ...) are passed to the template. The result is meant
        to be encoded with ``parse_special=True``. Raises ValueError on malformed
        messages or when the template itself rejects them.
        """
        import jinja2

        _validate_messages(messages)
        if self.default_system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self._text(self.bos_id), eos_token=self._text(self.eos_id), **kw)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e


class StreamDecoder:
    """Turns streamed token ids into text, holding back incomplete UTF-8 sequences.

    ``push(id)`` returns the text that id completes ('' while a character is still
    partial); ``flush()`` returns whatever is held back at the end of the stream
    (incomplete bytes become U+FFFD). Concatenated, the outputs equal ``decode``.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True,
                 strip_leading_space: bool = False) -> None:
        self._tok = tokenizer
        self._special = not skip_special
        self._strip = strip_leading_space
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, tid: int) -> str:
        data = self._tok.token_to_piece(tid, special=self._special)
        if self._strip and data:
            self._strip = False
            data = data[1:] if data.startswith(b" ") else data
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# ---------------------------------------------------------------------------
# Chat template helpers
# ---------------------------------------------------------------------------

_ROLES = ("system", "user", "assistant", "tool")


def _validate_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} is {type(m).__name__}, expected a dict with role and content")
        role = m.get("role")
        if role not in _ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {', '.join(_ROLES)}")
        if "content" not in m:
            raise ValueError(f"message {i} ({role}) has no 'content'")
        content = m["content"]
        # an assistant turn that only calls tools may carry no text
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise ValueError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    # HF's tojson: unlike jinja2's, it does not HTML-escape and keeps non-ASCII text.
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


def _compile_template(source: str) -> Any:
    """Compile a chat template the way HF transformers does (sandboxed jinja2)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the GGUF's chat template does not compile: {e}") from e
