"""LoRA adapters by name at run time (``LORA_DIR``, docs/api.md#lora-adapters), through the local
endpoint with one real worker and the unmodified OpenAI SDK: adapters copied into the folder after
the worker started answer by name and are listed; many requests for a new adapter load it once
(the worker's log line per load); 3 adapters through 2 slots, then again after their folders were
broken or removed (the engine reloads an evicted adapter from the worker's private copy); unknown
names are the SDK's NotFoundError; names that lead out of the folder are refused and the decoy
adapter there is never loaded; adapters that do not fit are 4xx saying why, and the worker keeps
serving; a listed Hub repository's adapter from the local Hub cache (offline), and one the Hub
cannot give.

The worker: bfloat16, LMCache off, MAX_LORAS=2 (adapters in one batch) and MAX_CPU_LORAS=2
(adapters kept loaded). The tests run in order: later ones use adapters the earlier ones loaded.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from safetensors.numpy import save_file

from local_endpoint.harness import MODEL_ID, LocalEndpoint, local_endpoint
from tests.integration.conftest import make_offline
from tests.integration.samples import QUESTION

pytestmark = pytest.mark.integration

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_REPO = "test-org/adapters"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}
ANSWERS: dict[str, str] = {}  # each model's greedy answer, alone in the engine


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, worker_env: dict[str, str]) -> Path:
    """Three adapters made by peft for the default model (seeds 1, 2, 3: each answers its own
    way), in a folder the worker does not see."""
    out = tmp_path_factory.mktemp("made")
    outs = [str(out / name) for name in ("a", "b", "c")]
    make_offline("tests.lora_adapter", worker_env["MODEL_NAME"], *outs, "--seed", "1")
    return out


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, made: Path) -> Path:
    """A Hugging Face cache holding a snapshot of HUB_REPO with adapter c in its subfolder sql,
    as huggingface_hub lays it out (refs/main, snapshots/<commit>/)."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / ("models--" + HUB_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(made / "c", repo / "snapshots" / ("0" * 40) / "sql")
    return cache


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="module")
def endpoint(
    tmp_path_factory: pytest.TempPathFactory,
    worker_env: dict[str, str],
    folder: Path,
    hub_cache: Path,
) -> Iterator[LocalEndpoint]:
    env = {
        **worker_env,
        "LORA_DIR": str(folder),
        "MAX_LORAS": "2",
        "MAX_CPU_LORAS": "2",
        "LMCACHE_ENABLED": "false",
        "HUGGING_FACE_ID": HUB_ID,  # an adapter naming the Hub id fits the served folder
        "VLLM_LORA_RESOLVER_HF_REPO_LIST": f"{HUB_REPO},test-org/not-cached",
        "HF_HUB_CACHE": str(hub_cache),
    }
    with local_endpoint(tmp_path_factory.mktemp("endpoint"), env) as started:
        yield started


def answer(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=QUESTION, **GREEDY)
    assert reply.model == model
    return reply.choices[0].message.content or ""


def said(error: openai.APIStatusError) -> str:
    """The error object's message, as the worker wrote it."""
    assert isinstance(error.body, dict), error.body
    return str(error.body["message"])


def loads(endpoint: LocalEndpoint, name: str) -> int:
    """The worker's log lines for a load of adapter ``name``: one per load."""
    return endpoint.log_count(f"LoRA adapter {name!r} loaded in")


def listed(client: openai.OpenAI) -> list[str]:
    return [m.id for m in client.models.list().data]


def add(made: Path, folder: Path, source: str, name: str) -> Path:
    shutil.copytree(made / source, folder / name)
    return folder / name


