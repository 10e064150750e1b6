"""Make a small cross-encoder (a BERT sequence classifier) for the score, rerank and classify
routes: random weights, saved with ``save_pretrained``, and the tokenizer of all-MiniLM-L6-v2.

``python -m tests.cross_encoder TOKENIZER_DIR OUT_DIR LABELS``: one label makes a scorer
(``/score``, ``/rerank``), two or more a classifier (``/classify``). Run in a process of its own:
it loads transformers outside the test process.
"""

from __future__ import annotations

import sys
import warnings


def make_model(tokenizer_dir: str, out: str, labels: int, seed: int = 0) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # num_labels goes through the config's **kwargs, which transformers' dataclass-style
    # signature does not show; the model classes' __init__ are unannotated
    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        num_labels=labels,
        id2label={i: f"label_{i}" for i in range(labels)},
        label2id={f"label_{i}": i for i in range(labels)},
    )
    BertForSequenceClassification(config).save_pretrained(out)  # type: ignore[no-untyped-call]
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    make_model(sys.argv[1], sys.argv[2], int(sys.argv[3]))
