"""kvslim on the real Gemma 3 270M Q4_K_M GGUF against transformers loading the same file.

All slow. transformers takes minutes to dequantize and run this model on a small CPU,
so its outputs (1,024-token logits, greedy continuations) are computed once and kept
under /tmp, keyed by the GGUF's size and mtime and the token ids; a later session reuses
them. The GGUF has no chat template: both sides use Gemma's (``tokenizer._GEMMA_TEMPLATE``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "gemma3_tokenizer.json"
GREEDY = dict(temperature=0, repeat_penalty=1.0)
PROMPTS = ["Why is the sky blue?", "Write a haiku about the sea.",
           "List three prime numbers and explain why they are prime."]


@pytest.fixture(scope="module")
def gemma_path(gemma3_gguf):
    return gemma3_gguf


@pytest.fixture(scope="module")
def llm(gemma_path):
    from kvslim import LLM

    return LLM(str(gemma_path), kv_cache_type="f16", num_ctx=2048, num_parallel=2,
               progress=False)


@pytest.fixture(scope="module")
def english_ids(llm, jargon_text):
    ids = llm.tokenize(jargon_text[20000:40000])[:1024]  # running prose, past the window
    assert len(ids) == 1024
    return ids


def _reference(path: Path, ids: list[int], prompts: list[list[int]]) -> dict:
    """transformers' logits over ``ids`` and greedy 32 tokens per prompt, cached in /tmp."""
    st = path.stat()
    key = hashlib.sha256(json.dumps([str(path), st.st_size, st.st_mtime_ns, ids, prompts])
                         .encode()).hexdigest()[:16]
    cached = Path(f"/tmp/kvslim-gemma3-ref-{key}.pt")
    if cached.exists():
        return torch.load(cached)
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # 32 tokens every time, like ignore_eos
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
        greedy = [model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False,
                                 pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    ref = {"logits": logits, "greedy": greedy}
    torch.save(ref, cached)
    return ref


@pytest.fixture(scope="module")
def reference(gemma_path, llm, english_ids):
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    return prompts, _reference(gemma_path, english_ids, prompts)


def kl_and_top1(p_logits: torch.Tensor, q_logits: torch.Tensor) -> tuple[float, float]:
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return kl, (lp.argmax(-1) == lq.argmax(-1)).double().mean().item()


def test_logits_match_transformers_beyond_the_window(llm, reference, english_ids):
    ours = llm.logits(english_ids)
    ref = reference[1]["logits"]
    assert ours.shape == ref.shape == (1024, llm.config.vocab_size)
    kl, top1 = kl_and_top1(ref, ours)
    assert kl <= 1e-4, f"mean KL {kl:.2e}"
    assert top1 >= 0.99, f"top-1 agreement {top1:.4f}"
    kl_late, _ = kl_and_top1(ref[600:], ours[600:])  # every local layer windowed here
    assert kl_late <= 1e-4, f"mean KL past the window {kl_late:.2e}"


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_greedy_chat_matches_transformers(llm, reference, i):
    prompts, ref = reference
    got = llm.generate(prompts[i], max_tokens=32, ignore_eos=True, **GREEDY)
    assert got.token_ids == ref["greedy"][i], (llm.detokenize(got.token_ids),
                                               llm.detokenize(ref["greedy"][i]))


@pytest.mark.parametrize("kv", ["q8_0", "q4_0"])
def test_quantized_caches_with_coding_stay_close(llm, english_ids, kv):
    """Block-quantized caches (rotation at head_dim 256, 1 KV head, centering) on the
    same 1,024 tokens, against the f16 cache."""
    base = llm.logits(english_ids)
    llm.reconfigure(kv_cache_type=kv)
    try:
        info = llm.kv_cache_info()
        got = llm.logits(english_ids)
    finally:
        llm.reconfigure(kv_cache_type="f16")
    assert info["kv_rotation"].startswith("hadamard"), info
    kl, top1 = kl_and_top1(base, got)
    assert kl < {"q8_0": 0.01, "q4_0": 0.1}[kv], f"{kv}: KL {kl:.4f}"
    assert top1 > {"q8_0": 0.95, "q4_0": 0.8}[kv], f"{kv}: top-1 {top1:.3f}"


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_path):
    from kvslim.gguf_loader import open_gguf
    from kvslim.tokenizer import Tokenizer

    return Tokenizer.from_gguf(open_gguf(gemma_path))


CASES = json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_tokenizer_matches_fixture(gemma_tokenizer, case):
    """Ids from transformers' tokenizer of the same GGUF: whitespace runs (user-defined
    tokens), digits, unicode, byte fallback, special-token text, Jargon File prose."""
    got = gemma_tokenizer.encode(case["text"], parse_special=case["special"])
    assert got == case["ids"]
    if case["special"]:
        assert gemma_tokenizer.decode(got, skip_special=False) == case["text"]


def test_server_chat_matches_transformers(gemma_path, llm, reference):
    """The Ollama route on the real file gives transformers' greedy answer."""
    import ollama

    from kvslim.settings import ServerSettings
    from test_server import running_server

    expected = reference[1]["greedy"][0][:8]
    stops = [i for i, t in enumerate(expected) if t in llm.tokenizer.eog_ids]
    expected = expected[:stops[0]] if stops else expected
    settings = ServerSettings.from_env({}, num_parallel=1, num_ctx=512, kv_cache_type="f16")
    with running_server(settings, {"gemma3": gemma_path}) as s:
        reply = ollama.Client(host=s.url, timeout=600).chat(
            model="gemma3", messages=[{"role": "user", "content": PROMPTS[0]}],
            options={"num_predict": 8, **GREEDY})
    assert reply.message.content == llm.detokenize(expected)
