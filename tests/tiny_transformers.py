"""Tiny transformers models built from configs (random weights), for the tests of what goes in
and out of an exported sparse module."""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 61


def llama(**overrides: Any) -> torch.nn.Module:
    import transformers

    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, **overrides)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def bert() -> torch.nn.Module:
    import transformers

    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def ids(batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
