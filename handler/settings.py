"""The worker's settings: one typed object, built once from the environment at cold start.

In: a mapping of environment variables (``os.environ`` in production, a plain dict in tests).
Out: a frozen :class:`Settings`. Names follow RunPod's official vLLM worker where it has one
(``MODEL_NAME``, ``MAX_MODEL_LEN``, ``OPENAI_SERVED_MODEL_NAME_OVERRIDE``, ``MAX_CONCURRENCY``).
Any other variable named like a ``vllm serve`` flag (``TENSOR_PARALLEL_SIZE`` for
``--tensor-parallel-size``) is kept in :attr:`Settings.engine_passthrough` for the engine module,
which checks it against vLLM's own argument parser.

Errors: a malformed value raises :class:`SettingsError`, whose message names the variable.

This is the only module that reads or writes ``os.environ``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from handler import openrouter

# Switches that keep every run on loopback: vLLM and LMCache usage telemetry, Hugging Face look-ups
# for a local model. Applied with setdefault, so a deployment can still override them.
TELEMETRY_OFF: dict[str, str] = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "LMCACHE_TRACK_USAGE": "false",
}
# vLLM limits a request's `n` to 16384 by default; one request with n=4096 held a CPU worker for
# over a minute. OpenAI's API takes at most 128. Also applied with setdefault.
ENGINE_LIMITS: dict[str, str] = {"VLLM_MAX_N_SEQUENCES": "128"}
# Images fetched by URL: vLLM tries 3 times, waiting 5, 20 and 80 s (1 and 4 s between), so a
# URL that never answered held its request about 110 s. Two tries: 5 + 1 + 20 s at most. Also
# applied with setdefault.
MEDIA_FETCH: dict[str, str] = {
    "VLLM_IMAGE_FETCH_TIMEOUT": "5",
    "VLLM_MEDIA_FETCH_MAX_RETRIES": "2",
}
# vLLM checks only the first URL's host against ALLOWED_MEDIA_DOMAINS: a redirect would lead past
# the list. Applied with setdefault when the list is set.
MEDIA_ALLOWLIST: dict[str, str] = {"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0"}
# vLLM's get_ip() learns the host's address with a UDP connect() to 8.8.8.8:80 at every engine
# start unless VLLM_HOST_IP is set; a single-node engine talks to itself only, on loopback.
# Applied with setdefault, and not for a multi-node engine (see single_node).
LOOPBACK_HOST: dict[str, str] = {"VLLM_HOST_IP": "127.0.0.1"}
# Variables that mean the engine spans hosts, so its address must be the host's.
_MULTI_NODE = ("MASTER_ADDR", "DATA_PARALLEL_ADDRESS", "DATA_PARALLEL_RPC_PORT")
# The local entry points (local run, tests, benchmarks) also skip runpod's start-up fitness
# checks, one of which opens a connection to a public DNS server.
LOCAL_ONLY: dict[str, str] = {
    "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
    "RUNPOD_SKIP_GPU_CHECK": "true",
}
# Stream POSTs a second, over all streams, when STREAM_POSTS_PER_S is unset. On a GPU a POST
# costs CPU nothing the model needs; on CPU it stalls the model's step (docs/measurements.md).
GPU_STREAM_POSTS_PER_S = 100.0
CPU_STREAM_POSTS_PER_S = 40.0

# Environment variables that look like vLLM flags but belong to the shell, the container or
# RunPod; they are never passed to the engine.
_NOT_ENGINE_FLAGS = frozenset(
    {"HOME", "PATH", "PWD", "SHELL", "TERM", "USER", "LANG", "HOSTNAME", "HOST", "PORT", "CONFIG"}
)
_FLAG_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
# Prefixes and names of variables that belong to the system, the container, CUDA, Python or a
# library rather than to vLLM's flags: a variable like these that names no flag is not worth a
# warning (any other is: see unknown_variables).
_ENVIRONMENT_PREFIXES = (
    *("RUNPOD_", "VLLM_", "LMCACHE_", "CUDA", "NVIDIA_", "NV_", "NCCL_", "HF_", "HUGGING"),
    *("TRANSFORMERS_", "TOKENIZERS_", "TORCH", "PYTORCH_", "TRITON_", "PYTHON", "PIP_", "UV_"),
    *("LD_", "LC_", "OMP_", "MKL_", "KMP_", "XDG_", "SSH_", "AWS_", "KUBERNETES_", "CONDA"),
    *("DEBIAN_", "GPG_", "MAKE", "PYTEST_", "WORKER_", "FAKE_", "OTEL_", "GIT_", "NODE_", "NPM_"),
    *("GRPC_",),
)
_ENVIRONMENT_NAMES = frozenset(
    {"TZ", "SHLVL", "OLDPWD", "LOGNAME", "MAIL", "DISPLAY", "COLUMNS", "LINES", "MFLAGS"}
    | {"VIRTUAL_ENV", "VENV", "MODEL_DIR", "DO_NOT_TRACK", "TMPDIR", "TEMP", "TMP", "EDITOR"}
    | {"PAGER", "LESS", "LS_COLORS", "HOSTTYPE", "OSTYPE", "PUBLIC_KEY", "JUPYTER_PASSWORD"}
    | {"SSL_CERT_FILE", "SSL_CERT_DIR"}
)

# RunPod's official worker (runpod-workers/worker-vllm, README, docs/configuration.md and
# .runpod/hub.json): its names for what this worker (or vLLM) calls otherwise, same meaning.
WORKER_VLLM_ALIASES: dict[str, str] = {
    "SERVED_MODEL_NAME": "OPENAI_SERVED_MODEL_NAME_OVERRIDE",
    "TOKENIZER": "TOKENIZER_NAME",
    "CUSTOM_CHAT_TEMPLATE": "CHAT_TEMPLATE",  # vLLM's --chat-template: a file or the template
    "OPENAI_RESPONSE_ROLE": "RESPONSE_ROLE",
}
# worker-vllm v2.x's speculative-decoding variables -> the keys of vLLM's speculative config
# (SPECULATIVE_CONFIG). A 0 is unset (its Hub form's default).
SPECULATIVE_FIELDS: dict[str, tuple[str, type]] = {
    "SPECULATIVE_METHOD": ("method", str),
    "SPECULATIVE_MODEL": ("model", str),
    "NUM_SPECULATIVE_TOKENS": ("num_speculative_tokens", int),
    "NGRAM_PROMPT_LOOKUP_MAX": ("prompt_lookup_max", int),
    "NGRAM_PROMPT_LOOKUP_MIN": ("prompt_lookup_min", int),
    "SPECULATIVE_DRAFT_TENSOR_PARALLEL_SIZE": ("draft_tensor_parallel_size", int),
    "SPECULATIVE_MAX_MODEL_LEN": ("max_model_len", int),
    "SPECULATIVE_DISABLE_BY_BATCH_SIZE": ("disable_by_batch_size", int),
    "SPECULATIVE_QUANTIZATION": ("quantization", str),
    "SPECULATIVE_MODEL_REVISION": ("revision", str),
    "SPECULATIVE_ENFORCE_EAGER": ("enforce_eager", bool),
}
# vLLM flags for which worker-vllm reads 0 as unset (vLLM refuses 0).
ZERO_MEANS_UNSET = frozenset({"MAX_NUM_BATCHED_TOKENS"})
_BY_TIME = "streams are batched by time here: STREAM_FLUSH_INTERVAL_MS, STREAM_POSTS_PER_S"
_SPECULATIVE_ALONE = (
    "used only beside SPECULATIVE_METHOD, SPECULATIVE_MODEL or NGRAM_PROMPT_LOOKUP_MAX"
)
# worker-vllm variables that do nothing here, and what to use instead; the start-up warning
# names each one set.
WORKER_VLLM_RETIRED: dict[str, str] = {
    "DEFAULT_BATCH_SIZE": _BY_TIME,
    "DEFAULT_MIN_BATCH_SIZE": _BY_TIME,
    "DEFAULT_BATCH_SIZE_GROWTH_FACTOR": _BY_TIME,
    "RAW_OPENAI_OUTPUT": "the OpenAI route always streams SSE text here, worker-vllm's default",
    "GUIDED_DECODING_BACKEND": 'STRUCTURED_OUTPUTS_CONFIG, e.g. {"backend": "xgrammar"}',
    "SWAP_SPACE": "gone from vLLM; LMCache's RAM tier, LMCACHE_L1_SIZE_GB, keeps KV caches",
    "DEVICE": "gone from vLLM, which finds the device itself",
    "SCHEDULER_DELAY_FACTOR": "gone from vLLM",
    "MAX_SEQ_LEN_TO_CAPTURE": "gone from vLLM; COMPILATION_CONFIG",
    "MAX_CONTEXT_LEN_TO_CAPTURE": "gone from vLLM; COMPILATION_CONFIG",
    "VLLM_ATTENTION_BACKEND": "ATTENTION_BACKEND",
    "DISABLE_LOG_REQUESTS": "ENABLE_LOG_REQUESTS, off by default",
    "VLLM_EXTRA_ARGS": "one variable per flag, named like it: TENSOR_PARALLEL_SIZE=2",
    "VLLM_PORT": "vLLM runs in the worker's process here, with no port",
    "VLLM_STARTUP_TIMEOUT": "no start-up limit here; RunPod's own applies",
    "REQUEST_TIMEOUT": "no per-request limit here; the endpoint's execution timeout applies",
    **dict.fromkeys(
        [k for k in SPECULATIVE_FIELDS if k not in ("SPECULATIVE_METHOD", "SPECULATIVE_MODEL")],
        _SPECULATIVE_ALONE,
    ),
}
# LORA_DIR's default: a folder on RunPod's network volume, used when it exists.
LORA_DIR_DEFAULT = "/runpod-volume/loras"
# Shared stores LMCACHE_L2_URL may name (RESP servers: Redis, Valkey; S3).
L2_SCHEMES = frozenset({"redis", "valkey", "s3"})


# Marks the settings RunPod (or its SDK) sets, which a deployment does not choose.
PLATFORM: dict[str, Any] = {"platform": True}
# Marks the `vllm serve` flags listed as settings (for the Hub's form): checked here, then passed
# to vLLM's parser like any other flag-named variable.
VLLM_FLAG: dict[str, Any] = {"vllm_flag": True}


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the environment variable."""


