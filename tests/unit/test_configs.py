"""The configuration files under configs/ hold valid worker settings."""

from __future__ import annotations

from pathlib import Path

import yaml

from handler.lmcache import l2_adapters
from handler.settings import load_settings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_the_production_cache_setup_loads() -> None:
    env = yaml.safe_load((CONFIGS / "lmcache-production.yaml").read_text())["env"]
    assert all(isinstance(value, str) for value in env.values())
    settings = load_settings(env)
    assert settings.lmcache_enabled and settings.lmcache_l1_size_gb == 32
    assert [adapter["type"] for adapter in l2_adapters(settings)] == ["fs", "resp"]
    assert settings.engine_passthrough == {"ENABLE_PREFIX_CACHING": "true"}


def test_the_local_settings_load() -> None:
    lines = (CONFIGS / "local.env").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    settings = load_settings(env)
    assert settings.lmcache_l1_size_gb == 1 and settings.kv_cache_gb == 1
