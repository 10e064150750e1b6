"""The README's Python snippets, run as a user would run them, against a local endpoint with a real
worker; and the differences from OpenAI that the README's API section documents.

The snippets are written for users: they name RunPod's production URL, placeholders for the
endpoint id and API key, and the local endpoint's default address. Before a snippet runs, each of
these is replaced with this test's endpoint (:data:`PLACEHOLDERS`); nothing else is changed.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import MODEL_ID
from tests.local_endpoint import LocalEndpoint, local_endpoint

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def snippets() -> list[str]:
    return SNIPPET.findall(README.read_text())


@pytest.fixture(scope="module")
def endpoint(
    tmp_path_factory: pytest.TempPathFactory, worker_env: dict[str, str]
) -> Iterator[LocalEndpoint]:
    with local_endpoint(tmp_path_factory.mktemp("readme"), worker_env) as started:
        yield started


def localized(code: str, endpoint: LocalEndpoint) -> str:
    """``code`` pointed at ``endpoint``: RunPod's URL, the placeholders and the local default."""
    placeholders = {
        "https://api.runpod.ai/v2": f"{endpoint.url}/v2",
        "http://127.0.0.1:8000": endpoint.url,
        "<endpoint_id>": "local",
        "{ENDPOINT_ID}": "local",
        "<RUNPOD_API_KEY>": endpoint.key,
        "api_key=RUNPOD_API_KEY": f"api_key={endpoint.key!r}",
        'api_key="local"': f"api_key={endpoint.key!r}",
        'runpod.api_key = "local"': f"runpod.api_key = {endpoint.key!r}",
        '"Qwen/Qwen3-8B"': repr(MODEL_ID),
    }
    for placeholder, value in placeholders.items():
        code = code.replace(placeholder, value)
    return code


def test_the_readme_has_python_snippets() -> None:
    assert len(snippets()) >= 4


@pytest.mark.parametrize("index", range(len(snippets())))
def test_each_python_snippet_runs(endpoint: LocalEndpoint, index: int) -> None:
    code = localized(snippets()[index], endpoint)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"README.md python snippet {index + 1}", "exec"), {})
    assert printed.getvalue().strip(), f"snippet {index + 1} printed nothing:\n{code}"


def test_the_error_snippet_prints_the_error(endpoint: LocalEndpoint) -> None:
    [code] = [c for c in snippets() if '["error"]' in c]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(localized(code, endpoint), "README.md error snippet", "exec"), {})
    assert printed.getvalue().split() == ["400", "BadRequestError", "temperature"]


def test_the_documented_differences_from_openai_hold(endpoint: LocalEndpoint) -> None:
    text = README.read_text()
    api = text[text.index("## The OpenAI API") : text.index("## KV cache")]
    assert "n must be 1 when using greedy sampling" in api
    assert "over the context is not refused" in api
    client = endpoint.openai()

    question = [{"role": "user", "content": "Name three colors."}]
    status, body = endpoint.call(
        "POST",
        "/openai/v1/chat/completions",
        {"model": MODEL_ID, "messages": question, "n": 2, "temperature": 0},
    )
    assert status == 400 and "n must be 1 when using greedy sampling" in body["error"]["message"]

    context = int(client.models.list().data[0].model_extra["max_model_len"])
    long = [{"role": "user", "content": "hi " * (context - 100)}]
    prompt = client.chat.completions.create(model=MODEL_ID, messages=long, max_tokens=1)  # type: ignore[arg-type]
    assert prompt.usage is not None and prompt.usage.prompt_tokens < context
    answer = client.chat.completions.create(
        model=MODEL_ID,
        messages=long,  # type: ignore[arg-type]
        max_tokens=context,  # more than the prompt leaves
        extra_body={"ignore_eos": True},
        timeout=300,
    )
    assert answer.usage is not None
    assert answer.usage.completion_tokens == context - prompt.usage.prompt_tokens
    assert answer.choices[0].finish_reason == "length"
