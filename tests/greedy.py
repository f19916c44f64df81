"""Comparing greedy answers of two runs that round differently (a cached prefix and a full
prefill, replicas with other thread counts): the same computation up to rounding."""
from __future__ import annotations

ROUNDING = 0.05


def same_up_to_rounding(a: dict, b: dict) -> bool:
    """Two greedy answers (Ollama chat responses with logprobs) are the same computation up
    to rounding: each token's logprob within ROUNDING of the other's, the same tokens, or
    the same until a token where the two likeliest were within ROUNDING of each other in
    both (a tie that rounding may break either way)."""
    for x, y in zip(a["logprobs"], b["logprobs"]):
        if x["token"] != y["token"]:
            return all(t["top_logprobs"][0]["logprob"] - t["top_logprobs"][1]["logprob"] < ROUNDING
                       for t in (x, y))
        if abs(x["logprob"] - y["logprob"]) > ROUNDING:
            return False
    return a["message"] == b["message"]
