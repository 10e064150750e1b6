"""The pure parts of what the worker keeps to itself: the loopback host address of a single-node
engine, model names in metrics, credentials and request text kept out of logs. The outside-in
tests are tests/integration/test_worker_exposure.py and tests/unit/test_jobs_on_disk.py."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from handler import settings as settings_module
from handler.cold_start import ErrorSummary
from handler.lmcache import server_environment, store_credentials
from handler.metrics import served_registry
from handler.settings import load_settings, single_node


@pytest.mark.parametrize(
    ("environ", "single"),
    [
        ({}, True),
        ({"NNODES": "1", "TENSOR_PARALLEL_SIZE": "8"}, True),
        ({"NNODES": "2"}, False),
        ({"DISTRIBUTED_EXECUTOR_BACKEND": "ray"}, False),
        ({"MASTER_ADDR": "10.0.0.2"}, False),
        ({"DATA_PARALLEL_ADDRESS": "10.0.0.2"}, False),
    ],
)
def test_single_node(environ: dict[str, str], single: bool) -> None:
    assert single_node(environ) is single


def test_the_engine_host_address_defaults_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VLLM_HOST_IP", "NNODES", "MASTER_ADDR", "DISTRIBUTED_EXECUTOR_BACKEND"):
        monkeypatch.setenv(name, "")  # recorded, so the test leaves the environment as it was
        monkeypatch.delenv(name)
    settings_module.apply_process_environment()
    assert settings_module.environment()["VLLM_HOST_IP"] == "127.0.0.1"
    monkeypatch.setenv("VLLM_HOST_IP", "10.1.2.3")  # a user's own value stays
    settings_module.apply_process_environment()
    assert settings_module.environment()["VLLM_HOST_IP"] == "10.1.2.3"


def test_store_credentials_go_to_the_environment_only() -> None:
    assert store_credentials("redis://:s%3Acret@cache:6379") == {"LMCACHE_RESP_PASSWORD": "s:cret"}
    assert store_credentials("valkey://u:p@cache") == {
        "LMCACHE_RESP_USERNAME": "u",
        "LMCACHE_RESP_PASSWORD": "p",
    }
    assert store_credentials("redis://cache:6379") == {}
    assert store_credentials("s3://bucket.host") == {}
    assert store_credentials(None) == {}
    env = server_environment({"LMCACHE_RESP_PASSWORD": "old"}, load_settings({}))
    assert env["LMCACHE_RESP_PASSWORD"] == "old"  # an operator's own variable is kept


def test_metrics_name_the_served_model_not_its_folder() -> None:
    source = CollectorRegistry()
    hits = Gauge("lmcache_hits", "hits", ["model_name", "worker_id"], registry=source)
    hits.labels(model_name="/models/abc123", worker_id="0").set(3)
    other = Gauge("other", "no model label", registry=source)
    other.set(1)
    settings = load_settings(
        {"MODEL_NAME": "/models/abc123", "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "org/model"}
    )
    text = generate_latest(served_registry(settings, source)).decode()
    assert 'lmcache_hits{model_name="org/model",worker_id="0"} 3.0' in text
    assert "other 1.0" in text
    assert "/models/abc123" not in text


def test_vllm_error_logs_keep_the_error_type_not_its_message() -> None:
    class Info:
        message = "The model `secret prompt` does not exist."
        type = "NotFoundError"
        param = "model"
        code = 404

    class Response:
        error = Info()

    record = logging.LogRecord(
        "vllm", logging.ERROR, "x", 1, "Error with model %s", (Response(),), None
    )
    assert ErrorSummary().filter(record)
    assert record.getMessage() == "Error with model NotFoundError (param model, status 404)"
