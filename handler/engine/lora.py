"""LoRA adapters loaded by name at run time, through vLLM's resolver extension point.

In: ``LORA_DIR`` and ``VLLM_LORA_RESOLVER_HF_REPO_LIST`` (:meth:`Adapters.from_settings`), then
every request's ``model`` before vLLM's app sees it (:meth:`Adapters.before`). Out: a name that
is not loaded yet and names an adapter of the folder (or of a listed Hub repository) is loaded
into the engine first, once however many requests name it at once, so that vLLM's app finds it
loaded; ``/v1/models`` also lists the folder's adapters not used yet (:meth:`Adapters.listed`).

How: the worker's resolver is registered in vLLM's ``LoRAResolverRegistry`` before vLLM's app
builds its ``OpenAIServingModels`` (which copies the registry), in place of vLLM's own plugins,
and the worker asks vLLM's ``resolve_lora`` (per-name lock, adapter ids, ``add_lora``, the served
adapters) for a name its checks let through. vLLM calls resolvers itself only under
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, which also registers the admin routes: the worker does not
set it. The resolver checks the name and the adapter (:mod:`handler.adapters`, then vLLM's own
``PEFTHelper`` rules: rank within ``MAX_LORA_RANK``, no DoRA, ...) and hands vLLM a private copy,
which vLLM reloads from when it evicts the adapter and needs it again: an adapter changed or
removed from the folder meanwhile cannot fail the engine's step.

Errors: NotFound (404) for a name that cannot be an adapter; InvalidRequest (400) for an adapter
that does not fit, saying why; 502 BadGatewayError when the Hub cannot give a listed
repository. A name that is no adapter anywhere goes on to vLLM's app, whose 404 names the model.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from handler import adapters
from handler.adapters import Prepared
from handler.errors import InvalidRequest, NotFound, WorkerError
from handler.model_card import default_hub_id
from handler.settings import Settings, csv_list

log = logging.getLogger("handler.engine")

RESOLVER = "runpod-worker"  # the worker's resolver's name in vLLM's registry


class Adapters:
    """The adapters a request may name that are loaded at run time, and their private copies."""

    def __init__(self, folder: Path | None, hub_repos: tuple[str, ...], settings: Settings):
        self.folder, self.hub_repos = folder, hub_repos
        hub_id = settings.hugging_face_id or default_hub_id(settings.model)
        self._names = (settings.model_id, hub_id, settings.model)
        self._served = settings.model_id
        self._bases = adapters.base_names(*self._names)
        self._private = Path(tempfile.mkdtemp(prefix="worker-loras-"))
        self._copies = itertools.count(1)
        self._loading: dict[str, asyncio.Future[None]] = {}  # one load per name at a time
        # adapters of the folder refused, with what their files were then: refused again at once
        # (and not listed) until their files change
        self._refused: dict[str, tuple[object, WorkerError]] = {}
        self._models: Any = None  # vLLM's OpenAIServingModels
        self._lora_config: Any = None  # vLLM's LoRAConfig

    @classmethod
    def from_settings(cls, settings: Settings) -> Adapters | None:
        """None when neither a folder nor Hub repositories give adapters; logs which do. A
        LORA_DIR that is not a folder raises SettingsError."""
        folder = adapters.choose(settings.lora_dir)
        repos = tuple(csv_list(settings.lora_hub_repos or ""))
        log.info("LoRA folder: %s", folder.reason)
        if repos:  # vLLM's own plugin then warns that it is not enabled: it is not needed
            log.info(
                "LoRA adapters by name from the Hugging Face Hub: %s (the worker's resolver; "
                "VLLM_PLUGINS is not needed)",
                ", ".join(repos),
            )
        return cls(folder.path, repos, settings) if folder.path or repos else None

    def register(self) -> None:
        """The worker's resolver in vLLM's registry, alone: vLLM's own plugins (the folder one
        joins any name to its folder; both compare the base model's name exactly) are taken
        out. Call before vLLM's app is built."""
        from vllm.lora.resolver import LoRAResolverRegistry

        for name in list(LoRAResolverRegistry.get_supported_resolvers()):
            if name != RESOLVER:
                log.warning("vLLM's LoRA resolver %r replaced by the worker's", name)
                LoRAResolverRegistry.resolvers.pop(name)
        LoRAResolverRegistry.register_resolver(RESOLVER, _Resolver(self))

    def bind(self, models: Any, engine_model: str, lora_config: Any) -> None:
        """vLLM's serving models of the app, the model path the engine loaded, the LoRA config."""
        self._models, self._lora_config = models, lora_config
        self._bases = adapters.base_names(*self._names, engine_model)

    async def before(self, body: Mapping[str, Any] | None) -> None:
        """Load the adapter a request names, if it is one not loaded yet. Runs on the engine's
        loop."""
        name = (body or {}).get("model")
        if not isinstance(name, str) or not name or self._known(name):
            return
        if not await asyncio.to_thread(self._may_be_adapter, name):
            return  # vLLM's app answers its 404
        load = self._loading.get(name)
        if load is None:  # the first request for it: every other one waits for this load
            load = self._loading[name] = asyncio.ensure_future(self._load(name))
            load.add_done_callback(lambda done: self._loaded(name, done))
        # a request that is stopped meanwhile leaves the load to finish for the others: a load
        # cut off in vLLM's resolve_lora would be taken for an adapter that does not load
        await asyncio.shield(load)

    def _loaded(self, name: str, load: asyncio.Future[None]) -> None:
        del self._loading[name]
        if not load.cancelled():
            load.exception()  # retrieved here too, for when every request for it was stopped

    async def _load(self, name: str) -> None:
        """Adapter ``name`` through vLLM's ``resolve_lora`` (which calls the worker's resolver,
        then loads it into the engine), unless it was refused as its files are now."""
        if self._known(name):
            return
        files = await asyncio.to_thread(self._fingerprint, name)
        refused = self._refused.get(name)
        if refused is not None and refused[0] == files:
            raise refused[1]
        started = time.perf_counter()
        try:
            result = await self._models.resolve_lora(name)
            if getattr(result, "error", None) is not None and result.error.code != 404:
                log.warning("LoRA adapter %r refused: vLLM could not load it", name)
                raise InvalidRequest(
                    f"LoRA adapter `{name}` could not be loaded: vLLM refused its weights for "
                    "the served model (the worker's log has vLLM's reason).",
                    param="model",
                )
        except WorkerError as exc:
            if files:
                self._refused[name] = (files, exc)
            raise
        self._refused.pop(name, None)
        if getattr(result, "error", None) is None:
            log.info("LoRA adapter %r loaded in %.2f s", name, time.perf_counter() - started)

    def _fingerprint(self, name: str) -> object:
        if self.folder is None or adapters.hub_name(name, self.hub_repos):
            return ()
        return adapters.fingerprint(self.folder.resolve(), name)

    def _known(self, name: str) -> bool:
        return bool(self._models.is_base_model(name)) or name in self._models.lora_requests

    def _may_be_adapter(self, name: str) -> bool:
        """Whether ``name`` is in a listed Hub repository or is an entry of the folder; a name
        that cannot be one in the folder is a NotFound (nothing is read for it)."""
        if adapters.hub_name(name, self.hub_repos):
            return True
        if self.folder is None:
            return False
        return adapters.locate(self.folder, name) is not None

    async def resolve(self, name: str) -> Any:
        """vLLM's LoRARequest for adapter ``name`` (its checked private copy), or None."""
        from vllm.lora.request import LoRARequest

        dest = self._private / str(next(self._copies))
        prepared = await asyncio.to_thread(self._prepare, name, dest)
        if prepared is None:
            return None
        try:
            self._check_rules(name, prepared.config)
        except BaseException:
            shutil.rmtree(prepared.path, ignore_errors=True)
            raise
        log.info(
            "LoRA adapter %r: checked, copied (%.1f MB), loading it",
            name,
            prepared.bytes / 1e6,
        )
        return LoRARequest(lora_name=name, lora_int_id=1, lora_path=str(prepared.path))

    def _prepare(self, name: str, dest: Path) -> Prepared | None:
        hub = adapters.hub_name(name, self.hub_repos)
        if hub is not None:
            return self._from_hub(name, *hub, dest)
        if self.folder is None:
            return None
        return adapters.prepare(self.folder, name, dest, self._bases, self._served)

    def _from_hub(self, name: str, repo: str, subfolder: str, dest: Path) -> Prepared | None:
        """The adapter from the Hub (or the local Hub cache), its files only."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError

        files = [adapters.CONFIG, *adapters.WEIGHTS]
        patterns = files if subfolder == "." else [f"{subfolder}/{f}" for f in files]
        try:
            snapshot = Path(snapshot_download(repo, allow_patterns=patterns))
        except RepositoryNotFoundError:  # also gated and unauthorized ones
            raise NotFound(
                f"The model `{name}` does not exist: the Hugging Face Hub has no repository "
                f"{repo} this worker may read (HF_TOKEN).",
                param="model",
            ) from None
        except Exception as exc:
            log.warning("LoRA adapter %r: the Hub did not give %s (%r)", name, repo, exc)
            raise WorkerError(
                f"LoRA adapter `{name}`: the Hugging Face Hub did not give {repo} "
                f"({type(exc).__name__}); try again later.",
                param="model",
                status=502,  # not 503 ServiceUnavailableError: that says this worker is going
                type="BadGatewayError",  # away (its engine died, it is stopping)
            ) from None
        # a snapshot's files are links into the repository's cache folder (blobs/)
        confine = snapshot.parent.parent if snapshot.parent.name == "snapshots" else snapshot
        return adapters.prepare_subfolder(
            snapshot, subfolder, name, dest, self._bases, self._served, confine
        )

    def _check_rules(self, name: str, config: dict[str, Any]) -> None:
        """vLLM's own rules for an adapter config (required fields, rank within MAX_LORA_RANK,
        supported features), checked before vLLM loads it."""
        from vllm.lora.peft_helper import PEFTHelper

        try:
            PEFTHelper.from_dict(dict(config)).validate_legal(self._lora_config)
        except (ValueError, TypeError) as exc:
            rank = " (MAX_LORA_RANK raises the limit)" if "max_lora_rank" in str(exc) else ""
            raise InvalidRequest(
                f"LoRA adapter `{name}` cannot be served: {str(exc).rstrip('.')}{rank}.",
                param="model",
            ) from None

    async def listed(self, listing: dict[str, Any]) -> dict[str, Any]:
        """vLLM's /v1/models answer with a card for each adapter of the folder not loaded yet
        (vLLM lists the loaded ones), as vLLM makes an adapter's card."""
        if self.folder is None or not isinstance(listing.get("data"), list):
            return listing
        from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission

        names = await asyncio.to_thread(self._listing, self.folder)
        shown = {card.get("id") for card in listing["data"] if isinstance(card, dict)}
        parent = self._models.base_model_paths[0].name
        cards = [
            ModelCard(id=name, root=name, parent=parent, permission=[ModelPermission()])
            for name in names
            if name not in shown
        ]
        return {**listing, "data": [*listing["data"], *(c.model_dump() for c in cards)]}

    def _listing(self, folder: Path) -> list[str]:
        """The folder's adapters that fit, less those refused as their files still are."""
        names = adapters.listing(folder, self._bases, self._served, self._check_rules)
        return [n for n in names if self._refused.get(n, ("",))[0] != self._fingerprint(n)]

    def close(self) -> None:
        """The private copies removed, the resolver taken out of vLLM's registry."""
        from vllm.lora.resolver import LoRAResolverRegistry

        LoRAResolverRegistry.resolvers.pop(RESOLVER, None)
        shutil.rmtree(self._private, ignore_errors=True)


class _Resolver:
    """vLLM's ``LoRAResolver`` interface (one method; vllm is imported only when the engine is
    built, so this does not subclass it)."""

    def __init__(self, owner: Adapters) -> None:
        self._owner = owner

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        # vLLM itself calls this for any name under VLLM_ALLOW_RUNTIME_LORA_UPDATING
        hub = adapters.hub_name(lora_name, self._owner.hub_repos)
        if hub is None and (self._owner.folder is None or adapters.name_problem(lora_name)):
            return None
        return await self._owner.resolve(lora_name)
