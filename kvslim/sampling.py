"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, min-p, penalties.

Defaults and order follow Ollama (api/types.go DefaultOptions; sample/samplers.go):
penalties over the last ``repeat_last_n`` tokens of the context (prompt included), then
top-k, temperature, softmax, top-p, min-p, and a draw. ``temperature == 0`` is greedy
(after penalties). Each sequence draws from its own ``torch.Generator``, so parallel
sequences with seeds are reproducible whatever else runs in the batch.

A sequence under a grammar (``kvslim.grammar.Constraint``, duck-typed: ``allowed()``,
``advance(token)``, ``finished``) has its logits masked to the tokens the grammar allows,
after the penalties and before everything else; each sequence of a batch has its own.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["SamplingParams", "Sampler", "sample", "greedy_rows", "apply_mask", "NoAllowedToken",
           "token_logprobs", "MAX_TOP_LOGPROBS"]

MAX_TOP_LOGPROBS = 20  # OpenAI's and Ollama's bound on top_logprobs


@dataclass
class SamplingParams:
    """What a request asks of generation. ``max_tokens`` None = until EOS or context full."""

    temperature: float = 0.8
    top_k: int = 40  # 0: off
    top_p: float = 0.9  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repeat_penalty: float = 1.1  # 1.0: off
    repeat_last_n: int = 64  # 0: off, -1: the whole context
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None or negative: a random seed
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: each token's logprob and the k likeliest

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if self.max_tokens is not None and self.max_tokens < 0:
            self.max_tokens = None  # Ollama's num_predict -1: no limit
        for name, ok, rule in _checks(self):
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

    @classmethod
    def from_options(cls, **options) -> "SamplingParams":
        """Build from keyword options; Ollama's ``num_predict`` is accepted for ``max_tokens``."""
        if "num_predict" in options:
            options["max_tokens"] = options.pop("num_predict")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**options)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalized(self) -> bool:
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)


# Penalties are subtracted from logits (tens at most in real models): beyond this an
# option bans or forces tokens no more than it already does, and float32 overflows.
MAX_PENALTY = 1e4
SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed takes


def _number(x, integer: bool = False) -> bool:
    kinds = int if integer else (int, float)
    return isinstance(x, kinds) and not isinstance(x, bool) and math.isfinite(x)


