"""Images in, on a tiny vision-language model the tests make (tests/tiny_vlm.py: SmolLM2 with a
random Idefics3 vision tower): the unmodified OpenAI SDK (chat, streamed and not), the Anthropic
SDK (base64 ``image`` blocks) and native jobs, with an image as a ``data:`` URL and as an http URL
a loopback server serves.

The image reaches the model: it adds exactly the prompt tokens the model's own processor says
one image takes, and two images give different log-probabilities for the same text (a prompt of
several KV-cache blocks, the image in the first: the same image again is served from the cache,
the other image is not, though both have the same token ids). A
corrupt image, a type that is not an image, and a URL that does not answer are each a 4xx in the
route's error shape, and the worker answers the next request. One endpoint, one worker, one
engine start for the module; every request is a few tokens.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import runpod
from openai.types.chat import ChatCompletion, ChatCompletionContentPartParam
from PIL import Image

from local_endpoint.harness import KEY, ROOT, LocalEndpoint, local_endpoint
from tests.openrouter_schema import valid_for_openrouter

pytestmark = pytest.mark.integration

MODEL = "tiny-vlm"
TEXT = "What is in the image?"
# Several KV-cache blocks long (vLLM's CPU blocks: 128 tokens; LMCache's chunks: 256)
LONG_TEXT = "Describe the colours of the picture above. " * 40 + TEXT
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 2}


def png(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


RED, BLUE = png((255, 0, 0)), png((0, 0, 255), (200, 300))


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@dataclass(frozen=True)
class Urls:
    """http URLs on loopback: an image, a page, a port that refuses, one that never answers."""

    red: str
    page: str
    refused: str
    silent: str


PAGES = {"/red.png": ("image/png", RED), "/page.html": ("text/html", b"<p>not an image</p>")}


class Pages(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        kind, body = PAGES.get(self.path, ("text/plain", b"not found"))
        self.send_response(200 if self.path in PAGES else 404)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def urls() -> Iterator[Urls]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    refused = socket.socket()  # bound, not listening: connections to it are refused
    refused.bind(("127.0.0.1", 0))
    silent = socket.socket()  # listening, never accepted: the kernel completes the handshake
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield Urls(
            red=f"{base}/red.png",
            page=f"{base}/page.html",
            refused=f"http://127.0.0.1:{refused.getsockname()[1]}/red.png",
            silent=f"http://127.0.0.1:{silent.getsockname()[1]}/red.png",
        )
    finally:
        server.shutdown()
        server.server_close()
        refused.close()
        silent.close()


@pytest.fixture(scope="module")
def endpoint(
    tmp_path_factory: pytest.TempPathFactory, worker_env: dict[str, str], tiny_vlm: Path
) -> Iterator[LocalEndpoint]:
    env = {
        **worker_env,
        "MODEL_NAME": str(tiny_vlm),
        "CHAT_TEMPLATE": "",  # SmolLM2's, from worker_env: unset (the model has its own)
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": MODEL,
        "MAX_MODEL_LEN": "1024",
        # one try of 1 s for a URL that never answers (the worker's default: 5 s, then 20 s)
        "VLLM_IMAGE_FETCH_TIMEOUT": "1",
        "VLLM_MEDIA_FETCH_MAX_RETRIES": "1",
        "NO_PROXY": "127.0.0.1",  # vLLM's fetches honour proxy variables
    }
    with local_endpoint(tmp_path_factory.mktemp("images"), env) as started:
        yield started


@pytest.fixture(scope="module")
def image_tokens(tiny_vlm: Path) -> int:
    """The prompt tokens one image adds, by the model's own processor (transformers')."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.tiny_vlm", "--image-prompt-tokens", str(tiny_vlm)],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.split()[-1])


@pytest.fixture(scope="module")
def claude(endpoint: LocalEndpoint) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{endpoint.base}/openai", api_key=KEY, max_retries=0)


def with_image(url: str, text: str = TEXT) -> list[ChatCompletionContentPartParam]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