# The listing settings and the OpenRouter values each may hold (checked at start).
OPENROUTER_VALUES: dict[str, tuple[str, ...]] = {
    "model_quantization": openrouter.QUANTIZATIONS,
    "input_modalities": openrouter.INPUT_MODALITIES,
    "output_modalities": openrouter.OUTPUT_MODALITIES,
    "supported_sampling_parameters": openrouter.SAMPLING_PARAMETERS,
    "supported_features": openrouter.FEATURES,
}


class Settings(BaseModel):
    """Every knob of the worker. Field aliases are the environment variable names."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    model: str = Field(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        alias="MODEL_NAME",
        description="Hugging Face repository id or local folder of the model to serve.",
    )
    model_revision: str | None = Field(
        None, alias="MODEL_REVISION", description="Model revision (branch, tag or commit)."
    )
    tokenizer: str | None = Field(
        None,
        alias="TOKENIZER_NAME",
        description="Tokenizer repository or folder, if not the model's.",
    )
    served_model_name: str | None = Field(
        None,
        alias="OPENAI_SERVED_MODEL_NAME_OVERRIDE",
        description="Name clients pass as `model`; defaults to MODEL_NAME.",
    )
    max_model_len: int | None = Field(
        None,
        alias="MAX_MODEL_LEN",
        description="Context length; unset or 0: the model's; auto or -1: the longest that fits "
        "in memory (vLLM's auto-fit); 32k is 32,000 and 32K 32,768 (vLLM's spelling).",
    )
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = Field(
        "auto", alias="DTYPE", description="Weight and activation dtype."
    )
    kv_cache_gb: float | None = Field(
        None,
        alias="KV_CACHE_GB",
        gt=0,
        description="KV cache size in GiB (vLLM's --kv-cache-memory-bytes); unset: vLLM's "
        "default (GPU_MEMORY_UTILIZATION on GPU).",
    )
    vllm_config_file: str | None = Field(
        None,
        alias="VLLM_CONFIG_FILE",
        description="A `vllm serve` YAML config file (vLLM's --config); variables set here win "
        "over its keys.",
    )
    max_concurrency: int = Field(
        32,
        alias="MAX_CONCURRENCY",
        gt=0,
        description="Jobs one worker runs at once (runpod's concurrency modifier).",
    )
    default_max_tokens: int = Field(
        512,
        alias="DEFAULT_MAX_TOKENS",
        gt=0,
        description="max_tokens for native jobs that give none (vLLM's own default is 16).",
    )
    native_output_format: Literal["openai", "worker-vllm-v2"] = Field(
        "openai",
        alias="NATIVE_OUTPUT_FORMAT",
        description="How native `prompt`/`messages` jobs answer: openai (OpenAI response and "
        "chunk objects) or worker-vllm-v2 (RunPod's official worker v2.x: "
        '`{"choices": [{"tokens": [...]}], "usage": {"input", "output"}}`, streamed in batches '
        "of that shape). A job's `use_openai_format` overrides it.",
    )
    stream_flush_interval_ms: float = Field(
        50.0,
        alias="STREAM_FLUSH_INTERVAL_MS",
        ge=0,
        description="Streamed chunks are merged into one yield (one POST to RunPod) for at most "
        "this long; the first token is never held. 0 sends every chunk alone.",
    )
    stream_posts_per_s: float | None = Field(
        None,
        alias="STREAM_POSTS_PER_S",
        ge=0,
        description="Most stream POSTs per second the worker makes over all its streams: with "
        "many streams at once each one's chunks are merged for longer (streams / this, when "
        "longer than STREAM_FLUSH_INTERVAL_MS). Unset: 100 when the model runs on a GPU, 40 on "
        "CPU, where every POST (and, locally, the receiving end's work on the same cores) takes "
        "CPU time from the model. 0: no limit.",
    )
    shutdown_grace_s: float = Field(
        30.0,
        alias="SHUTDOWN_GRACE_S",
        gt=0,
        description="On SIGTERM, seconds in-flight jobs get to finish; then they end with a 503 "
        "error and the worker exits. Keep it below the platform's kill timeout.",
    )
    engine_dead_grace_s: float = Field(
        30.0,
        alias="ENGINE_DEAD_GRACE_S",
        gt=0,
        description="After the engine dies, seconds the worker waits for in-flight jobs to report "
        "their errors before it exits non-zero.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        alias="LOG_LEVEL",
        description="Log level of the worker's own logger (runpod's: RUNPOD_DEBUG_LEVEL, "
        "defaulted to INFO).",
    )
    lmcache_enabled: bool = Field(
        True,
        alias="LMCACHE_ENABLED",
        description="Run an LMCache server beside the engine and keep KV caches in it.",
    )
    lmcache_l1_size_gb: float | None = Field(
        None,
        alias="LMCACHE_L1_SIZE_GB",
        gt=0,
        description="LMCache's CPU RAM tier in GiB; unset: a quarter of the memory the worker "
        "may use, between 1 and 64.",
    )
    lmcache_chunk_size: int = Field(
        256,
        alias="LMCACHE_CHUNK_SIZE",
        gt=0,
        description="Tokens per cached KV chunk; every worker sharing a store must use the same.",
    )
    lmcache_eviction_policy: Literal["LRU", "ARC", "IsolatedLRU"] = Field(
        "LRU", alias="LMCACHE_EVICTION_POLICY", description="Eviction policy of the RAM tier."
    )
    lmcache_disk_path: str | None = Field(
        None,
        alias="LMCACHE_DISK_PATH",
        description="Folder for a local disk tier (LMCache's `fs` L2 adapter); unset: none.",
    )
    lmcache_l2_url: str | None = Field(
        None,
        alias="LMCACHE_L2_URL",
        description="Store shared by every worker: `redis://[user:password@]host:port` or "
        "`valkey://...` (RESP), or `s3://bucket.host?region=REGION` (credentials from the "
        "AWS environment).",
    )
    lmcache_l2_adapters: str | None = Field(
        None,
        alias="LMCACHE_L2_ADAPTERS",
        description="Extra L2 adapters as a JSON list of LMCache `--l2-adapter` objects "
        "(mooncake_store, nixl_store, ...).",
    )
    lmcache_server_args: str = Field(
        "",
        alias="LMCACHE_SERVER_ARGS",
        description="Further `lmcache server` flags, shell-quoted.",
    )
    lmcache_shared_memory: bool | None = Field(
        None,
        alias="LMCACHE_SHARED_MEMORY",
        description="Put the RAM tier in /dev/shm, where the engine reads and writes it "
        "directly, instead of passing the KV data through LMCache's socket pickled (hits about 2x "
        "faster on CPU). Unset: on vLLM's CPU build, when /dev/shm can hold twice the RAM tier (a "
        "restarted server's new tier beside the old one the engine still maps); on a GPU LMCache "
        "moves the data by CUDA IPC. true: whenever /dev/shm holds the tier once.",
    )
    lmcache_timeout_s: float = Field(
        5.0,
        alias="LMCACHE_TIMEOUT_S",
        gt=0,
        description="How long the engine waits on the cache server before it recomputes.",
    )
    lmcache_lookup_wait_ms: float = Field(
        20.0,
        alias="LMCACHE_LOOKUP_WAIT_MS",
        ge=0,
        le=1000,
        description="How long vLLM's scheduler may wait, in one pass over its waiting requests, "
        "for the cache server's answers to their lookups (all of them together). LMCache's own "
        "connector never waits: each new request, hit or miss, is then put off two or three "
        "scheduler passes (whole forward steps while other requests run). A server slower than "
        "this gets that behaviour. 0: LMCache's own lookups, unchanged.",
    )
    lmcache_save_decode: bool = Field(
        True,
        alias="LMCACHE_SAVE_DECODE",
        description="Store the KV cache of generated tokens too, chunk by chunk as they fill, "
        "not only of prompts: a conversation's next turn, on whichever worker takes it, finds "
        "the last answer in the cache. false: prompts only (LMCache's default), fewer stores.",
    )
    lora_modules: str | None = Field(
        None,
        alias="LORA_MODULES",
        description="LoRA adapters loaded at cold start and chosen per request by `model`: "
        "`name=path_or_repo` pairs separated by spaces, or a JSON list of "
        '`{"name", "path", "base_model_name"}` objects. Turns on --enable-lora with one slot per '
        "adapter (MAX_LORAS overrides); adapters above rank 16 need MAX_LORA_RANK.",
    )
    lora_dir: str = Field(
        LORA_DIR_DEFAULT,
        alias="LORA_DIR",
        description="Folder of LoRA adapters loaded by name at run time, no restart: each "
        "subfolder (a PEFT adapter: adapter_config.json, adapter_model.safetensors) is an "
        "adapter a request names as its `model`, loaded on first use and listed in /v1/models. "
        "The default is used when it exists; another folder must exist; blank: off. Slots: "
        "MAX_LORAS (adapters in one batch), MAX_CPU_LORAS (adapters kept loaded), MAX_LORA_RANK.",
    )
    lora_hub_repos: str | None = Field(
        None,
        alias="VLLM_LORA_RESOLVER_HF_REPO_LIST",
        description="Hugging Face repositories, comma-separated, whose LoRA adapters a request "
        "may name as `org/repo` or `org/repo/subfolder`: downloaded on first use (HF_TOKEN for "
        "private ones) and checked like LORA_DIR's (vLLM's variable; VLLM_PLUGINS is not "
        "needed).",
    )
    max_batch_requests: int = Field(
        64,
        alias="MAX_BATCH_REQUESTS",
        gt=0,
        description="Most requests one native batch job (`requests`) may carry.",
    )
    model_display_name: str | None = Field(
        None,
        alias="MODEL_DISPLAY_NAME",
        description="`name` in /v1/models (OpenRouter); default: the served model name's last "
        "part.",
    )
    hugging_face_id: str | None = Field(
        None,
        alias="HUGGING_FACE_ID",
        description="`hugging_face_id` in /v1/models; default: MODEL_NAME when it is a Hub id.",
    )
    max_output_length: int | None = Field(
        None,
        alias="MAX_OUTPUT_LENGTH",
        gt=0,
        description="The text output's `max_length` in /v1/models; default: the context length.",
    )
    model_quantization: str | None = Field(
        None,
        alias="MODEL_QUANTIZATION",
        description="`quantization` in /v1/models, one of OpenRouter's (int4, int8, fp4, mxfp4, "
        "nvfp4, fp6, fp8, mxfp8, fp16, bf16, fp32); default: from vLLM's quantization method "
        "(awq/awq_marlin/gptq/gptq_marlin int4, fp8 fp8, mxfp4, modelopt_fp4 nvfp4, ...) or the "
        "weight dtype; left out for a method whose format depends on the checkpoint "
        "(compressed-tensors, gguf, bitsandbytes, modelopt): set it then.",
    )
    input_modalities: str | None = Field(
        None,
        alias="INPUT_MODALITIES",
        description="The `input_modalities` types in /v1/models, comma-separated; default: text "
        "(and image for a multimodal model).",
    )
    output_modalities: str | None = Field(
        None,
        alias="OUTPUT_MODALITIES",
        description="The `output_modalities` types in /v1/models, comma-separated; default: text "
        "for a generating model, embeddings for an embedding model, rerank for a scoring model.",
    )
    pricing_prompt: str = Field(
        "0",
        alias="PRICING_PROMPT",
        description="The text input's `prompt` price in /v1/models: USD per prompt token, a "
        "decimal string.",
    )
    pricing_completion: str = Field(
        "0",
        alias="PRICING_COMPLETION",
        description="The text output's `completion` price in /v1/models: USD per generated token.",
    )
    pricing_input_cache_read: str | None = Field(
        None,
        alias="PRICING_INPUT_CACHE_READ",
        description="The text input's `cached_prompt` price in /v1/models: USD per prompt token "
        "served from the KV cache (vLLM's prefix cache or LMCache); default: not listed.",
    )
    model_created: int | None = Field(
        None,
        alias="MODEL_CREATED",
        ge=0,
        description="`created` in /v1/models (Unix seconds); default: when the worker started. "
        "The same in every answer (vLLM stamps each answer with its own time); set it for a "
        "listing that every worker answers the same.",
    )
    supported_sampling_parameters: str | None = Field(
        None,
        alias="SUPPORTED_SAMPLING_PARAMETERS",
        description="The sampling parameters the text output's `supported_parameters` describe in "
        "/v1/models, comma-separated, OpenRouter's names only (logprobs is a feature there); "
        "default: every OpenRouter sampling parameter vLLM takes.",
    )
    supported_features: str | None = Field(
        None,
        alias="SUPPORTED_FEATURES",
        description="The features the text output's `supported_parameters` describe in /v1/models "
        "(tools, json_mode, logprobs, ... as their request parameters), comma-separated; default: "
        "from the engine (tools when a tool parser is set, json_mode, structured_outputs, "
        "logprobs, reasoning when a reasoning parser is set).",
    )
    metrics_port: int = Field(
        0,
        alias="WORKER_METRICS_PORT",
        ge=0,
        le=65535,
        description="Serve Prometheus metrics (vLLM's own, plus "
        "worker_engine_running_requests) on this port; 0: off. The local endpoint sets it per "
        "worker.",
    )
    metrics_host: str = Field(
        "127.0.0.1", alias="WORKER_METRICS_HOST", description="Address of the metrics server."
    )
    tensor_parallel_size: int | None = Field(
        None,
        alias="TENSOR_PARALLEL_SIZE",
        gt=0,
        description="GPUs the model is split across (vLLM's --tensor-parallel-size).",
        json_schema_extra=VLLM_FLAG,
    )
    gpu_memory_utilization: float | None = Field(
        None,
        alias="GPU_MEMORY_UTILIZATION",
        gt=0,
        le=1,
        description="Share of GPU memory vLLM may use, weights and KV cache (vLLM default 0.9).",
        json_schema_extra=VLLM_FLAG,
    )
    max_num_seqs: int | None = Field(
        None,
        alias="MAX_NUM_SEQS",
        gt=0,
        description="Most sequences in one engine batch (vLLM's --max-num-seqs).",
        json_schema_extra=VLLM_FLAG,
    )
    quantization: str | None = Field(
        None,
        alias="QUANTIZATION",
        description="Weight quantization method (awq, gptq, fp8, ...); unset: from the model.",
        json_schema_extra=VLLM_FLAG,
    )
    kv_cache_dtype: str | None = Field(
        None,
        alias="KV_CACHE_DTYPE",
        description="KV cache dtype (auto, fp8, ...).",
        json_schema_extra=VLLM_FLAG,
    )
    enable_prefix_caching: bool | None = Field(
        None,
        alias="ENABLE_PREFIX_CACHING",
        description="vLLM's own prefix cache in GPU memory (on by default).",
        json_schema_extra=VLLM_FLAG,
    )
    enable_auto_tool_choice: bool | None = Field(
        None,
        alias="ENABLE_AUTO_TOOL_CHOICE",
        description="Let the model call tools on its own (tool_choice auto); unset: on when a "
        "tool parser is set or detected; false keeps the parser for required and named calls only.",
    )
    tool_call_parser: str = Field(
        "auto",
        alias="TOOL_CALL_PARSER",
        description="vLLM's parser for the model's tool-call format: auto (detected from the "
        "model's chat template and config.json), none, or a name (hermes, llama3_json, mistral, "
        "qwen3_coder, openai, ...).",
    )
    reasoning_parser: str = Field(
        "auto",
        alias="REASONING_PARSER",
        description="vLLM's parser that splits reasoning from content: auto (detected from the "
        "chat template's thinking section), none, or a name (deepseek_r1, qwen3, ...).",
    )
    trust_remote_code: bool | None = Field(
        None,
        alias="TRUST_REMOTE_CODE",
        description="Run the model repository's own Python code (some architectures need it).",
        json_schema_extra=VLLM_FLAG,
    )
    allowed_media_domains: str | None = Field(
        None,
        alias="ALLOWED_MEDIA_DOMAINS",
        description="The hosts image URLs may name, separated by spaces (vLLM's "
        "--allowed-media-domains); unset: any host the worker reaches. When set, redirects are "
        "not followed (VLLM_MEDIA_URL_ALLOW_REDIRECTS=0 unless set).",
        json_schema_extra=VLLM_FLAG,
    )
    allowed_local_media_path: str | None = Field(
        None,
        alias="ALLOWED_LOCAL_MEDIA_PATH",
        description="A folder whose files requests may name as file: image URLs (vLLM's "
        "--allowed-local-media-path); unset: file: URLs are refused.",
        json_schema_extra=VLLM_FLAG,
    )
    base_path: str = Field(
        "/models",
        alias="BASE_PATH",
        description="Folder of a model baked into the image at build time (its model.json names "
        "it); used, offline, when it is MODEL_NAME at MODEL_REVISION.",
    )
    model_cache_path: str = Field(
        "/runpod-volume/huggingface-cache/hub",
        alias="RUNPOD_MODEL_CACHE",
        description="RunPod's cached-models folder (Hugging Face hub layout); a model found there "
        "loads offline. Otherwise the model is downloaded at cold start.",
    )
    compile_cache_dir: str = Field(
        "/runpod-volume/vllm-cache",
        alias="COMPILE_CACHE_DIR",
        description="Folder on the network volume for vLLM's compile cache (torch.compile), so "
        "later workers of the endpoint load what the first compiled; used when its parent is "
        "mounted and it is writable with 1 GiB free, otherwise the cache stays in the container "
        "and the log says why. Blank: off.",
    )
    vllm_cache_root: str | None = Field(
        None,
        alias="VLLM_CACHE_ROOT",
        description="vLLM's own cache folder; when set it is used as it is, and "
        "COMPILE_CACHE_DIR is not; unset: vLLM's (~/.cache/vllm).",
    )
    hf_token: SecretStr | None = Field(
        None,
        alias="HF_TOKEN",
        description="Hugging Face token for gated or private models downloaded at run time.",
    )
    runpod_min_memory_gb: float = Field(
        4.0,
        alias="RUNPOD_MIN_MEMORY_GB",
        ge=0,
        description="Set by RunPod's SDK: free memory its start-up check asks for; LMCache's "
        "default RAM tier leaves it (and 8 GiB for the engine) free.",
        json_schema_extra=PLATFORM,
    )
    runpod_webhook_get_job: str | None = Field(
        None,
        alias="RUNPOD_WEBHOOK_GET_JOB",
        description="Set by RunPod in production. Without it (and without --rp_serve_api or "
        "RUNPOD_REALTIME_PORT) `python -m handler` runs test_input.json (or "
        "--test_input '<json>') and exits.",
        json_schema_extra=PLATFORM,
    )
    runpod_realtime_port: int = Field(
        0,
        alias="RUNPOD_REALTIME_PORT",
        ge=0,
        description="Set by RunPod for realtime workers.",
        json_schema_extra=PLATFORM,
    )
    engine_passthrough: dict[str, str] = Field(
        default_factory=dict,
        description="Other variables, passed to vLLM when named like one of its flags.",
    )

    @field_validator("lmcache_l2_url")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in L2_SCHEMES:
            raise ValueError(f"the scheme must be one of {', '.join(sorted(L2_SCHEMES))}")
        return value

    @field_validator("lmcache_l2_adapters")
    @classmethod
    def _json_list(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parsed = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not JSON: {exc}") from None
            if not isinstance(parsed, list) or not all(
                isinstance(item, dict) and "type" in item for item in parsed
            ):
                raise ValueError('expected a JSON list of objects with a "type"')
        return value

    @field_validator("lora_modules")
    @classmethod
    def _lora_specs(cls, value: str | None) -> str | None:
        if value is not None:
            lora_specs(value)
        return value

    @field_validator(
        "model_quantization",
        "input_modalities",
        "output_modalities",
        "supported_sampling_parameters",
        "supported_features",
    )
    @classmethod
    def _openrouter_values(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        allowed = OPENROUTER_VALUES[info.field_name or ""]
        items = csv_list(value)
        wrong = openrouter.invalid(items, allowed)
        if wrong or not items:
            raise ValueError(
                f"{', '.join(wrong) or 'nothing'}: not OpenRouter's; expected "
                f"{'one' if info.field_name == 'model_quantization' else 'some'} of "
                f"{', '.join(allowed)}"
            )
        if info.field_name == "model_quantization" and len(items) > 1:
            raise ValueError("expected one quantization")
        return value

    @field_validator("pricing_prompt", "pricing_completion", "pricing_input_cache_read")
    @classmethod
    def _price(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            price = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError("expected a decimal number of USD per token") from None
        if not price.is_finite() or price < 0:
            raise ValueError("expected a non-negative decimal number of USD per token")
        return value.strip()

    @field_validator("max_model_len", mode="before")
    @classmethod
    def _context_length(cls, value: Any) -> Any:
        value = context_length(value) if isinstance(value, str) else value
        return None if value == 0 else value

    @field_validator("max_model_len")
    @classmethod
    def _auto_or_positive(cls, value: int | None) -> int | None:
        if value is not None and value < -1:
            raise ValueError("expected a positive length, auto (-1) or 0 (the model's)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def model_id(self) -> str:
        """The name clients use for the base model."""
        return self.served_model_name or self.model

    @property
    def on_runpod(self) -> bool:
        """runpod's production loop (or realtime server) will run, not its local test mode."""
        return bool(self.runpod_webhook_get_job) or self.runpod_realtime_port > 0

    @property
    def flush_interval_s(self) -> float:
        return self.stream_flush_interval_ms / 1000.0

    def posts_per_s(self, on_cpu: bool) -> float:
        """The stream POST budget: ``STREAM_POSTS_PER_S``, else the default for the device."""
        if self.stream_posts_per_s is not None:
            return self.stream_posts_per_s
        return CPU_STREAM_POSTS_PER_S if on_cpu else GPU_STREAM_POSTS_PER_S


