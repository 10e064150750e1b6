from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ValidationError

from handler.errors import (
    EngineDead,
    EngineError,
    InvalidRequest,
    NotFound,
    error_body,
    job_error,
    sanitize,
)


class _M(BaseModel):
    n: int


def test_worker_errors_keep_status_type_and_param() -> None:
    assert error_body(InvalidRequest("bad n", param="n")) == {
        "error": {"message": "bad n", "type": "BadRequestError", "param": "n", "code": 400}
    }
    assert error_body(NotFound("no route")) == {
        "error": {"message": "no route", "type": "NotFoundError", "param": None, "code": 404}
    }
    assert error_body(EngineError("slow down", status=429, type="TooManyRequests")) == {
        "error": {"message": "slow down", "type": "TooManyRequests", "param": None, "code": 429}
    }
    assert error_body(EngineDead())["error"]["code"] == 503


def test_unknown_exceptions_are_a_bland_500() -> None:
    body = error_body(KeyError("/secret/path.py"))
    assert body == {
        "error": {
            "message": "Internal error (KeyError); the worker keeps serving.",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
    }


def test_pydantic_errors_become_400_naming_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        _M.model_validate({"n": "x"})
    body = error_body(caught.value)
    assert body["error"]["code"] == 400 and body["error"]["param"] == "n"
    assert body["error"]["message"].startswith("n: Input should be a valid integer")


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("failed at /usr/lib/python3/site.py", "failed at <path>"),
        ("<object object at 0x7f00aa> broke", "<object> broke"),
        ('boom\nTraceback (most recent call last):\n  File "x.py", line 3', "boom"),
        ("value <function f at 0x1234> bad", "value <object> bad"),
        ("see /srv/app/weights and /data/y/z.json", "see <path> and <path>"),
        ("route /v1/chat/completions is fine", "route /v1/chat/completions is fine"),
    ],
)
def test_sanitize(raw: str, clean: str) -> None:
    assert sanitize(raw) == clean


def test_job_error_is_json_text_runpod_can_store() -> None:
    out = job_error(NotFound("nope"))
    assert list(out) == ["error"] and str(out["error"]) == out["error"]
    assert json.loads(out["error"]) == error_body(NotFound("nope"))