def chat(client: openai.OpenAI, content: str | list[ChatCompletionContentPartParam]) -> Any:
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **GREEDY
    )


def still_serving(client: openai.OpenAI) -> None:
    answer: ChatCompletion = chat(client, with_image(data_url(RED)))
    assert answer.choices[0].finish_reason in ("stop", "length"), answer


def first_token_logprobs(client: openai.OpenAI, url: str) -> tuple[dict[str, float], int]:
    """The first answer token's top alternatives, and the prompt tokens the KV cache served."""
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": with_image(url, LONG_TEXT)}],
        logprobs=True,
        top_logprobs=5,
        **{**GREEDY, "max_tokens": 1},
    )
    assert answer.choices[0].logprobs and answer.choices[0].logprobs.content, answer
    assert answer.usage and answer.usage.prompt_tokens_details, answer
    first = answer.choices[0].logprobs.content[0]
    cached = answer.usage.prompt_tokens_details.cached_tokens or 0
    return {alt.token: alt.logprob for alt in first.top_logprobs}, cached


# --- the image reaches the model ---------------------------------------------------------------


def test_the_listing_says_images_are_taken(client: openai.OpenAI) -> None:
    listing = client.models.list()
    valid_for_openrouter(listing.model_dump(exclude_unset=True))
    [card] = listing.data
    assert card.id == MODEL and card.model_extra is not None
    assert [m["type"] for m in card.model_extra["input_modalities"]] == ["text", "image"]


def test_an_image_adds_its_tokens_to_the_prompt(client: openai.OpenAI, image_tokens: int) -> None:
    text: ChatCompletion = chat(client, TEXT)
    red: ChatCompletion = chat(client, with_image(data_url(RED)))
    # any size becomes one view of the model's image size: the same count
    blue: ChatCompletion = chat(client, with_image(data_url(BLUE)))
    assert text.usage and red.usage and blue.usage
    assert (red.usage.prompt_tokens - text.usage.prompt_tokens, blue.usage.prompt_tokens) == (
        image_tokens,
        red.usage.prompt_tokens,
    )
    assert image_tokens > 1


def test_two_images_give_the_same_text_different_logprobs(client: openai.OpenAI) -> None:
    red, _ = first_token_logprobs(client, data_url(RED))
    blue, blue_cached = first_token_logprobs(client, data_url(BLUE))
    again, again_cached = first_token_logprobs(client, data_url(RED))
    shared = red.keys() & blue.keys()
    differences = [abs(red[t] - blue[t]) for t in shared]
    print("\nfirst-token top logprobs: red", red, "blue", blue, "red again", again)
    print("cached prompt tokens: blue after red", blue_cached, "red again", again_cached)
    assert red == again  # the same image: the same numbers
    assert red != blue and (not shared or max(differences) > 0.01), (red, blue)
    # the KV cache keys blocks by the image they hold, not only by its placeholder tokens
    assert again_cached > blue_cached == 0, (again_cached, blue_cached)


def test_an_http_image_streamed(client: openai.OpenAI, urls: Urls, image_tokens: int) -> None:
    text: ChatCompletion = chat(client, TEXT)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": with_image(urls.red)}],
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and text.usage is not None
    assert usage.prompt_tokens - text.usage.prompt_tokens == image_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_an_http_image_one_shot_gives_what_its_data_url_gives(
    client: openai.OpenAI, urls: Urls
) -> None:
    by_url, _ = first_token_logprobs(client, urls.red)
    assert by_url == first_token_logprobs(client, data_url(RED))[0]


def test_anthropic_base64_image_blocks(claude: anthropic.Anthropic, image_tokens: int) -> None:
    def ask(blocks: list[Any]) -> anthropic.types.Message:
        return claude.messages.create(
            model=MODEL,
            max_tokens=2,
            messages=[{"role": "user", "content": [*blocks, {"type": "text", "text": TEXT}]}],
            extra_body={"temperature": 0},
        )

    text = ask([])
    image = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(RED).decode()}
    red = ask([{"type": "image", "source": image}])
    assert red.usage.input_tokens - text.usage.input_tokens == image_tokens
    assert red.content and red.stop_reason in ("end_turn", "max_tokens"), red


