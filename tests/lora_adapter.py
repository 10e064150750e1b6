"""Make a LoRA adapter for the default model: peft, random weights, saved to a folder.

``python -m tests.lora_adapter BASE_MODEL_DIR OUT_DIR``. Random (not zero) B matrices, so the
adapter visibly changes the model's answers; rank 8 on the attention's q and v projections.
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
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    make_adapter(sys.argv[1], sys.argv[2])
