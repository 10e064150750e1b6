"""LMCache's vLLM connector, with a request's cache lookup answered in the scheduler pass that
asked for it (``LMCACHE_LOOKUP_WAIT_MS``), and a store the cache server never answers skipped
(:meth:`WorkerLMCacheConnector.wait_for_save`).

LMCache 0.5.6's multiprocess connector never waits for its server: the first time vLLM's
scheduler asks how many of a new request's tokens the cache holds, it sends the LOOKUP and
answers "not known yet"; the next pass polls the LOOKUP's acknowledgement, the one after asks
for the prefetch status, and only then is there an answer (0 for a miss). vLLM skips a request
while its answer is unknown, so every request, hit or miss, waits two or three scheduler passes
before it can be scheduled: a few milliseconds on an idle engine, a whole forward step each
while other requests run (a burst of 16 entered the engine in steps of 1+0+0+15 where it took
1+15 without LMCache). On loopback the answer comes within a millisecond or two, also for a
prompt shorter than one chunk (256 tokens), which can never hit.

A prompt shorter than one chunk is answered here, with no lookup sent (:func:`can_hit`): LMCache
would find nothing for it, since it stores and finds whole chunks only.

:class:`WorkerLMCacheConnector` asks again, within the same pass, until the answer comes or the
pass has waited ``lookup_wait_ms`` in all (its requests' lookups together): what the scheduler
gets is LMCache's own answer, only sooner; a server slower than that gets LMCache's own
behaviour (the request is asked about again next pass). ``lmcache.mp.eager_prefetch`` (set
with it) sends each LOOKUP as the request arrives, so a burst's lookups are answered together.

vLLM loads this class by name from ``kv_connector_module_path`` (:func:`handler.lmcache.
connector_config`), in the engine core process. Upstream, the fix is LMCache's: answer a
lookup it can answer at once (no full chunk; the RAM tier's, with no L2 store) in the LOOKUP's
reply, and wait briefly for a status, as its SGLang adapter already does
(``wait_prefetch_status``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from lmcache.integration.vllm.lmcache_mp_connector import LMCacheMPConnector

from handler.lmcache import LOOKUP_WAIT_KEY

log = logging.getLogger("handler.engine.lmcache_connector")

_POLL_S = 0.0002  # between two looks at an answer that is on its way (the GIL is let go)


Found = tuple[int | None, bool]  # vLLM's answer shape: tokens (None: not known yet), async load


def answer_within(
    ask: Callable[[], Found],
    budget_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Found, float]:
    """``ask()`` again until it knows (its first element is not None) or ``budget_s`` has
    passed; what it said last, and the time spent waiting."""
    found = ask()
    if found[0] is not None or budget_s <= 0:
        return found, 0.0
    started = clock()
    while found[0] is None and clock() - started < budget_s:
        sleep(_POLL_S)
        found = ask()
    return found, clock() - started


def can_hit(tokens: int, chunk_tokens: int, reserve_last_token: bool) -> bool:
    """Whether a lookup of ``tokens`` can find anything: LMCache stores and finds whole chunks of
    the prompt only (less its last token where ``reserve_last_token``), so a shorter prompt's
    lookup covers no chunk and its answer is 0."""
    return tokens - int(reserve_last_token) >= chunk_tokens


class WorkerLMCacheConnector(LMCacheMPConnector):  # type: ignore[misc]
    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        wait_ms = vllm_config.kv_transfer_config.get_from_extra_config(LOOKUP_WAIT_KEY, 0)
        self._wait_s = max(0.0, float(wait_ms)) / 1000
        self._waited_s = 0.0  # in this scheduler pass

    def _can_hit(self, request: Any) -> bool:
        chunk_tokens: int = self.scheduler_adapter.lmcache_tokens_per_chunk
        reserve = bool(self._reserve_last_token_for_lookup)
        return can_hit(len(request.all_token_ids), chunk_tokens, reserve)

    def on_new_request(self, request: Any) -> None:
        """LMCache's eager lookup, not sent for a prompt no chunk of which can be found (vLLM
        calls this on the scheduler's connector only)."""
        if self._can_hit(request):
            super().on_new_request(request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> Found:
        if not self._can_hit(request):
            # LMCache's answer to the lookup it would send, with no round trip to its server:
            # nothing to load; the request is tracked as LMCache tracks a miss, so its chunks
            # are stored once computed and its vLLM hits reported
            tracker = self._get_or_create_request_tracker(request)
            alignment: int = self._hit_alignment_tokens
            tracker.num_vllm_hit_tokens = num_computed_tokens // alignment * alignment
            return 0, False

        def ask() -> Found:
            found: Found = super(WorkerLMCacheConnector, self).get_num_new_matched_tokens(
                request, num_computed_tokens
            )
            return found

        found, waited = answer_within(ask, self._wait_s - self._waited_s)
        self._waited_s += waited
        return found

    def wait_for_save(self) -> None:
        """LMCache's, with a store the cache server never answered skipped instead of raised.

        In shared-memory mode (``LMCACHE_SHARED_MEMORY``) LMCache 0.5.6 raises a store that timed
        out (a server that died or restarted mid-store) out of the engine's forward step, which
        ends the engine; its pickled mode skips the store. Here both skip it, and the connector
        counts the server as down until its heartbeat finds it again, so the steps meanwhile do
        not each wait out the timeout."""
        try:
            super().wait_for_save()
        except TimeoutError as exc:
            log.warning("LMCache: a store got no answer (%s): skipped", type(exc).__name__)
            health = getattr(self.worker_adapter, "_health_event", None)  # LMCache 0.5.6's
            if health is not None:
                health.clear()

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        """The end of a scheduler pass: the next one has its whole budget again."""
        self._waited_s = 0.0
        return super().build_connector_meta(scheduler_output)
