"""Make a LoRA adapter for the default model: peft, random weights, saved to a folder.

``python -m tests.lora_adapter BASE_MODEL_DIR OUT_DIR [OUT_DIR ...] [--seed N]``: one adapter per
folder, the first with seed N (default 0), the next N + 1, ... Random (not zero) B matrices on every
linear layer, rank 8, scaled by 8: the adapter plainly changes the model's answers (with q and v
alone at scale 2, SmolLM2 still answered "The capital of France is Paris.").
Run in a process of its own: it loads the model with transformers, outside the test process.
"""

from __future__ import annotations

import sys
import warnings


def make_adapter(base: str, out: str, seed: int = 0) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    layers = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=8, lora_alpha=64, target_modules=layers, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    args = sys.argv[1:]
    first = 0
    if "--seed" in args:
        at = args.index("--seed")
        first = int(args[at + 1])
        del args[at : at + 2]
    for i, out in enumerate(args[1:]):
        make_adapter(args[0], out, first + i)
