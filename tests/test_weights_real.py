"""Quantized weights (GGUF blocks read in place) against the same file dequantized at load,
on the real SmolLM2-135M GGUF (Q4_1): quality, greedy text and the bytes held."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvslim.weights import QLinear, QTensor

pytestmark = pytest.mark.slow

GREEDY = dict(temperature=0, repeat_penalty=1.0, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           [{"role": "user", "content": "Why is the sky blue?"}]]


@pytest.fixture(scope="module")
def pair(smollm2_gguf):
    from kvslim import LLM

    kw = dict(kv_cache_type="f16", num_ctx=2048, progress=False, device="cpu")
    return LLM(str(smollm2_gguf), weights="quantized", **kw), LLM(str(smollm2_gguf), weights="dequantize", **kw)


def test_logits_kld_over_2048_tokens(pair, jargon_text):
    q, d = pair
    ids = q.tokenize(jargon_text[20000:60000])[:2048]
    assert len(ids) == 2048
    lq, ld = (torch.log_softmax(m.logits(ids).double(), -1) for m in (q, d))
    kld = (ld.exp() * (ld - lq)).sum(-1).mean().item()
    assert kld <= 1e-4, f"KLD {kld:.2e}"


@pytest.fixture(scope="module")
def int_dots(smollm2_gguf):
    """The quantized-weight model with the decode GEMV's integer dots forced on (x rounded
    to 15-bit integers per 32 values), whatever this machine's measurement chose."""
    from kvslim import LLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVSLIM_QDOT", "int")
        return LLM(str(smollm2_gguf), weights="quantized", kv_cache_type="f16", num_ctx=2048,
                   progress=False, device="cpu")


def test_logits_kld_through_the_integer_gemv(pair, int_dots, jargon_text):
    """Every one of 512 rows through the decode GEMV (as decode rows in groups of
    GEMV_MAX_ROWS) with the integer dots, against the dequantized float32 model (512, not
    2,048: each group of 16 rows reads all the weights; 2,048 rows measured 8.6e-7)."""
    from kvslim.weights import step_rows

    _, d = pair
    ids = int_dots.tokenize(jargon_text[20000:60000])[:512]
    with step_rows(len(ids)):
        lq = torch.log_softmax(int_dots.logits(ids).double(), -1)
    ld = torch.log_softmax(d.logits(ids).double(), -1)
    kld = (ld.exp() * (ld - lq)).sum(-1).mean().item()
    assert kld <= 1e-4, f"KLD {kld:.2e}"


@pytest.mark.parametrize("prompt", PROMPTS, ids=["prose", "code", "chat"])
def test_greedy_text_equal(pair, int_dots, prompt):
    """The dequantized model's greedy text, from the quantized one with the dots chosen
    here and with the integer dots."""
    q, d = pair
    ids = q.chat_prompt(prompt) if isinstance(prompt, list) else q.tokenize(prompt)
    a, b, c = (m.generate(ids, max_tokens=32, **GREEDY).token_ids for m in (q, d, int_dots))
    assert a == b, (q.detokenize(a), d.detokenize(b))
    assert c == b, (q.detokenize(c), d.detokenize(b))


def test_bytes_held_exact_in_both_modes(pair, smollm2_gguf):
    q, d = pair
    assert q.model.weight_bytes == q.config.held_weight_bytes("quantized") == 96_576_768
    assert d.model.weight_bytes == d.config.held_weight_bytes("dequantize") == 4 * q.config.n_params
    info = q.memory_info()
    assert info["weights"] == "quantized" and info["total_bytes"] == info["weights_bytes"] + info["kv_bytes"]


def test_quantized_weights_are_views_of_the_file(pair):
    """Every matrix is blocks in the mapped file (no copy), the tied head is the table."""
    q, _ = pair
    m = q.model
    lins = [lin for L in m.layers for lin in (L.wqkv, L.wo, L.w13, L.w2)] + [m.output]
    assert all(isinstance(lin, QLinear) for lin in lins)
    table = m.embed.table
    assert isinstance(table, QTensor) and m.output.qtensors == [table]
    base = table.data
    assert not base.flags.writeable and not base.flags.owndata
    assert all(np.shares_memory(t.data, base) for lin in lins for t in lin.qtensors)