def test_adapters_copied_after_start_are_listed_and_answer_by_name(
    endpoint: LocalEndpoint, client: openai.OpenAI, made: Path, folder: Path
) -> None:
    ANSWERS[MODEL_ID] = answer(client, MODEL_ID)  # before any adapter is loaded
    assert listed(client) == [MODEL_ID]
    add(made, folder, "a", "sql-a")
    add(made, folder, "b", "chat-b")
    cards = client.models.list().data
    assert [m.id for m in cards] == [MODEL_ID, "chat-b", "sql-a"]  # listed before their first use
    for card in cards[1:]:
        extra = card.model_extra or {}
        assert (extra["parent"], extra["root"]) == (MODEL_ID, card.id)  # no path of the worker's
    for name in ("sql-a", "chat-b"):
        ANSWERS[name] = answer(client, name)
        assert loads(endpoint, name) == 1
    assert len({ANSWERS[MODEL_ID], ANSWERS["sql-a"], ANSWERS["chat-b"]}) == 3, ANSWERS
    streamed = list(
        client.chat.completions.create(model="chat-b", messages=QUESTION, stream=True, **GREEDY)
    )
    assert {c.model for c in streamed} == {"chat-b"}
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert loads(endpoint, "chat-b") == 1  # reused, not loaded again
    cards = client.models.list().data  # vLLM lists the loaded ones, from the worker's copies
    assert sorted(m.id for m in cards) == sorted([MODEL_ID, "chat-b", "sql-a"])  # each once
    assert all((m.model_extra or {})["root"] == m.id for m in cards if m.id != MODEL_ID)


async def test_eight_requests_for_a_new_adapter_all_answer_and_load_it_once(
    endpoint: LocalEndpoint, made: Path, folder: Path
) -> None:
    add(made, folder, "c", "third-c")
    client = endpoint.async_openai()
    replies = await asyncio.gather(
        *(
            client.chat.completions.create(model="third-c", messages=QUESTION, **GREEDY)
            for _ in range(8)
        )
    )
    assert [r.model for r in replies] == ["third-c"] * 8
    assert all(r.choices[0].message.content for r in replies)
    assert loads(endpoint, "third-c") == 1
    assert endpoint.log_count("LoRA adapter 'third-c': checked, copied") == 1


async def test_three_adapters_through_two_slots_and_reloaded_from_the_workers_copy(
    endpoint: LocalEndpoint, client: openai.OpenAI, folder: Path
) -> None:
    names = ["sql-a", "chat-b", "third-c"]
    aclient = endpoint.async_openai()
    replies = await asyncio.gather(
        *(aclient.chat.completions.create(model=n, messages=QUESTION, **GREEDY) for n in names)
    )
    assert [r.model for r in replies] == names
    assert all(r.choices[0].message.content for r in replies)
    # The folder changes under the worker: one adapter's weights become garbage, one is gone.
    # MAX_CPU_LORAS=2 keeps two of the three loaded: the others are reloaded on their next use,
    # from the worker's own copy, so the answers are those of the adapters as first loaded.
    (folder / "sql-a" / "adapter_model.safetensors").write_bytes(b"\xff" * 1024)
    shutil.rmtree(folder / "chat-b")
    ANSWERS["third-c"] = answer(client, "third-c")
    for _ in range(2):
        assert [answer(client, n) for n in names] == [ANSWERS[n] for n in names]
    assert [loads(endpoint, n) for n in names] == [1, 1, 1]  # the worker loaded each once
    assert endpoint.workers()[0]["starts"] == 1


def test_an_unknown_name_is_the_sdks_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        answer(client, "no-such-adapter")
    assert said(missing.value) == (
        f"The model `no-such-adapter` does not exist. Valid aliases: {MODEL_ID}."
    )


@pytest.fixture(scope="module")
def decoy(made: Path, folder: Path) -> Path:
    """A working adapter beside LORA_DIR, and a link in the folder that leads to it: loading it
    would answer."""
    outside = folder.parent / "decoy"
    shutil.copytree(made / "a", outside)
    (folder / "escape").symlink_to(outside)
    return outside


@pytest.mark.parametrize("name", ["../decoy", "..", "a/b", "/decoy", "escape", "x\x00y"])
def test_names_that_lead_out_of_the_folder_are_refused_and_nothing_there_is_loaded(
    endpoint: LocalEndpoint, client: openai.OpenAI, decoy: Path, name: str
) -> None:
    name = str(decoy) if name == "/decoy" else name
    with pytest.raises((openai.NotFoundError, openai.BadRequestError)) as refused:
        answer(client, name)
    error = refused.value
    assert isinstance(error, openai.APIStatusError) and error.status_code in (400, 404)
    if name == "escape":
        assert (
            said(error) == "LoRA adapter `escape` is a link that leads out of its folder: refused."
        )
    assert str(decoy.parent) not in error.message
    assert loads(endpoint, name) == 0
    assert name not in listed(client)


