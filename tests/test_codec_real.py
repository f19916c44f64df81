"""K/V coding on the real SmolLM2 GGUF: each step lowers the q4_0 cache's KL divergence
from the f16 cache (slow: model load and five 1,024-token forwards)."""
from __future__ import annotations


import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    from kvslim import LLM

    return LLM(str(smollm2_gguf), kv_cache_type="f16", num_ctx=1024, progress=False)


@pytest.fixture(scope="module")
def ids(llm, jargon_text):
    text = jargon_text
    return llm.tokenize(text[20000:40000])[:1024]  # past the front matter: running prose


def kld(llm, ids, ref: torch.Tensor, **coding) -> float:
    """Mean KL(f16 || q4_0 with ``coding``) over the second half of ``ids``."""
    llm.reconfigure(kv_cache_type="q4_0", **coding)
    lp = torch.log_softmax(llm.logits(ids)[len(ids) // 2:].double(), -1)
    return (ref.exp() * (ref - lp)).sum(-1).mean().item()


def test_each_coding_step_lowers_q4_0_kld(llm, ids):
    llm.reconfigure(kv_cache_type="f16", kv_rotation="auto", kv_centering="auto", kv_rounding="auto")
    assert llm.kv_cache_info()["kv_rotation"] == "off"  # f16: no coding by default
    ref = torch.log_softmax(llm.logits(ids)[len(ids) // 2:].double(), -1)
    plain = kld(llm, ids, ref, kv_rotation="off", kv_centering="off", kv_rounding="ggml")
    rotated = kld(llm, ids, ref, kv_rotation="on", kv_centering="off", kv_rounding="ggml")
    centered = kld(llm, ids, ref, kv_rotation="on", kv_centering="auto", kv_rounding="ggml")
    default = kld(llm, ids, ref, kv_rotation="auto", kv_centering="auto", kv_rounding="auto")
    info = llm.kv_cache_info()
    assert (info["kv_rotation"], info["kv_centering"], info["kv_rounding"]) == ("hadamard-64", "K", "lsq")
    assert rotated < 0.7 * plain, (plain, rotated)
    assert centered < rotated, (rotated, centered)
    assert default < centered, (centered, default)
    assert default < 0.03, default