def test_native_jobs_with_a_data_url_and_an_http_url(
    rp: runpod.Endpoint, urls: Urls, image_tokens: int
) -> None:
    def ask(content: Any) -> dict[str, Any]:
        job = {"messages": [{"role": "user", "content": content}], "sampling_params": GREEDY}
        [answer] = rp.run_sync({"input": job}, timeout=120)
        return dict(answer)

    text = ask(TEXT)["usage"]["prompt_tokens"]
    for url in (data_url(RED), urls.red):
        assert ask(with_image(url))["usage"]["prompt_tokens"] - text == image_tokens, url


# --- what is refused, in each route's error shape; the worker keeps serving ---------------------

CORRUPT = data_url(b"these bytes are not an image")


def refused_cases(urls: Urls) -> list[tuple[str, str, type[openai.APIStatusError], int]]:
    """(case, image URL, the SDK's exception, status)."""
    bad, unprocessable = openai.BadRequestError, openai.UnprocessableEntityError
    return [
        ("corrupt image", CORRUPT, bad, 400),
        ("declared text/plain", data_url(RED, "text/plain"), bad, 400),
        ("declared application/pdf", data_url(RED, "application/pdf"), bad, 400),
        ("not base64", "data:image/png," + base64.b64encode(RED).decode(), bad, 400),
        ("http answering text/html", urls.page, bad, 400),
        ("http answering 404", urls.page + ".missing", unprocessable, 422),
        ("file: with no folder allowed", "file:///etc/hostname", bad, 400),
        ("port closed", urls.refused, unprocessable, 422),
        ("never answers", urls.silent, unprocessable, 422),
    ]


def test_bad_images_are_4xx_in_openais_shape_and_the_worker_keeps_serving(
    client: openai.OpenAI, urls: Urls
) -> None:
    seen = []
    for case, url, error, status in refused_cases(urls):
        started = time.monotonic()
        with pytest.raises(error) as caught:
            chat(client, with_image(url))
        body = caught.value.body
        assert isinstance(body, dict) and body.keys() == {"message", "type", "param", "code"}
        assert (body["code"], caught.value.status_code) == (status, status), (case, body)
        seen.append((case, status, round(time.monotonic() - started, 1)))
        still_serving(client)
    print("\nrefused images (case, status, seconds):", seen)


def test_bad_images_in_anthropic_blocks(claude: anthropic.Anthropic, urls: Urls) -> None:
    def ask(source: dict[str, Any]) -> anthropic.types.Message:
        block: Any = {"type": "image", "source": source}
        return claude.messages.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [block]}]
        )

    pdf = {
        "type": "base64",
        "media_type": "application/pdf",
        "data": base64.b64encode(RED).decode(),
    }
    with pytest.raises(anthropic.BadRequestError) as not_an_image:
        ask(pdf)
    with pytest.raises(anthropic.UnprocessableEntityError) as silent:
        ask({"type": "url", "url": urls.silent})
    for caught, status in ((not_an_image, 400), (silent, 422)):
        body = caught.value.body
        assert isinstance(body, dict) and body["type"] == "error", body
        assert body["error"]["code"] == status, body
    assert ask({**pdf, "media_type": "image/png"}).content  # still serving


def test_a_bad_image_fails_a_native_job_with_the_error_object(endpoint: LocalEndpoint) -> None:
    job = {
        "messages": [{"role": "user", "content": with_image(CORRUPT)}],
        "sampling_params": GREEDY,
    }
    status, body = endpoint.call("POST", "/runsync", {"input": job}, timeout=120)
    assert status == 200 and body["status"] == "FAILED", body
    error = json.loads(body["error"])["error"]
    assert (error["code"], error["type"]) == (400, "BadRequestError"), error
