from __future__ import annotations

import pytest

from handler.settings import Settings, load_settings
from tests.fakes import FakeEngine


@pytest.fixture
def settings() -> Settings:
    return load_settings(
        {
            "MODEL_NAME": "/models/x",
            "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "fake-model",
            "DEFAULT_MAX_TOKENS": "100",
            "STREAM_FLUSH_INTERVAL_MS": "0",
        }
    )


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()
