"""vLLM's whole public API through its own app, in-process: the Anthropic SDK, routes the worker
once answered itself or not at all (``models.retrieve``, score, rerank, classify, pooling), client
mistakes answered as vLLM's server answers them, and the routes no job may reach.

Clients are the unmodified SDKs (``openai``, ``anthropic``) and runpod's own, against the local
endpoint with real workers.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from handler.protocol import PUBLIC_ROUTES, REFUSED_ROUTES
from local_endpoint.harness import KEY, MODEL_ID, ROOT, LocalEndpoint, local_endpoint
from tests.integration.samples import QUESTION as SENTENCE_QUESTION
from tests.integration.test_embeddings import model_dir as minilm_dir
from tests.openrouter_schema import valid_for_openrouter

pytestmark = pytest.mark.integration

QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]
CLAUDE_QUESTION: list[MessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]
SCORER = "tiny-scorer"
# Anthropic's SDK has no temperature parameter (any more); vLLM's Messages API takes one
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def endpoint(openai_endpoint: LocalEndpoint) -> LocalEndpoint:
    return openai_endpoint


@pytest.fixture(scope="module")
def claude(endpoint: LocalEndpoint) -> anthropic.Anthropic:
    """Anthropic's SDK, its base URL at the endpoint's OpenAI prefix (it adds /v1/messages)."""
    return anthropic.Anthropic(base_url=f"{endpoint.base}/openai", api_key=KEY, max_retries=0)


class LogWatch:
    """What the endpoint (and its workers) logged from now on."""

    def __init__(self, endpoint: LocalEndpoint) -> None:
        self._log = endpoint.log
        self._start = self._log.stat().st_size

    def text(self) -> str:
        with self._log.open("rb") as log:
            log.seek(self._start)
            return log.read().decode(errors="replace")


# --- Anthropic Messages -----------------------------------------------------------------------


def test_anthropic_messages_one_shot_with_a_system_prompt(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=MODEL_ID,
        system="You answer in one short sentence.",
        messages=CLAUDE_QUESTION,
        max_tokens=24,
        extra_body=GREEDY,
    )
    assert (message.type, message.role, message.model) == ("message", "assistant", MODEL_ID)
    [block] = message.content
    assert block.type == "text" and "Paris" in block.text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 10 and 0 < message.usage.output_tokens <= 24


def test_anthropic_stream_gives_the_one_shot_text_and_final_message(
    claude: anthropic.Anthropic,
) -> None:
    args: dict[str, Any] = {
        "model": MODEL_ID,
        "messages": QUESTION,
        "max_tokens": 24,
        "extra_body": GREEDY,
    }
    one_shot = claude.messages.create(**args)
    with claude.messages.stream(**args) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    [block] = one_shot.content
    assert block.type == "text"
    assert text == block.text
    assert [b.model_dump() for b in final.content] == [
        {"type": "text", "text": text, "citations": None}
    ]
    assert final.stop_reason == one_shot.stop_reason
    assert final.usage.output_tokens == one_shot.usage.output_tokens


def test_anthropic_stop_sequences(claude: anthropic.Anthropic) -> None:
    """On the question whose greedy answer every suite checks ("The capital of France is
    Paris."): the shorter question's answer did not reach "Paris" within 24 tokens when this
    test ran alone, and did after other tests had run (bf16 rounding follows what ran before)."""
    message = claude.messages.create(
        model=MODEL_ID,
        messages=SENTENCE_QUESTION,
        max_tokens=24,
        extra_body=GREEDY,
        stop_sequences=["Paris"],
    )
    [block] = message.content
    assert block.type == "text" and block.text.strip() == "The capital of France is"
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "Paris")


def test_anthropic_count_tokens_matches_the_prompt_tokens(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model=MODEL_ID, messages=CLAUDE_QUESTION)
    message = claude.messages.create(
        model=MODEL_ID,
        messages=CLAUDE_QUESTION,
        max_tokens=1,
    )
    assert counted.input_tokens == message.usage.input_tokens > 0


def test_anthropic_errors_raise_the_sdks_exceptions(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", messages=CLAUDE_QUESTION, max_tokens=4)
    assert missing.value.status_code == 404
    assert missing.value.body == {
        "type": "error",
        "error": {
            "type": "NotFoundError",
            "message": f"The model `no-such-model` does not exist. Valid aliases: {MODEL_ID}.",
            "code": 404,
        },
    }
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=MODEL_ID, messages=[], max_tokens=4)


# --- OpenAI routes the worker now answers as vLLM does ----------------------------------------


def test_openai_models_retrieve(client: openai.OpenAI) -> None:
    listed = {
        m.id: m.model_dump(exclude={"created", "permission"}) for m in client.models.list().data
    }
    model = client.models.retrieve(MODEL_ID)
    assert model.model_dump(exclude={"created", "permission"}) == listed[MODEL_ID]
    assert model.model_extra
    [text] = model.model_extra["input_modalities"]
    assert text["supported_inputs"]["max_context_length"] == {"value": 2048, "unit": "token"}
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.body == {
        "message": "The model `no-such-model` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


def test_client_mistakes_are_400s_not_500s(endpoint: LocalEndpoint, client: openai.OpenAI) -> None:
    watch = LogWatch(endpoint)
    with pytest.raises(openai.BadRequestError) as empty:
        client.completions.create(model=MODEL_ID, prompt="", max_tokens=4)
    assert empty.value.body == {
        "message": "Either prompt or prompt_embeds must be provided and non-empty. "
        "(parameter=prompt)",
        "type": "BadRequestError",
        "param": "prompt",
        "code": 400,
    }
    tools: list[ChatCompletionToolParam] = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    ]
    with pytest.raises(openai.BadRequestError) as unknown_tool:
        client.chat.completions.create(
            model=MODEL_ID,
            messages=QUESTION,
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    assert unknown_tool.value.body == {
        "message": "The tool specified in `tool_choice` does not match any of the specified "
        "`tools` (parameter=tool_choice)",
        "type": "BadRequestError",
        "param": "tool_choice",
        "code": 400,
    }
    native = endpoint.runpod().run({"prompt": "", "sampling_params": {"max_tokens": 4}})
    assert native.output(timeout=60) is None and native.status() == "FAILED"
    error = json.loads(status_of(endpoint, native.job_id)["error"])["error"]
    assert (error["code"], error["param"]) == (400, "prompt")
    logged = watch.text()
    assert " ERROR " not in logged and "Traceback" not in logged, logged[-3000:]


def status_of(endpoint: LocalEndpoint, job_id: str) -> dict[str, Any]:
    code, body = endpoint.call("GET", f"/status/{job_id}")
    assert code == 200, body
    return dict(body)


def test_render_and_tokenize_routes(endpoint: LocalEndpoint) -> None:
    code, rendered = endpoint.call(
        "POST", "/openai/v1/chat/completions/render", {"model": MODEL_ID, "messages": QUESTION}
    )
    assert code == 200, rendered
    code, tokens = endpoint.call(
        "POST", "/openai/tokenize", {"model": MODEL_ID, "messages": QUESTION}
    )
    assert code == 200, tokens
    assert tokens["count"] == len(tokens["tokens"]) > 5
    assert json.dumps(rendered).count(str(tokens["tokens"][-1])) >= 1


# --- administrative routes --------------------------------------------------------------------

ADMIN = ["/sleep", "/wake_up", "/collective_rpc", "/reset_prefix_cache", "/v1/load_lora_adapter"]


@pytest.mark.parametrize("route", ADMIN)
def test_administrative_routes_are_refused_through_both_shapes(
    endpoint: LocalEndpoint, route: str
) -> None:
    code, body = endpoint.call("POST", f"/openai{route}", {"lora_name": "x", "lora_path": "/tmp"})
    assert code == 404, body
    assert body["error"]["type"] == "NotFoundError"
    assert "is not available to jobs" in body["error"]["message"]
    job = endpoint.runpod().run({"route": route, "body": {}})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "FAILED")
    job.output(timeout=60)
    error = json.loads(status_of(endpoint, job.job_id)["error"])["error"]
    assert (error["code"], error["type"]) == (404, "NotFoundError")


def app_routes(env: dict[str, str], model: str, *flags: str) -> set[tuple[str, str]]:
    """The (method, path) of every route vLLM's app registers for a model, built without an
    engine, in a process of its own (dev mode is read from the environment)."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.vllm_routes", "--model", model, *flags],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {(m, p) for m, p in json.loads(result.stdout.strip().splitlines()[-1])}


