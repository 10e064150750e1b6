"""Print, as JSON, the (method, path) of every route vLLM's app registers for a model, built as
``vllm serve`` builds it but without an engine: ``python -m tests.vllm_routes --model DIR [flags]``.

Every task of the model's kind is assumed supported, so that each router a model of that kind can
have is registered. Run in a process of its own: dev mode (``VLLM_SERVER_DEV_MODE``) is read from
the environment.
"""

from __future__ import annotations

import json
import sys
import warnings


def routes(argv: list[str]) -> list[tuple[str, str]]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.tasks import GENERATION_TASKS, POOLING_TASKS
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    config = AsyncEngineArgs.from_cli_args(args).create_model_config()
    generates = config.runner_type == "generate"
    tasks = tuple(GENERATION_TASKS) if generates else tuple(POOLING_TASKS)
    app = build_app(args, tasks, config)
    return sorted(
        (method, route.path)
        for route in app.routes
        for method in (getattr(route, "methods", None) or ["*"])
    )


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    print(json.dumps(routes(sys.argv[1:])))
