"""vLLM's arguments from the worker's settings, parsed by vLLM's own ``vllm serve`` parser.

Every ``vllm serve`` flag works as an environment variable (``TENSOR_PARALLEL_SIZE`` for
``--tensor-parallel-size``); the flags the worker sets from its own settings are owned (the
variable to use is named), flags of vLLM's HTTP server alone are refused or ignored, and a
variable shaped like a flag that vLLM does not know is warned about. A malformed argument raises
:class:`~handler.settings.SettingsError` naming the variable. vllm is imported in
:func:`build_args`' first call.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from handler import parsers
from handler.settings import (
    Settings,
    SettingsError,
    env_names,
    lora_specs,
    unknown_variables,
)

log = logging.getLogger("handler.engine")


# Flags the worker sets from its own settings; the variable to use instead of each.
_OWNED_FLAGS = {
    "--model": "MODEL_NAME",
    "--revision": "MODEL_REVISION",
    "--tokenizer": "TOKENIZER_NAME",
    "--served-model-name": "OPENAI_SERVED_MODEL_NAME_OVERRIDE",
    "--max-model-len": "MAX_MODEL_LEN",
    "--dtype": "DTYPE",
    "--kv-cache-memory-bytes": "KV_CACHE_GB",
    "--lora-modules": "LORA_MODULES",
    "--config": "VLLM_CONFIG_FILE",
}


# `vllm serve` flags that concern only its HTTP server. The worker runs vLLM's app in-process
# without that server, and RunPod authenticates callers: these would lock the worker out of its
# own app or change its routes, so they stop the worker ...
_SERVER_FLAGS_REFUSED = {
    "--api-key": "RunPod authenticates callers; vLLM's app would demand this key of the worker",
    "--root-path": "the worker calls vLLM's routes by their own paths",
    "--middleware": "the worker calls vLLM's app directly, not through an HTTP server",
}


# ... and these are ignored, with a warning (they configure a server that does not run).
_SERVER_FLAGS_IGNORED = frozenset(
    {
        "--host",
        "--port",
        "--uds",
        "--grpc-port",
        "--uvicorn-log-level",
        "--disable-uvicorn-access-log",
        "--disable-access-log-for-endpoints",
        "--allow-credentials",
        "--allowed-origins",
        "--allowed-methods",
        "--allowed-headers",
        "--ssl-keyfile",
        "--ssl-certfile",
        "--ssl-ca-certs",
        "--ssl-cert-reqs",
        "--ssl-ciphers",
        "--enable-ssl-refresh",
        "--disable-fastapi-docs",
        "--enable-offline-docs",
        "--h11-max-incomplete-event-size",
        "--h11-max-header-count",
        "--data-parallel-supervisor-port",
        "--dp-supervisor-probe-interval-s",
        "--dp-supervisor-probe-timeout-s",
        "--dp-supervisor-probe-failure-threshold",
    }
)


# Read by vLLM from the environment, with the effect of --api-key.
_KEY_VARIABLES = ("VLLM_API_KEY",)


# vLLM variables the worker does otherwise, and what to set instead.
_REFUSED_VARIABLES = {
    "VLLM_LORA_RESOLVER_CACHE_DIR": "set LORA_DIR instead (vLLM's folder resolver joins any "
    "name, ../ too, to the folder; the worker's checks the name and the adapter)",
}


_TRUE = {"1", "true", "yes", "on"}


_FALSE = {"0", "false", "no", "off", ""}


_CONNECTOR_OWNER = "LMCACHE_ENABLED=false, to configure a KV connector yourself"


def owned_args(
    settings: Settings,
    connector: Mapping[str, Any] | None = None,
    spare_lora_slot: bool = False,
    runtime_lora: bool = False,
) -> list[str]:
    """The ``vllm serve`` arguments that come from the worker's own settings (and the LMCache
    connector, when the worker runs an LMCache server). ``runtime_lora``: adapters are loaded
    by name at run time (LORA_DIR), so LoRA is on (slots: vLLM's MAX_LORAS, default 1).

    ``spare_lora_slot``: one LoRA slot more than adapters. vLLM 0.32's CPU LoRA kernels index the
    adapter weights with -1 for a request without an adapter, which is the last slot: in a batch
    that mixes both, base-model requests ran through the last adapter. An empty last slot makes
    that a no-op."""
    argv = [
        "--model",
        settings.model,
        "--served-model-name",
        settings.model_id,
        "--dtype",
        settings.dtype,
    ]
    optional = {
        "--config": settings.vllm_config_file,
        "--revision": settings.model_revision,
        "--tokenizer": settings.tokenizer,
        "--max-model-len": settings.max_model_len,
        "--kv-cache-memory-bytes": (
            int(settings.kv_cache_gb * 2**30) if settings.kv_cache_gb else None
        ),
    }
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    if settings.lora_modules:
        specs = lora_specs(settings.lora_modules)
        # every adapter can share a batch (MAX_LORAS, passed later, still wins)
        slots = len(specs) + (1 if spare_lora_slot else 0)
        argv += ["--enable-lora", "--max-loras", str(slots), "--lora-modules", *specs]
    elif runtime_lora:
        argv.append("--enable-lora")
    # usage.prompt_tokens_details.cached_tokens: prompt tokens from vLLM's prefix cache or LMCache
    argv.append("--enable-prompt-tokens-details")
    # the render routes (/v1/chat/completions/render, ...); the disaggregated-serving routes it
    # also registers are never reachable from a job (handler.protocol.REFUSED_ROUTES)
    argv.append("--enable-scale-out")
    if connector is not None:
        argv += ["--kv-transfer-config", json.dumps(connector)]
    return argv


def passthrough_args(
    parser: argparse.ArgumentParser, env: Mapping[str, str], connector: bool = False
) -> list[str]:
    """``vllm serve`` arguments for the variables named like one of its flags."""
    actions = {opt: action for action in parser._actions for opt in action.option_strings}
    owned = dict(_OWNED_FLAGS)
    if connector:
        owned["--kv-transfer-config"] = _CONNECTOR_OWNER
    argv: list[str] = []
    for name in _KEY_VARIABLES:
        if name in env:
            raise SettingsError(
                f"{name}: not for the worker ({_SERVER_FLAGS_REFUSED['--api-key']})"
            )
    for name in sorted(env):
        flag = "--" + name.lower().replace("_", "-")
        action = actions.get(flag)
        if action is None:
            continue
        if flag in owned:
            raise SettingsError(f"{name}: set {owned[flag]} instead")
        if flag in _SERVER_FLAGS_REFUSED:
            raise SettingsError(f"{name}: not for the worker ({_SERVER_FLAGS_REFUSED[flag]})")
        if flag in _SERVER_FLAGS_IGNORED:
            log.warning(
                "%s ignored: it configures vLLM's HTTP server, which the worker does not run", name
            )
            continue
        argv += _flag_args(name, flag, action, env[name])
    return argv


def _flag_args(name: str, flag: str, action: argparse.Action, value: str) -> list[str]:
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        lowered = value.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise SettingsError(f"{name}={value!r}: expected true or false")
        if lowered in _TRUE:
            return [flag]
        return ["--no-" + flag[2:]] if isinstance(action, argparse.BooleanOptionalAction) else []
    if action.nargs in ("+", "*"):
        return [flag, *shlex.split(value)]
    return [flag, value]


def build_args(
    settings: Settings, connector: Mapping[str, Any] | None = None, runtime_lora: bool = False
) -> argparse.Namespace:
    """Parse the settings with vLLM's own ``vllm serve`` parser; errors name the variable.
    ``runtime_lora``: see :func:`owned_args`."""
    for name, instead in _REFUSED_VARIABLES.items():  # before vLLM's plugins read them
        if name in settings.engine_passthrough:
            raise SettingsError(f"{name}: {instead}")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    options = [opt for action in parser._actions for opt in action.option_strings]
    unknown = unknown_variables(settings.engine_passthrough, options)
    if unknown:
        log.warning("not vLLM flags, so ignored: %s", "; ".join(unknown))
    base = owned_args(settings, connector, spare_lora_slot=on_cpu(), runtime_lora=runtime_lora)
    _parse(parser, base, "the model settings (" + ", ".join(sorted(env_names())) + ")")
    extra: list[str] = []
    for name in sorted(settings.engine_passthrough):
        one = passthrough_args(
            parser, {name: settings.engine_passthrough[name]}, connector is not None
        )
        if one:
            _parse(parser, base + one, f"{name}={settings.engine_passthrough[name]!r}")
            extra += one
    args = _parse(parser, base + extra, "the engine settings")
    chosen = _parser_args(settings, args)
    if chosen:
        args = _parse(parser, base + extra + chosen, "TOOL_CALL_PARSER / REASONING_PARSER")
    validate_parsed_serve_args(args)
    return args


def _parser_args(settings: Settings, args: argparse.Namespace) -> list[str]:
    """The tool and reasoning parser flags: the settings', or those detected from the model's
    files (:mod:`handler.parsers`) among the parsers this vLLM registers; logged once."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    # plugins register their names on import, as `vllm serve` does before it checks them
    if args.tool_parser_plugin and len(args.tool_parser_plugin) > 3:
        ToolParserManager.import_tool_parser(args.tool_parser_plugin)
    if args.reasoning_parser_plugin and len(args.reasoning_parser_plugin) > 3:
        ReasoningParserManager.import_reasoning_parser(args.reasoning_parser_plugin)
    folder: str | None = args.tokenizer or args.model
    if folder and not Path(folder).is_dir():
        try:  # a model vLLM will download: its small files only, into the same hub cache
            from huggingface_hub import snapshot_download

            folder = snapshot_download(
                folder, revision=args.revision, allow_patterns=list(parsers.MODEL_FILES)
            )
        except Exception as exc:  # detection then finds nothing; vLLM reports a real problem
            log.warning("parsers: cannot read %s's files (%s)", folder, type(exc).__name__)
            folder = None
    chosen = parsers.choose(
        parsers.read_model_files(folder, args.chat_template),
        settings.tool_call_parser,
        settings.reasoning_parser,
        ToolParserManager.list_registered(),
        ReasoningParserManager.list_registered(),
    )
    log.info("parsers: %s", chosen.describe())
    return parsers.flags(chosen, settings.enable_auto_tool_choice)


def _parse(parser: argparse.ArgumentParser, argv: list[str], what: str) -> argparse.Namespace:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(argv)
    except SystemExit:
        raise SettingsError(f"invalid {what}: {parser_error(stderr.getvalue())}") from None
    except (OSError, ValueError) as exc:  # reading VLLM_CONFIG_FILE (vLLM's --config)
        raise SettingsError(f"invalid {what}: VLLM_CONFIG_FILE: {exc}") from None


def parser_error(text: str) -> str:
    """argparse's error line and what follows it (a pydantic message spans several lines), in one
    line, without the usage text before it or pydantic's link after it."""
    lines = [line.strip() for line in text.strip().splitlines()]
    start = next((i for i, line in enumerate(lines) if ": error: " in line), len(lines) - 1)
    kept = [line for line in lines[start:] if line and not line.startswith("For further info")]
    if not kept:
        return "rejected by vLLM"
    kept[0] = kept[0].split(": error: ", 1)[-1]
    return " ".join(kept)


def on_cpu() -> bool:
    """Whether vLLM runs the model on CPU (its CPU build), not an accelerator."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())
