"""Make a tiny vision-language model for the image tests: Idefics3-shaped (SmolVLM's
architecture), the default model's text weights and tokenizer, a random tiny vision tower.

``python -m tests.tiny_vlm BASE_MODEL_DIR OUT_DIR``. Idefics3, not LLaVA: vLLM 0.32's llava
module imports transformers' Pixtral image processor, which needs torchvision, and the CPU
development stack has none (its PyPI wheels are CUDA builds that break imports); vLLM's idefics3
module does not.

- tokenizer: the base model's, plus the special tokens Idefics3's processor writes
  (``<fake_token_around_image>``, ``<image>``, ``<end_of_utterance>``, ``<global-img>``);
- vision: 2 layers, hidden 32, 32x32 pixels in 8x8 patches (16), merged 2x2 (``scale_factor``)
  into 4 image embeddings; image splitting off, so every image is resized to one 32x32 view and
  takes the same number of prompt tokens whatever its size (:func:`image_prompt_tokens`);
- text: the base model's weights, its embedding grown by the new tokens;
- chat template: ChatML (the base model's) that renders OpenAI-style content lists, an image part
  as ``<image>``, which the processor expands.

Run in a process of its own: it loads the model with transformers, outside the test process.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IMAGE_SIZE, PATCH, SCALE = 32, 8, 2


def make_model(base: str, out: str, seed: int = 0) -> None:
    import torch
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        LlamaForCausalLM,
    )
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    text = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    text.resize_token_embeddings(len(tokenizer))
    text_config = text.config
    text_config.tie_word_embeddings = True
    vision = Idefics3VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    image_seq_len = (IMAGE_SIZE // PATCH) ** 2 // SCALE**2
    image_token = int(tokenizer.convert_tokens_to_ids("<image>"))  # type: ignore[arg-type]
    config = Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=text_config.to_dict(),
        scale_factor=SCALE,
        image_token_id=image_token,
        tie_word_embeddings=True,
        pad_token_id=text_config.pad_token_id,
    )
    model: Any = Idefics3ForConditionalGeneration(config)  # type: ignore[no-untyped-call]
    model.model.text_model.load_state_dict(text.model.state_dict(), strict=True)
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out)
    images = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    tokenizer.chat_template = CHAT_TEMPLATE  # vLLM renders chats with the tokenizer's template
    processor = Idefics3Processor(
        image_processor=images,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)


def image_prompt_tokens(model_dir: str) -> int:
    """How many prompt tokens one image part adds to a chat, by the model's own processor
    (transformers'): the tokens the ``<image>`` its template writes expands to."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)  # type: ignore[no-untyped-call]
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    expanded = processor(text="<image>", images=[image])["input_ids"][0]
    special = processor.tokenizer("")["input_ids"]  # what the tokenizer adds to any text
    return len(expanded) - len(special)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    if sys.argv[1] == "--image-prompt-tokens":
        print(image_prompt_tokens(sys.argv[2]))
    else:
        make_model(sys.argv[1], sys.argv[2])
