"""Fixtures shared by the local-endpoint tests: each test module defines its own ``endpoint``
(fake-engine workers, or real ones) and gets the two clients for it."""

from __future__ import annotations

import openai
import pytest
import runpod

from local_endpoint.harness import LocalEndpoint


@pytest.fixture
def client(endpoint: LocalEndpoint) -> openai.OpenAI:
    return endpoint.openai()


@pytest.fixture
def rp(endpoint: LocalEndpoint) -> runpod.Endpoint:
    return endpoint.runpod()
