"""vLLM's own benchmark client (``vllm bench serve``), runnable here: the CPU wheel's ``vllm``
console script is broken, so this calls the same code. Arguments are vllm bench serve's, e.g.

    scripts/in-env python -m bench.vllm_bench_serve --backend openai-chat \
        --base-url http://127.0.0.1:8000/v2/local/openai --endpoint /v1/chat/completions \
        --model SmolLM2-135M-Instruct --tokenizer "$MODEL_NAME" --dataset-name random \
        --random-input-len 128 --random-output-len 64 --num-prompts 32 --max-concurrency 8
"""

from __future__ import annotations

import sys


def main() -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm_bench_serve")
    add_cli_args(parser)
    bench_main(parser.parse_args(sys.argv[1:]))


if __name__ == "__main__":
    main()