def lora_specs(value: str) -> list[str]:
    """LORA_MODULES as ``vllm serve --lora-modules`` values: ``name=path`` or JSON objects."""
    text = value.strip()
    if text.startswith(("[", "{")):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        items = parsed if isinstance(parsed, list) else [parsed]
        if not items or not all(
            isinstance(item, dict) and {"name", "path"} <= item.keys() for item in items
        ):
            raise ValueError('expected JSON objects with "name" and "path"')
        return [json.dumps(item) for item in items]
    specs = text.split()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not (sep and name and path):
            raise ValueError(f"expected name=path, got {spec!r}")
    return specs


_HUMAN_INT = re.compile(r"(\d+(?:\.\d+)?)([kKmMgG]?)")
_MULTIPLIERS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}


def context_length(text: str) -> int | str:
    """MAX_MODEL_LEN as vLLM's parser reads it: ``auto`` or ``-1`` (auto-fit), ``32k``
    (decimal), ``32K`` (binary), a plain number; anything else is returned for pydantic to
    refuse."""
    text = text.strip()
    if text.lower() == "auto" or text == "-1":
        return -1
    match = _HUMAN_INT.fullmatch(text)
    if not match or ("." in match[1] and match[2].isupper()):
        return text
    return int(float(match[1]) * _MULTIPLIERS[match[2]])


