"""vLLM's removed guided-decoding request fields, translated to ``structured_outputs``.

vLLM 0.32 dropped ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``,
``guided_whitespace_pattern`` and ``guided_decoding_backend`` from its requests; sent anyway, they
are ignored (a 200 with unconstrained output). Clients written for older vLLM, and for RunPod's
official worker, still send them; v2 of that worker also took vLLM's older ``SamplingParams``
object ``guided_decoding`` (``{"json": ..., "backend": ...}``) in ``sampling_params``.

In: a request body and the route it goes to. Out: a new body in which each removed field with an
equivalent became the matching key of ``structured_outputs`` (``guided_json`` -> ``json``, ...;
``guided_decoding``'s keys are already those), merged with any ``structured_outputs`` the request
already has. The caller's dict is not changed.

Errors: :class:`~handler.errors.InvalidRequest` (400) naming the field when it has no equivalent
(a backend other than ``auto``: vLLM 0.32 chooses the backend for the whole server;
``guided_decoding.disable_fallback``), when it goes to a route whose request takes no structured
outputs, or when it says something else than a ``structured_outputs`` key the request also gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from handler.errors import InvalidRequest

# removed field -> its key in vLLM's structured_outputs
EQUIVALENTS: dict[str, str] = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "guided_whitespace_pattern": "whitespace_pattern",
}
BACKEND = "guided_decoding_backend"
NESTED = "guided_decoding"  # vLLM's GuidedDecodingParams, as worker-vllm v2 took it
REMOVED: frozenset[str] = frozenset({*EQUIVALENTS, BACKEND, NESTED})
# GuidedDecodingParams keys that structured_outputs takes under the same name.
NESTED_KEYS = frozenset(
    {"json", "regex", "choice", "grammar", "json_object", "whitespace_pattern", "structural_tag"}
    | {"disable_any_whitespace", "disable_additional_properties"}
)
# Routes whose vLLM request model has `structured_outputs` (vLLM 0.32).
STRUCTURED_ROUTES: frozenset[str] = frozenset(
    {
        "/v1/chat/completions",
        "/v1/chat/completions/batch",
        "/v1/chat/completions/render",
        "/v1/completions",
        "/v1/completions/render",
        "/v1/responses",
        "/v1/responses/render",
    }
)


def translate_guided(route: str, body: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``body`` with its removed guided fields turned into ``structured_outputs``; ``prefix`` is
    where the body sits in the job (``input.sampling_params.``), for the error's ``param``."""
    given = sorted(REMOVED & body.keys())
    if not given:
        return dict(body)
    if route not in STRUCTURED_ROUTES:
        raise InvalidRequest(
            f"{given[0]} is not taken by {route}, which has no structured outputs",
            param=prefix + given[0],
        )
    _check_backend(body.get(BACKEND), prefix + BACKEND)
    out = {k: v for k, v in body.items() if k not in REMOVED}
    # structured_outputs key -> the field it came from, for an error's param
    wanted = {EQUIVALENTS[k]: (body[k], k) for k in given if k in EQUIVALENTS}
    wanted.update(_nested(body.get(NESTED), prefix + NESTED))
    wanted = {key: pair for key, pair in wanted.items() if pair[0] is not None}
    if wanted:
        out["structured_outputs"] = _merged(out.get("structured_outputs"), wanted, prefix)
    return out


def _nested(params: Any, param: str) -> dict[str, tuple[Any, str]]:
    """``guided_decoding``'s keys, each with where it came from."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise InvalidRequest(f"{NESTED} must be an object", param=param)
    _check_backend(params.get("backend"), param + ".backend")
    for key in sorted(params.keys() - NESTED_KEYS - {"backend"}):
        if key != "disable_fallback" or params[key]:
            raise InvalidRequest(
                f"{NESTED}.{key} has no equivalent in vLLM's structured_outputs",
                param=f"{param}.{key}",
            )
    return {key: (params[key], f"{param}.{key}") for key in NESTED_KEYS & params.keys()}


def _check_backend(backend: Any, param: str) -> None:
    if backend is None or backend == "auto":
        return
    raise InvalidRequest(
        f"{param.rsplit('.', 1)[-1]} is no longer chosen per request: vLLM picks the "
        "structured-outputs backend for the whole worker (the STRUCTURED_OUTPUTS_CONFIG setting, "
        'e.g. {"backend": "xgrammar"}); leave it out or send "auto"',
        param=param,
    )


def _merged(existing: Any, wanted: dict[str, tuple[Any, str]], prefix: str) -> dict[str, Any]:
    values = {key: value for key, (value, _) in wanted.items()}
    if existing is None:
        return values
    if not isinstance(existing, Mapping):
        raise InvalidRequest(
            "structured_outputs must be an object", param=prefix + "structured_outputs"
        )
    for key, (value, field) in wanted.items():
        if key in existing and existing[key] != value:
            raise InvalidRequest(
                f"{field.removeprefix(prefix)} and structured_outputs.{key} disagree; send only "
                "structured_outputs",
                param=field if field.startswith(prefix) else prefix + field,
            )
    return {**existing, **values}
