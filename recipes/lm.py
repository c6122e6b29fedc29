"""The language-model recipes of recipes/train.py: a GPT-2-style transformer from ``transformers``.

``gpt2char-shakespeare`` (the offline one): character level on Shakespeare's plays
(:func:`fxsparse.data.load_shakespeare`; 90% / 5% / 5% train / validation / test by position,
the vocabulary every character of the text). ``gpt2word-wikitext103``: word level on WikiText-103
from a user's directory (:func:`fxsparse.data.load_wikitext103`, the released splits, the
vocabulary of its training split). The model is ``GPT2LMHeadModel`` built from a config (random
weights) and sparsified through the torch.export front-end; its loss is ``model(**batch).loss``
(next-token cross-entropy). A training step draws ``batch_size`` windows of ``context + 1``
tokens at random offsets; evaluation covers a whole split in non-overlapping windows and reports
bits per token (``nats / ln 2``: bits per character for the character model) and perplexity.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fxsparse import data as fxdata

__all__ = ["LM_DATASETS", "load", "build", "sample", "evaluate", "example"]

LM_DATASETS = ("shakespeare", "wikitext103")


def load(dataset: str, data_root: str | None) -> dict[str, Any]:
    """``{"train", "val", "test"}`` as 1-D int64 token tensors, and ``"vocab"`` (a list)."""
    if dataset == "shakespeare":
        text = fxdata.load_shakespeare(data_root)
        vocab = sorted(set(text))
        lookup = {c: i for i, c in enumerate(vocab)}
        tokens = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
        n = len(tokens)
        a, b = int(0.9 * n), int(0.95 * n)
        return {"train": tokens[:a], "val": tokens[a:b], "test": tokens[b:], "vocab": vocab}
    if dataset == "wikitext103":
        if data_root is None:
            raise SystemExit("error: --data-root is required for wikitext103: the folder with wiki.*.tokens")
        splits = {k: v.replace("\n", " <eos> ").split() for k, v in fxdata.load_wikitext103(data_root).items()}
        vocab = sorted(set(splits["train"]))
        lookup = {w: i for i, w in enumerate(vocab)}
        unknown = lookup.get("<unk>", 0)
        out: dict[str, Any] = {k: torch.tensor([lookup.get(w, unknown) for w in words], dtype=torch.int64)
                               for k, words in splits.items()}
        out["vocab"] = vocab
        return out
    raise ValueError(f"expected a language-model dataset {LM_DATASETS}, got {dataset!r}")


def build(cfg: Any, vocab_size: int) -> nn.Module:
    """A GPT-2-style causal LM (``transformers.GPT2LMHeadModel``) from the recipe's sizes."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise SystemExit("error: the language-model recipes need transformers: pip install fxsparse[transformers]") from e
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.context, n_embd=cfg.lm_width, n_layer=cfg.lm_layers,
        n_head=cfg.lm_heads, activation_function="gelu", use_cache=False, bos_token_id=0, eos_token_id=0,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def sample(tokens: torch.Tensor, batch: int, context: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` windows of ``context`` tokens at random offsets (labels are the inputs: the
    model shifts them by one)."""
    starts = torch.randint(0, len(tokens) - context, (batch,), generator=generator)
    return torch.stack([tokens[s : s + context] for s in starts.tolist()])


def example(cfg: Any, device: torch.device | str = "cpu", batch: int = 2) -> dict[str, torch.Tensor]:
    """Keyword inputs of the training shape (capture and FLOP accounting)."""
    x = torch.zeros(batch, cfg.context, dtype=torch.int64, device=device)
    return {"input_ids": x, "labels": x}


@torch.no_grad()
def evaluate(model: nn.Module, tokens: torch.Tensor, context: int, device: torch.device, batch: int = 64) -> dict[str, float]:
    """Mean next-token loss over ``tokens`` in non-overlapping windows, as bits per token,
    perplexity and next-token accuracy (eval mode)."""
    model.eval()
    windows = tokens[: (len(tokens) // context) * context].view(-1, context)
    nats, correct, count = 0.0, 0, 0
    for chunk in windows.split(batch):
        x = chunk.to(device)
        out = model(input_ids=x, labels=x)
        predicted = x.numel() - x.shape[0]  # the first token of a window has no prediction
        nats += float(out.loss) * predicted
        correct += int((out.logits[:, :-1].argmax(-1) == x[:, 1:]).sum())
        count += predicted
    model.train()
    loss = nats / max(1, count)
    return {"bits": loss / math.log(2), "perplexity": math.exp(loss), "accuracy": correct / max(1, count)}