def test_every_route_of_vllms_app_is_public_or_refused_on_purpose(
    worker_env: dict[str, str], scorer: Path
) -> None:
    """Fails when a vLLM upgrade adds a route that is in neither table: decide, then add it."""
    # with dev mode's routes, and the LoRA loading routes runtime LoRA updating would add
    dev = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
    apps: list[tuple[dict[str, str], str, tuple[str, ...]]] = [
        (worker_env, worker_env["MODEL_NAME"], ()),
        ({**worker_env, **dev}, worker_env["MODEL_NAME"], ("--enable-fault-tolerance",)),
        ({**worker_env, **dev}, str(scorer), ()),
        (worker_env, str(minilm_dir()), ()),
    ]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # a process each, one per core
        found = pool.map(lambda app: app_routes(app[0], app[1], *app[2]), apps)
        routes = {route for one in found for route in one}
    paths = {path for _method, path in routes}
    unclassified = paths - set(PUBLIC_ROUTES) - set(REFUSED_ROUTES) - {"/metrics"}
    assert not unclassified, f"routes neither public nor refused: {sorted(unclassified)}"
    # each public route is served with the method the job contract gives it
    for method, path in routes:
        if path in PUBLIC_ROUTES:
            assert method in (PUBLIC_ROUTES[path], "HEAD"), (method, path)
    # and the admin routes this test knows of are among them
    assert {"/sleep", "/collective_rpc", "/reset_prefix_cache", "/adapters"} <= paths


