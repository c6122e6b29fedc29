"""After training, every round trip of docs/after_training.md in one run: a small Llama on
character-level Shakespeare, trained sparse by ``Trainer`` with activation checkpointing, saved
with ``save_pretrained``, loaded back by ``from_pretrained`` as ``LlamaForCausalLM``, sampled with
``generate`` (KV cache), then sparsified again from its masks file to train on.

    python examples/after_training.py                 # 200 optimizer steps, 27 s on 2 cores (loss 2.15)
    python examples/after_training.py --steps 20      # the smoke run of the tests

Prints what each step checks, and fails loudly if a round trip does not hold.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

import fxsparse
from fxsparse.data import load_shakespeare
from fxsparse.integrations.transformers import SparseTrainingCallback


class Characters(torch.utils.data.Dataset):
    """Windows of ``length`` characters as token ids (labels = inputs: the model shifts them)."""

    def __init__(self, ids: torch.Tensor, length: int = 64, count: int = 2048) -> None:
        starts = torch.randint(0, len(ids) - length, (count,), generator=torch.Generator().manual_seed(0))
        self.windows = torch.stack([ids[s:s + length] for s in starts.tolist()])

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=None, help="where to save (default: a temporary directory)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="fxsparse-after-"))

    text = load_shakespeare()[:200_000]
    vocabulary = sorted(set(text))
    ids = torch.tensor([vocabulary.index(c) for c in text])
    data = Characters(ids)
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=len(vocabulary), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    example = torch.utils.data.default_collate([data[i] for i in range(8)])
    sparse = fxsparse.sparsify(model, 0.2, example_inputs=example)

    training = transformers.TrainingArguments(
        str(out / "run"), max_steps=args.steps, per_device_train_batch_size=16, learning_rate=3e-3,
        logging_steps=max(1, args.steps // 4), save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        gradient_checkpointing=True)
    trainer = transformers.Trainer(model=sparse, args=training, train_dataset=data,
                                   callbacks=[SparseTrainingCallback(delta_t=max(1, args.steps // 10))])
    trainer.train()
    print(f"trained {args.steps} steps with checkpointed blocks {fxsparse.checkpointing.checkpointed_blocks(sparse)}: "
          f"loss {trainer.state.log_history[-2]['loss']:.3f}, density {sparse.density:.3f}")

    sparse.eval()
    sparse.save_pretrained(out / "model")
    print(f"saved {sorted(p.name for p in (out / 'model').iterdir())} in {out / 'model'}")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    prompt = ids[:32][None]
    with torch.no_grad():
        same = torch.allclose(loaded(input_ids=prompt).logits, sparse(**{"input_ids": prompt, "labels": prompt})["logits"],
                              atol=1e-5)
    assert same, "the loaded model does not compute what the sparse module computes"
    print(f"from_pretrained gave {type(loaded).__name__}, with the sparse module's logits")

    tokens = loaded.generate(prompt, max_new_tokens=64, do_sample=False, use_cache=True, pad_token_id=0)
    print("generated:", repr("".join(vocabulary[i] for i in tokens[0, 32:].tolist())))

    masks = fxsparse.load_masks(out / "model")
    again = fxsparse.sparsify(loaded, None, init=masks, example_inputs=example)
    assert all(torch.equal(again.masks[f], m) for f, m in masks.items())
    opt = torch.optim.AdamW(again.parameters(), lr=1e-3)
    again(**example)["loss"].backward()
    opt.step()
    again.verify()
    print(f"sparsified again from {fxsparse.serialization.MASKS_FILE}: same masks, density {again.density:.3f}, "
          f"training goes on")


if __name__ == "__main__":
    main()
