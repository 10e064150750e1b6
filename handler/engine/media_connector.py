"""The worker's media connector: vLLM's own (``http``), with images the worker refuses stopped
before loading and failed fetches answered as the client's error, on every route.

vLLM loads a request's images through the connector its registry names ``VLLM_MEDIA_CONNECTOR``
(``http`` by default), from chat, the Anthropic Messages API and the Responses API alike, before
the request reaches the engine. :func:`install` registers this subclass under that default name,
in the worker's process, before vLLM's app is built; fetching, the allowlists
(``--allowed-media-domains``, ``--allowed-local-media-path``), retries and limits stay vLLM's.

Errors (vLLM's own classes, so each route answers them in its own error shape):
``VLLMValidationError`` (400) for an image URL :func:`handler.media.refusal` refuses,
``VLLMUnprocessableEntityError`` (422) for one :func:`handler.media.fetch_failure` recognises.
Not here: vLLM's application handlers never see these, because its Anthropic route turns every
exception into its answer itself.
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMUnprocessableEntityError, VLLMValidationError
from vllm.multimodal.media.connector import MEDIA_CONNECTOR_REGISTRY, MediaConnector

from handler.media import fetch_failure, refusal

DEFAULT_NAME = "http"  # VLLM_MEDIA_CONNECTOR's default


class WorkerMediaConnector(MediaConnector):  # type: ignore[misc]
    async def fetch_image_async(self, image_url: str, **kwargs: Any) -> Any:
        self._check(image_url)
        try:
            return await super().fetch_image_async(image_url, **kwargs)
        except Exception as exc:
            failure = _unprocessable(exc)
            if failure is None:
                raise
            raise failure from exc

    def fetch_image(self, image_url: str, **kwargs: Any) -> Any:
        self._check(image_url)
        try:
            return super().fetch_image(image_url, **kwargs)
        except Exception as exc:
            failure = _unprocessable(exc)
            if failure is None:
                raise
            raise failure from exc

    def _check(self, image_url: str) -> None:
        reason = refusal(image_url, files_allowed=self.allowed_local_media_path is not None)
        if reason is not None:
            raise VLLMValidationError(reason, parameter="image_url")


def _unprocessable(exc: Exception) -> Exception | None:
    """A failed fetch as vLLM's 422; None for any other error (raised as it is)."""
    reason = fetch_failure(exc)
    return None if reason is None else VLLMUnprocessableEntityError(reason, parameter="image_url")


def install() -> None:
    """Make :class:`WorkerMediaConnector` the connector vLLM loads by default in this process."""
    MEDIA_CONNECTOR_REGISTRY.register(DEFAULT_NAME)(WorkerMediaConnector)