def with_config(made: Path, folder: Path, name: str, **changes: Any) -> Path:
    adapter = add(made, folder, "a", name)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def wrong_shapes(adapter: Path) -> None:
    """Whole safetensors with the adapter's tensor names, but shapes no layer of the model has."""
    weights = adapter / "adapter_model.safetensors"
    raw = weights.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    names = [key for key in header if key != "__metadata__"]
    save_file({n: np.ones((8, 100), np.float32) for n in names}, str(weights))


def test_adapters_that_do_not_fit_are_4xx_saying_why_and_the_worker_keeps_serving(
    endpoint: LocalEndpoint, client: openai.OpenAI, made: Path, folder: Path
) -> None:
    with_config(made, folder, "wrong-base", base_model_name_or_path="meta-llama/Llama-3.1-8B")
    (with_config(made, folder, "bad-json") / "adapter_config.json").write_text('{"r": 8,')
    config = with_config(made, folder, "no-peft-type") / "adapter_config.json"
    config.write_text(
        json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "peft_type"})
    )
    (add(made, folder, "a", "bad-weights") / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    with_config(made, folder, "rank-64", r=64)
    wrong_shapes(add(made, folder, "a", "wrong-shapes"))
    with_config(made, folder, "hub-id-base", base_model_name_or_path=HUB_ID)  # fits
    expected = {
        "wrong-base": "LoRA adapter `wrong-base` was trained on 'meta-llama/Llama-3.1-8B', not on "
        f"the served model '{MODEL_ID}' (its served name, Hub id or path).",
        "bad-json": "LoRA adapter `bad-json`: adapter_config.json is not valid JSON (line 1 "
        "column 9).",
        "no-peft-type": "LoRA adapter `no-peft-type`: adapter_config.json has no peft_type "
        '(PEFT writes "LORA").',
        "bad-weights": "LoRA adapter `bad-weights`: adapter_model.safetensors is not a whole "
        "safetensors file (its header is not JSON).",
        "rank-64": "LoRA adapter `rank-64` cannot be served: LoRA rank 64 is greater than "
        "max_lora_rank 16 (MAX_LORA_RANK raises the limit).",
        "wrong-shapes": "LoRA adapter `wrong-shapes` could not be loaded: vLLM refused its "
        "weights for the served model (the worker's log has vLLM's reason).",
    }
    for name, message in expected.items():
        with pytest.raises(openai.BadRequestError) as refused:
            answer(client, name)
        assert said(refused.value) == message, name
        body = refused.value.body
        assert isinstance(body, dict) and body.get("param") == "model", body
    assert answer(client, "hub-id-base") == ANSWERS["sql-a"]  # the same weights as sql-a
    assert answer(client, MODEL_ID) == ANSWERS[MODEL_ID]
    assert answer(client, "third-c") == ANSWERS["third-c"]
    assert endpoint.workers()[0]["starts"] == 1
    assert [m for m in listed(client) if m in expected] == []


def test_a_listed_hub_repositorys_adapter_loads_from_the_hub_cache_offline(
    endpoint: LocalEndpoint, client: openai.OpenAI
) -> None:
    name = f"{HUB_REPO}/sql"  # adapter c, the same weights as third-c
    assert answer(client, name) == ANSWERS["third-c"]
    assert loads(endpoint, name) == 1
    with pytest.raises(openai.NotFoundError):
        answer(client, f"{HUB_REPO}/nothing-here")
    with pytest.raises(openai.InternalServerError) as unavailable:
        answer(client, "test-org/not-cached/sql")
    assert unavailable.value.status_code == 502  # not 503: the worker is not going away
    assert said(unavailable.value) == (
        "LoRA adapter `test-org/not-cached/sql`: the Hugging Face Hub did not give "
        "test-org/not-cached (LocalEntryNotFoundError); try again later."
    )
    assert answer(client, MODEL_ID) == ANSWERS[MODEL_ID]  # it keeps serving


@pytest.mark.parametrize("route", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters"])
def test_vllms_lora_loading_routes_stay_refused(endpoint: LocalEndpoint, route: str) -> None:
    code, body = endpoint.call("POST", f"/openai{route}", {"lora_name": "x", "lora_path": "/tmp"})
    assert code == 404, body
    assert "is not available to jobs" in body["error"]["message"]