def csv_list(value: str) -> list[str]:
    """A comma-separated setting as a list of its non-empty, stripped items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def deployment_names() -> list[str]:
    """The variables a deployment chooses (every setting but those RunPod sets), in order."""
    return [
        field.alias
        for field in Settings.model_fields.values()
        if field.alias is not None and field.json_schema_extra != PLATFORM
    ]


def env_names() -> dict[str, str]:
    """Environment variable name -> field name, for every setting read from the environment."""
    return {
        field.alias: name
        for name, field in Settings.model_fields.items()
        if field.alias is not None
    }


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Build settings from an environment mapping; raise SettingsError naming a bad variable.
    RunPod's official worker's names are read as theirs (:func:`worker_vllm_environment`)."""
    environ = worker_vllm_environment(environ)
    names = env_names()
    # an empty value is an unset one (RunPod's forms send "" for an input left blank)
    known = {alias: environ[alias] for alias in names if environ.get(alias, "").strip()}
    for name in ("COMPILE_CACHE_DIR", "LORA_DIR"):
        if not environ.get(name, "x").strip():  # set but blank: turned off
            known[name] = ""
    flags = {
        field.alias
        for field in Settings.model_fields.values()
        if field.json_schema_extra == VLLM_FLAG
    }
    passthrough = {
        key: value
        for key, value in environ.items()
        if (key not in names or key in flags)
        and key not in _NOT_ENGINE_FLAGS
        and value.strip()
        and _FLAG_NAME.match(key)
    }
    try:
        return Settings.model_validate({**known, "engine_passthrough": passthrough})
    except ValidationError as exc:
        raise SettingsError(_describe(exc, known)) from None


