"""Embeddings batched vs one input at a time, and n answers forked from one prefill vs n
separate requests, on one engine (ratios within one run; the machine may be busy).

    python benchmarks/embed_fork.py                 # smollm2, 16 inputs, n = 4, 300-token prompt
    python benchmarks/embed_fork.py --model ./m.gguf --inputs 32 --n 8 --prompt 1000

Embeddings: --inputs prose sentences of about 20 tokens, embedded in one call (packed into
shared forwards) and then one per call; the vectors must agree (cosine > 0.9999).
Forks: one --prompt-token prose prompt answered --n times (greedy, 8 tokens) as one request
with n (the prompt evaluated once, the others fork its pages) and as n requests admitted
together (each evaluates the prompt; the prefix cache is off so none reuses another's).
Prints prompt tokens evaluated, K/V pages at the peak and seconds for each.
"""
from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kvslim.engine import Engine  # noqa: E402
from kvslim.llm import LLM  # noqa: E402
from kvslim.sampling import SamplingParams  # noqa: E402

JARGON = "/usr/share/doc/jargon-text/jargon.txt.gz"


def prose() -> str:
    with gzip.open(JARGON, "rt", encoding="utf-8") as f:
        return " ".join(f.read()[20000:80000].split())


def bench_embed(llm: LLM, text: str, count: int) -> None:
    words = text.split()
    inputs = [llm.tokenize(" ".join(words[i * 15:(i + 1) * 15])) for i in range(count)]
    e = llm.engine
    e.embed(inputs[:2])  # warm up
    t0 = time.perf_counter()
    batch, n = e.embed(inputs)
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = torch.cat([e.embed([x])[0] for x in inputs])
    t_alone = time.perf_counter() - t0
    agree = float((batch * alone).sum(-1).min())
    print(f"embeddings: {count} inputs, {n} tokens: batched {t_batch:.2f} s, one at a time "
          f"{t_alone:.2f} s ({t_alone / t_batch:.2f}x), min cosine {agree:.6f}", flush=True)


def run(e: Engine, ids: list[int], n: int, together: bool) -> tuple[float, int, int, list]:
    params = SamplingParams(max_tokens=8, temperature=0, repeat_penalty=1.0)
    t0 = time.perf_counter()
    seqs = e.add_request(ids, params, n=n).group if together else \
        [e.add_request(ids, params) for _ in range(n)]
    peak = 0
    while e.has_work():
        e.step()
        peak = max(peak, e.cache.pages_in_use)
    evaluated = sum(s.stats.prompt_eval_count for s in seqs)
    return time.perf_counter() - t0, evaluated, peak, [s.output_ids for s in seqs]


def bench_fork(llm: LLM, text: str, n: int, prompt: int) -> None:
    ids = llm.tokenize(text)[:prompt]
    e = Engine(llm.model, llm.tokenizer, num_ctx=prompt + 64, num_parallel=n)  # no prefix cache
    run(e, ids[:32], 1, False)  # warm up
    t_fork, ev_fork, pk_fork, out_fork = run(e, ids, n, True)
    t_sep, ev_sep, pk_sep, out_sep = run(e, ids, n, False)
    assert out_fork == out_sep, "forked greedy answers differ from separate ones"
    print(f"n = {n} answers to a {len(ids)}-token prompt: forked {t_fork:.2f} s, {ev_fork} prompt "
          f"tokens evaluated, peak {pk_fork} pages; separate {t_sep:.2f} s, {ev_sep} tokens, "
          f"peak {pk_sep} pages ({t_sep / t_fork:.2f}x the time)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=300)
    args = ap.parse_args()
    llm = LLM(args.model, progress=False, prefix_cache=False)
    text = prose()
    bench_embed(llm, text, args.inputs)
    bench_fork(llm, text, args.n, args.prompt)


if __name__ == "__main__":
    main()
