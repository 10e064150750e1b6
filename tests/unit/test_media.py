"""Which image URLs the worker refuses before vLLM loads them, and which failures of loading one
are the client's (handler.media; the connector that asks it is driven in
tests/integration/test_images.py). Also the image-fetch defaults the worker's processes get."""

from __future__ import annotations

import aiohttp
import pytest

from handler import settings
from handler.media import DATA_URL_FORM, fetch_failure, refusal

PNG = "iVBORw0KGgo="  # the bytes are vLLM's to judge; only the URL's form is checked here
NOT_AN_IMAGE = f"an image data: URL must declare an image type, not {{}}: {DATA_URL_FORM}"
NOT_BASE64 = f"an image data: URL must be base64: {DATA_URL_FORM}"
NO_FILES = (
    "file: image URLs are refused: the worker reads no local folder unless "
    "ALLOWED_LOCAL_MEDIA_PATH names one"
)


@pytest.mark.parametrize(
    ("url", "files_allowed", "expected"),
    [
        (f"data:image/png;base64,{PNG}", False, None),
        (f"DATA:Image/JPEG;base64,{PNG}", False, None),
        (f"data:image/webp;name=x.webp;base64,{PNG}", False, None),
        (f"data:text/plain;base64,{PNG}", False, NOT_AN_IMAGE.format("'text/plain'")),
        (f"data:application/pdf;base64,{PNG}", False, NOT_AN_IMAGE.format("'application/pdf'")),
        (f"data:;base64,{PNG}", False, NOT_AN_IMAGE.format("none (text/plain by RFC 2397)")),
        (f"data:image/png,{PNG}", False, NOT_BASE64),  # vLLM: 501 Not Implemented
        (f"data:image/png;BASE64,{PNG}", False, NOT_BASE64),  # vLLM takes "base64" only
        ("data:image/png;base64", False, None),  # no comma: vLLM's own 400 says so
        ("https://example.com/cat.png", False, None),
        ("http://127.0.0.1:8000/x", False, None),  # ALLOWED_MEDIA_DOMAINS is vLLM's to apply
        ("file:///etc/passwd", False, NO_FILES),  # vLLM: 500 RuntimeError
        ("FILE:///etc/passwd", False, NO_FILES),
        ("file:///images/cat.png", True, None),  # vLLM keeps it inside the allowed folder
        ("ftp://example.com/cat.png", False, None),  # vLLM's own 400
        ("cat.png", False, None),
    ],
)
def test_image_urls_refused_before_loading(
    url: str, files_allowed: bool, expected: str | None
) -> None:
    assert refusal(url, files_allowed) == expected


def test_a_long_declared_type_is_cut() -> None:
    reason = refusal(f"data:{'x' * 500};base64,{PNG}", False)
    assert reason == NOT_AN_IMAGE.format(repr("x" * 40))


def response_error(status: int) -> aiohttp.ClientResponseError:
    return aiohttp.ClientResponseError(None, (), status=status)  # type: ignore[arg-type]


FETCH = "Failed to fetch the image: "


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (TimeoutError(), FETCH + "its URL did not answer in time"),
        (aiohttp.ServerTimeoutError("read"), FETCH + "its URL did not answer in time"),
        (response_error(503), FETCH + "its URL answered HTTP 503"),
        (response_error(429), FETCH + "its URL answered HTTP 429"),
        (ConnectionRefusedError(111, "refused"), FETCH + "the connection to its URL failed"),
        (aiohttp.ServerDisconnectedError(), FETCH + "the connection to its URL failed"),
        (aiohttp.ClientPayloadError("cut"), FETCH + "the connection to its URL failed"),
        (
            FileNotFoundError(2, "No such file", "/images/x.png"),
            "Failed to read the image file: no such file in ALLOWED_LOCAL_MEDIA_PATH",
        ),
        (IsADirectoryError(21, "dir"), "Failed to read the image file: it cannot be read"),
        (PermissionError(13, "denied"), "Failed to read the image file: it cannot be read"),
        (ValueError("Failed to load image: cannot identify image file"), None),  # vLLM's 400
        (RuntimeError("engine"), None),
        (KeyError("x"), None),
    ],
)
def test_failures_to_fetch_an_image_are_named_without_the_url(
    exc: BaseException, expected: str | None
) -> None:
    assert fetch_failure(exc) == expected


def test_image_fetch_defaults_and_no_redirects_past_an_allowlist(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = ["VLLM_IMAGE_FETCH_TIMEOUT", "VLLM_MEDIA_FETCH_MAX_RETRIES"]
    names += ["VLLM_MEDIA_URL_ALLOW_REDIRECTS", "ALLOWED_MEDIA_DOMAINS"]
    for name in names:
        monkeypatch.setenv(name, "")  # recorded, so the test leaves the environment as it was
        monkeypatch.delenv(name)
    settings.apply_process_environment()
    env = settings.environment()
    assert [env.get(name) for name in names] == ["5", "2", None, None]
    monkeypatch.setenv("ALLOWED_MEDIA_DOMAINS", "upload.wikimedia.org")
    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "2")  # a deployment's own value stays
    settings.apply_process_environment()
    assert [env.get(name) for name in names] == ["2", "2", "0", "upload.wikimedia.org"]