def worker_vllm_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with RunPod's official worker's variables in this worker's terms: aliases
    renamed (:data:`WORKER_VLLM_ALIASES`), its speculative variables assembled into
    SPECULATIVE_CONFIG, a 0 that means unset (:data:`ZERO_MEANS_UNSET`) dropped. The mapping given
    is not changed. An alias and its target that disagree, or SPECULATIVE_CONFIG beside the
    variables it would be made of, raise SettingsError."""
    env = dict(environ)
    for alias, name in WORKER_VLLM_ALIASES.items():
        value = env.pop(alias, "").strip()
        if value and env.get(name, "").strip() not in ("", value):
            raise SettingsError(f"{alias} and {name} are both set, to different values: set one")
        if value:
            env[name] = value
    for name in ZERO_MEANS_UNSET:
        if env.get(name, "").strip() == "0":
            del env[name]
    config = speculative_config(env)
    for name, (_, kind) in SPECULATIVE_FIELDS.items():
        if config is not None or (kind is int and env.get(name, "").strip() == "0"):
            env.pop(name, None)
    if config is not None:
        if env.get("SPECULATIVE_CONFIG", "").strip():
            raise SettingsError(
                "SPECULATIVE_CONFIG and SPECULATIVE_METHOD / SPECULATIVE_MODEL / "
                "NGRAM_PROMPT_LOOKUP_MAX are both set: set SPECULATIVE_CONFIG only"
            )
        env["SPECULATIVE_CONFIG"] = json.dumps(config)
    return env


def speculative_config(environ: Mapping[str, str]) -> dict[str, Any] | None:
    """vLLM's speculative config from worker-vllm v2's variables, as v2 assembled it: none unless
    a method, a draft model or an n-gram window is given; the method, when not given, is n-gram
    for a window without a model, else read from the model's name (eagle3, eagle, medusa) or
    draft_model."""
    values: dict[str, Any] = {}
    for name, (key, kind) in SPECULATIVE_FIELDS.items():
        raw = environ.get(name, "").strip()
        if raw:
            value = _typed(name, raw, kind)
            if value != 0 or kind is not int:
                values[key] = value
    if not {"method", "model", "prompt_lookup_max"} & values.keys():
        return None
    if "method" not in values:
        model = str(values.get("model", "")).lower()
        kinds = [k for k in ("eagle3", "eagle", "medusa") if k in model]
        values["method"] = "ngram" if not model else (kinds or ["draft_model"])[0]
    return values


def _typed(name: str, raw: str, kind: type) -> Any:
    if kind is bool:
        return raw.lower() in ("true", "1", "yes", "on")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: expected a whole number") from None
    return raw


def unknown_variables(names: Iterable[str], options: Iterable[str]) -> list[str]:
    """The variables among ``names`` shaped like vLLM flags that name none of ``options``
    (vLLM's ``--flag`` spellings), each with what to use instead where known. Shaped like a
    flag: one of worker-vllm's retired variables, or a name that starts with a word vLLM's flags
    start with (MAX_, ENABLE_, KV_, ...) or is one letter or two from a flag's, unless it belongs
    to the system or a library (CUDA_, PYTHON..., HF_, VLLM_, ...)."""
    known = {o[2:].upper().replace("-", "_") for o in options if o.startswith("--")}
    first_words = {flag.split("_")[0] for flag in known}
    out = []
    for name in sorted(set(names) - known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.9)
        advice = WORKER_VLLM_RETIRED.get(name)
        shaped = name.split("_")[0] in first_words or bool(close)
        if advice is None and not (shaped and _not_environment(name)):
            continue
        if advice is None and close:
            advice = f"did you mean {close[0]}?"
        out.append(f"{name} ({advice})" if advice else name)
    return out


def _not_environment(name: str) -> bool:
    if name in _ENVIRONMENT_NAMES or name in _NOT_ENGINE_FLAGS:
        return False
    return bool(_FLAG_NAME.match(name)) and not name.startswith(_ENVIRONMENT_PREFIXES)


def _describe(exc: ValidationError, given: Mapping[str, str]) -> str:
    lines = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "?"
        shown = f"={given[name]!r}" if name in given else ""
        lines.append(f"{name}{shown}: {error['msg']}")
    return "invalid setting: " + "; ".join(lines)


HUB_OFFLINE: dict[str, str] = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def single_node(environ: Mapping[str, str]) -> bool:
    """Whether the engine runs on this host alone: no Ray executor, no ``NNODES`` above 1, no
    multi-node or data-parallel address."""
    if environ.get("DISTRIBUTED_EXECUTOR_BACKEND", "").strip().lower() == "ray":
        return False
    if environ.get("NNODES", "1").strip() not in ("", "1"):
        return False
    return not any(environ.get(name, "").strip() for name in _MULTI_NODE)


def apply_process_environment(extra: Mapping[str, str] | None = None) -> None:
    """Set the telemetry switches, the engine limits, the image-fetch limits (no redirects with
    a media allowlist), the loopback host address of a single-node engine (and ``extra``) in
    os.environ, keeping values already set.

    Called once by an entry point before vLLM or runpod are imported.
    """
    loopback = LOOPBACK_HOST if single_node(os.environ) else {}
    allowlist = MEDIA_ALLOWLIST if os.environ.get("ALLOWED_MEDIA_DOMAINS", "").strip() else {}
    defaults = {**TELEMETRY_OFF, **ENGINE_LIMITS, **MEDIA_FETCH, **allowlist, **loopback}
    for key, value in {**defaults, **(extra or {})}.items():
        os.environ.setdefault(key, value)


def environment() -> Mapping[str, str]:
    """The process environment, for the entry points."""
    return os.environ