# --- pooling: score, rerank, classify on a small cross-encoder --------------------------------


def make_cross_encoder(out: Path, labels: int) -> Path:
    subprocess.run(
        [sys.executable, "-m", "tests.cross_encoder", str(minilm_dir()), str(out), str(labels)],
        check=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cross_encoder(tmp_path_factory.mktemp("scorer") / SCORER, labels=1)


@pytest.fixture(scope="module")
def scoring(
    tmp_path_factory: pytest.TempPathFactory, worker_env: dict[str, str], scorer: Path
) -> Iterator[LocalEndpoint]:
    env = {
        **worker_env,
        "MODEL_NAME": str(scorer),
        "CHAT_TEMPLATE": "",
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": SCORER,
        "MAX_MODEL_LEN": "256",
    }
    with local_endpoint(tmp_path_factory.mktemp("scoring"), env) as started:
        yield started


DOCUMENTS = ["Paris is the capital of France.", "Bananas are yellow.", "The Seine flows."]


def native(endpoint: LocalEndpoint, route: str, body: dict[str, Any]) -> Any:
    """The answer of a native generic job (the output is the list of the handler's yields)."""
    [answer] = endpoint.runpod().run_sync({"route": route, "body": body}, timeout=120)
    return answer


def test_rerank_through_both_shapes(scoring: LocalEndpoint) -> None:
    body = {"model": SCORER, "query": "capital of France", "documents": DOCUMENTS}
    for route in ("/v1/rerank", "/rerank", "/v2/rerank"):
        code, answer = scoring.call("POST", f"/openai{route}", body)
        assert code == 200, answer
        results = answer["results"]
        assert sorted(r["index"] for r in results) == [0, 1, 2]
        scores = [r["relevance_score"] for r in results]
        assert scores == sorted(scores, reverse=True)
        assert native(scoring, route, body)["results"] == results


def test_a_cross_encoder_is_listed_as_a_reranker(scoring: LocalEndpoint) -> None:
    code, listing = scoring.call("GET", "/openai/v1/models")
    assert code == 200, listing
    [card] = valid_for_openrouter(listing)["data"]
    assert (card["id"], card["output_modalities"]) == (
        SCORER,
        [{"type": "rerank", "supported_parameters": {}}],
    )


def test_score_through_both_shapes(scoring: LocalEndpoint) -> None:
    body = {"model": SCORER, "queries": "capital of France", "documents": DOCUMENTS}
    for route in ("/score", "/v1/score"):
        code, answer = scoring.call("POST", f"/openai{route}", body)
        assert code == 200, answer
        assert [d["index"] for d in answer["data"]] == [0, 1, 2]
        assert all(isinstance(d["score"], float) for d in answer["data"])
        assert native(scoring, route, body)["data"] == answer["data"]


def test_classify_through_both_shapes(scoring: LocalEndpoint) -> None:
    body = {"model": SCORER, "input": DOCUMENTS[:2]}
    code, answer = scoring.call("POST", "/openai/classify", body)
    assert code == 200, answer
    assert [d["index"] for d in answer["data"]] == [0, 1]
    assert all(len(d["probs"]) == 1 for d in answer["data"])
    assert native(scoring, "/classify", body)["data"] == answer["data"]


def test_a_generating_models_route_is_the_apps_404_on_a_pooling_model(
    scoring: LocalEndpoint,
) -> None:
    code, answer = scoring.call(
        "POST", "/openai/v1/chat/completions", {"model": SCORER, "messages": QUESTION}
    )
    assert code == 404, answer
    assert answer["error"]["code"] == 404