def _checks(p: SamplingParams) -> list[tuple[str, bool, str]]:
    """(field, valid, rule): finite, meaningful values only, so that no request can put a
    NaN or an infinity into a batched step."""
    num, whole = _number, functools.partial(_number, integer=True)
    return [
        ("temperature", num(p.temperature) and p.temperature >= 0, "must be a finite number >= 0"),
        ("top_k", whole(p.top_k) and p.top_k >= 0, "must be an integer >= 0"),
        ("top_p", num(p.top_p) and 0.0 < p.top_p <= 1.0, "must be in (0, 1]"),
        ("min_p", num(p.min_p) and 0.0 <= p.min_p <= 1.0, "must be in [0, 1]"),
        ("repeat_penalty", num(p.repeat_penalty) and 1 / MAX_PENALTY <= p.repeat_penalty <= MAX_PENALTY,
         f"must be in [{1 / MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
        ("repeat_last_n", whole(p.repeat_last_n) and p.repeat_last_n >= -1,
         "must be an integer >= -1"),
        ("presence_penalty", num(p.presence_penalty) and abs(p.presence_penalty) <= MAX_PENALTY,
         f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
        ("frequency_penalty", num(p.frequency_penalty) and abs(p.frequency_penalty) <= MAX_PENALTY,
         f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
        ("seed", p.seed is None or (whole(p.seed) and SEED_RANGE[0] <= p.seed < SEED_RANGE[1]),
         "must be an integer below 2**64 (negative: a random seed)"),
        ("max_tokens", p.max_tokens is None or whole(p.max_tokens), "must be an integer"),
        ("logprobs", p.logprobs is None or (whole(p.logprobs) and 0 <= p.logprobs <= MAX_TOP_LOGPROBS),
         f"must be an integer in [0, {MAX_TOP_LOGPROBS}]"),
    ]


class NoAllowedToken(RuntimeError):
    """A sequence's grammar allows no token of its vocabulary: that request ends in error."""


class Sampler:
    """Per-sequence sampling state: the parameters, the random generator and the
    sequence's grammar constraint, if any."""

    def __init__(self, params: SamplingParams, constraint=None):
        self.params = params
        self.constraint = constraint
        self.generator = torch.Generator()  # on CPU: draws happen on a few CPU candidates
        if params.seed is None or params.seed < 0:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits [V] of one row, history: the sequence's tokens so far -> the next token id."""
        allowed = self.constraint.allowed() if self.constraint is not None else None
        return sample(logits, self.params, history, self.generator, allowed)

    def accept(self, token: int) -> bool:
        """Advance the grammar with an accepted token; True when the grammar has ended."""
        if self.constraint is None:
            return False
        self.constraint.advance(token)
        return self.constraint.finished


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits [V] with every token outside ``allowed`` (bool [A], one per tokenizer token:
    ids the other one lacks are never allowed) set to -inf."""
    n = min(allowed.shape[0], logits.shape[-1])
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[:n] = allowed[:n].to(logits.device)
    if not bool(keep.any()):
        raise NoAllowedToken("the grammar allows no token here")
    return logits.masked_fill(~keep, float("-inf"))


def apply_penalties(logits: torch.Tensor, p: SamplingParams, history: list[int]) -> torch.Tensor:
    """llama.cpp's penalties over the last n tokens: repeat (divide positive logits,
    multiply negative ones), then frequency (per occurrence) and presence (once).
    On CPU through numpy (``penalties_torch`` is the reference, and the GPU path): its
    dozen torch ops took 155 us warm where numpy's take 57 (0.5 ms of SmolLM2's 14 ms
    decode step in a profile, where each op runs on a cold cache)."""
    window = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:]
    if not window:
        return logits
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return penalties_torch(logits, p, window)
    counts = collections.Counter(window)
    ids = np.fromiter(counts.keys(), np.int64, len(counts))
    n = np.fromiter(counts.values(), np.float32, len(counts))
    out = logits.detach().numpy().copy()
    sel = out[ids]
    sel = np.where(sel > 0, sel / np.float32(p.repeat_penalty), sel * np.float32(p.repeat_penalty))
    out[ids] = sel - n * np.float32(p.frequency_penalty) - np.float32(p.presence_penalty)
    return torch.from_numpy(out)


def penalties_torch(logits: torch.Tensor, p: SamplingParams, window: list[int]) -> torch.Tensor:
    """``apply_penalties`` on a non-empty window, in torch (any device)."""
    ids, counts = torch.tensor(window, device=logits.device).unique(return_counts=True)
    sel = logits[ids]
    sel = torch.where(sel > 0, sel / p.repeat_penalty, sel * p.repeat_penalty)
    sel = sel - counts.to(sel.dtype) * p.frequency_penalty - p.presence_penalty
    logits = logits.clone()
    logits[ids] = sel
    return logits


def greedy_rows(logits: torch.Tensor) -> list[int]:
    """Each row's first largest logit, logits [R, V]. On CPU through numpy: torch's
    argmax of one 49,152-value row cost 54 us (its parallel reduction) where numpy's
    took 9 (the same first index of the maximum, NaN counted as the largest in both)."""
    if logits.device.type == "cpu":
        return logits.detach().numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def sample(logits: torch.Tensor, p: SamplingParams, history: list[int],
           generator: torch.Generator | None = None, allowed: torch.Tensor | None = None) -> int:
    """One token from logits [V] (float32); ``allowed`` (bool [<= V]): a grammar's mask."""
    if p.penalized:
        logits = apply_penalties(logits, p, history)
    if allowed is not None:
        logits = apply_mask(logits, allowed)
    if p.greedy:
        return greedy_rows(logits[None])[0]
    if 0 < p.top_k < logits.shape[0]:
        vals, ids = logits.topk(p.top_k)  # sorted, descending
    else:
        vals, ids = logits.sort(descending=True)
    vals, ids = vals.float().cpu(), ids.cpu()  # the generator lives on the CPU
    if not torch.isfinite(vals[0]):
        raise RuntimeError(f"the logits are not finite ({float(vals[0])})")
    # shifted by the maximum before the division: a tiny temperature sends the other
    # logits to -inf (probability 0) instead of the maximum to inf (NaN after softmax)
    # (at least float32's smallest normal: a smaller one would round to 0 and give 0/0)
    temperature = max(p.temperature, torch.finfo(torch.float32).tiny)
    probs = torch.softmax((vals - vals[0]) / temperature, dim=-1)  # [K] descending
    keep = probs.shape[0]
    if p.top_p < 1.0:
        # smallest prefix whose mass reaches top_p (at least one token)
        keep = min(keep, int((probs.cumsum(0) < p.top_p).sum()) + 1)
    if p.min_p > 0.0:
        keep = min(keep, max(1, int((probs >= p.min_p * probs[0]).sum())))
    probs = probs[:keep]
    choice = torch.multinomial(probs / probs.sum(), 1, generator=generator)
    return int(ids[choice])


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of ``token`` and its ``top`` likeliest (id, logprob),
    from logits [V] as the model gave them (before penalties and temperature, as
    OpenAI and Ollama report them)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [V]
    best = logp.topk(top) if top else None
    alts = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return float(logp[token]), alts
