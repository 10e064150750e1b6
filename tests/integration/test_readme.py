"""The Python snippets of README.md and of every docs/*.md page, run as a user would run them,
against a local endpoint with a real worker; and the differences from OpenAI that docs/api.md
documents.

The snippets are written for users: they name RunPod's production URL, placeholders for the
endpoint id and API key, and the local endpoint's default address. Before a snippet runs, each of
these is replaced with this test's endpoint (:data:`PLACEHOLDERS`); nothing else is changed.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from local_endpoint.harness import MODEL_ID, LocalEndpoint

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
API = ROOT / "docs" / "api.md"
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def snippets() -> list[tuple[str, str]]:
    """(where, code) for every ```python block of the pages, in page order."""
    found = []
    for page in PAGES:
        for number, code in enumerate(SNIPPET.findall(page.read_text()), 1):
            found.append((f"{page.relative_to(ROOT)} python snippet {number}", code))
    return found


@pytest.fixture(scope="module")
def endpoint(openai_endpoint: LocalEndpoint) -> LocalEndpoint:
    """The session's endpoint: one real worker on the default model (with a LoRA adapter more)."""
    return openai_endpoint


def localized(code: str, endpoint: LocalEndpoint) -> str:
    """``code`` pointed at ``endpoint``: RunPod's URL, the placeholders and the local default."""
    placeholders = {
        "https://api.runpod.ai/v2": f"{endpoint.url}/v2",
        "http://127.0.0.1:8000": endpoint.url,
        "<endpoint_id>": "local",
        "{ENDPOINT_ID}": "local",
        "<RUNPOD_API_KEY>": endpoint.key,
        "api_key=RUNPOD_API_KEY": f"api_key={endpoint.key!r}",
        "auth_token=RUNPOD_API_KEY": f"auth_token={endpoint.key!r}",
        'api_key="local"': f"api_key={endpoint.key!r}",
        'runpod.api_key = "local"': f"runpod.api_key = {endpoint.key!r}",
        '"Qwen/Qwen3-8B"': repr(MODEL_ID),
    }
    for placeholder, value in placeholders.items():
        code = code.replace(placeholder, value)
    return code


def test_the_pages_have_python_snippets() -> None:
    where = [name for name, _ in snippets()]
    assert len(where) >= 6
    # the README's calls: the OpenAI SDK, the Anthropic SDK, /runsync
    assert sum(name.startswith("README.md") for name in where) >= 3


@pytest.mark.parametrize("index", range(len(snippets())), ids=[n for n, _ in snippets()])
def test_each_python_snippet_runs(endpoint: LocalEndpoint, index: int) -> None:
    where, code = snippets()[index]
    code = localized(code, endpoint)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, where, "exec"), {})
    assert printed.getvalue().strip(), f"{where} printed nothing:\n{code}"


def test_the_error_snippet_prints_the_error(endpoint: LocalEndpoint) -> None:
    [(where, code)] = [(w, c) for w, c in snippets() if '["error"]' in c]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(localized(code, endpoint), where, "exec"), {})
    assert printed.getvalue().split() == ["400", "BadRequestError", "temperature"]


def test_the_documented_differences_from_openai_hold(endpoint: LocalEndpoint) -> None:
    text = API.read_text()
    api = text[text.index("## The OpenAI API") : text.index("## Streaming to RunPod")]
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

    context = int((client.models.list().data[0].model_extra or {})["max_model_len"])
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
