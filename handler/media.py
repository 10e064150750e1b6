"""Images in requests: which image URLs are refused before vLLM loads them, and how a failed
fetch is told to the client.

vLLM's media connector loads every image a request carries (an OpenAI ``image_url`` part, an
Anthropic ``image`` block, which vLLM turns into a ``data:`` URL, a Responses ``input_image``),
whatever the route. The worker's connector (:mod:`handler.engine.media_connector`) asks these two
functions before and after vLLM's own loading.

In: an image URL, or the exception loading one raised. Out: the reason, in words safe to show a
client (never the URL, a path or an address), or ``None``.

* :func:`refusal`: a ``data:`` URL whose declared type is not an image (``text/plain``,
  ``application/pdf``: vLLM decodes whatever bytes come, whatever the label), one that is not
  base64 (vLLM answers 501 Not Implemented), a ``file:`` URL while no folder is allowed (vLLM
  answers 500). The caller answers 400.
* :func:`fetch_failure`: a URL that does not answer in time, refuses the connection, or answers
  with a server error, and a ``file:`` URL inside the allowed folder that cannot be read (vLLM
  answers 500 for each). The caller answers 422, as vLLM does for a URL that answers 404.
"""

from __future__ import annotations

import aiohttp

# What a refusal says an image data URL must look like.
DATA_URL_FORM = "data:image/png;base64,... (or image/jpeg, image/webp, image/gif)"


def refusal(url: str, files_allowed: bool) -> str | None:
    """Why vLLM must not load this image URL, or None. ``files_allowed``: a folder is allowed
    for ``file:`` URLs (``ALLOWED_LOCAL_MEDIA_PATH``)."""
    scheme, colon, rest = url.partition(":")
    scheme = scheme.strip().lower() if colon else ""
    if scheme == "data":
        return _data_url_refusal(rest)
    if scheme == "file" and not files_allowed:
        return (
            "file: image URLs are refused: the worker reads no local folder unless "
            "ALLOWED_LOCAL_MEDIA_PATH names one"
        )
    return None


def _data_url_refusal(rest: str) -> str | None:
    spec, comma, _ = rest.partition(",")
    if not comma:
        return None  # vLLM's own 400 says the ',' is missing
    media_type, *params = spec.split(";")
    media_type = media_type.strip().lower()
    if not media_type.startswith("image/"):
        declared = repr(media_type[:40]) if media_type else "none (text/plain by RFC 2397)"
        return f"an image data: URL must declare an image type, not {declared}: {DATA_URL_FORM}"
    if not params or params[-1] != "base64":  # vLLM decodes base64 only
        return f"an image data: URL must be base64: {DATA_URL_FORM}"
    return None


def fetch_failure(exc: BaseException) -> str | None:
    """Why an image could not be fetched (or read from the allowed folder), when ``exc`` is
    such a failure; None for any other exception."""
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts too
        return "Failed to fetch the image: its URL did not answer in time"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"Failed to fetch the image: its URL answered HTTP {exc.status}"
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return "Failed to read the image file: no such file in ALLOWED_LOCAL_MEDIA_PATH"
    if isinstance(exc, PermissionError | IsADirectoryError):
        return "Failed to read the image file: it cannot be read"
    if isinstance(exc, aiohttp.ClientError | OSError):  # refused, reset, DNS; requests' errors
        return "Failed to fetch the image: the connection to its URL failed"
    return None
