"""Embeddings over loopback with the official clients (issue 16, section 2), on the tiny
random GGUF: /api/embed, the legacy /api/embeddings and OpenAI's /v1/embeddings."""
from __future__ import annotations

import base64
import struct

import httpx
import numpy as np
import ollama
import openai
import pytest

from kvslim.settings import ServerSettings

from test_server import running_server, wait_until

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "hi"]


@pytest.fixture(scope="module")
def server(tiny_path):
    with running_server(ServerSettings.from_env({}, num_parallel=2), {"tiny": tiny_path}) as served:
        yield served


def _no_pages_held(server) -> bool:
    pools = [e for e in server.runner("tiny").engines()]
    return all(e.cache.pages_in_use - len(e.prefix_cache.pages(e.cache)) == 0 for e in pools)


def test_ollama_embed_is_normalised_deterministic_and_batch_equals_one_by_one(server, client):
    batch = client.embed(model="tiny", input=TEXTS)
    vectors = np.array(batch.embeddings)
    assert vectors.shape[0] == 3 and batch.prompt_eval_count > 10
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    for text, v in zip(TEXTS, vectors):
        one = client.embed(model="tiny", input=text).embeddings
        assert len(one) == 1 and np.allclose(one[0], v, atol=1e-5)
    assert client.embed(model="tiny", input=TEXTS).embeddings == batch.embeddings  # same text, same vector
    assert not np.allclose(vectors[0], vectors[1])
    wait_until(lambda: _no_pages_held(server), what="no pages held")
    server.runner("tiny").engine.cache.check()


def test_ollama_embed_dimensions_truncate_and_empty_input(server, client):
    full = np.array(client.embed(model="tiny", input="hello there").embeddings[0])
    cut = np.array(client.embed(model="tiny", input="hello there", dimensions=8).embeddings[0])
    assert cut.shape == (8,) and np.allclose(cut, full[:8] / np.linalg.norm(full[:8]), atol=1e-5)
    long = " ".join(["word"] * 100)
    short = client.embed(model="tiny", input=long, options={"num_ctx": 16})
    assert short.prompt_eval_count == 16
    with pytest.raises(ollama.ResponseError, match="truncate is false") as e:
        client.embed(model="tiny", input=long, truncate=False, options={"num_ctx": 16})
    assert e.value.status_code == 400
    assert client.embed(model="tiny", input="").embeddings == []  # as Ollama answers
    r = httpx.post(server.url + "/api/embed", json={"model": "tiny", "input": "x", "dimensions": 10**6})
    assert r.status_code == 400 and "dimensions must be between 1 and" in r.json()["error"]
    r = httpx.post(server.url + "/api/embed", json={"model": "nope", "input": "x"})
    assert r.status_code == 404


def test_legacy_embeddings_are_the_same_direction_unnormalised(client):
    legacy = np.array(client.embeddings(model="tiny", prompt=TEXTS[0]).embedding)
    unit = np.array(client.embed(model="tiny", input=TEXTS[0]).embeddings[0])
    norm = np.linalg.norm(legacy)
    assert abs(norm - 1) > 1e-3 and np.allclose(legacy / norm, unit, atol=1e-5)
    assert client.embeddings(model="tiny", prompt="").embedding == []


def test_openai_embeddings_float_base64_token_ids(server, client, oai):
    ref = client.embed(model="tiny", input=TEXTS[:2]).embeddings
    r = oai.embeddings.create(model="tiny", input=TEXTS[:2], user="someone")
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 5
    assert np.allclose([d.embedding for d in r.data], ref, atol=1e-6)
    raw = oai.embeddings.with_raw_response.create(model="tiny", input=TEXTS[0],
                                                  encoding_format="base64").http_response.json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert np.allclose(struct.unpack(f"<{len(packed) // 4}f", packed), ref[0], atol=1e-6)
    # the openai client asks for base64 and decodes it itself when no format is given
    assert np.allclose(oai.embeddings.create(model="tiny", input=TEXTS[0]).data[0].embedding, ref[0],
                       atol=1e-6)
    ids = server.runner("tiny").text_ids(TEXTS[0])
    by_ids = oai.embeddings.create(model="tiny", input=[ids]).data[0].embedding
    assert len(ids) > 3 and np.allclose(by_ids, ref[0], atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="input must not be empty"):
        oai.embeddings.create(model="tiny", input=[])
    assert len(oai.embeddings.create(model="tiny", input="x", dimensions=4).data[0].embedding) == 4
