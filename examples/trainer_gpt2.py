"""RigL inside Hugging Face ``transformers.Trainer``: a small GPT-2, character-level Shakespeare.

    python examples/trainer_gpt2.py                      # 400 optimizer steps, ~2 min on 2 CPU cores
    python examples/trainer_gpt2.py --resume             # continue from the last checkpoint in --out

The model is built from a config (random weights), sparsified through torch.export from one
example batch, and handed to ``Trainer`` as usual; ``SparseTrainingCallback`` runs the topology
updates (docs/trainer.md). Gradient accumulation, bf16 (``--bf16``), ``--compile`` and resuming
are ``Trainer``'s own options.
"""

from __future__ import annotations

import argparse

import torch
import transformers

import fxsparse
from fxsparse.data import load_shakespeare
from fxsparse.integrations.transformers import SparseTrainingCallback


class Characters(torch.utils.data.Dataset):
    """Windows of ``length + 1`` characters of ``text``, as token ids (inputs = labels: the model shifts)."""

    def __init__(self, text: str, vocabulary: str, length: int = 64, count: int = 4096, seed: int = 0) -> None:
        ids = torch.tensor([vocabulary.index(c) for c in text], dtype=torch.long)
        starts = torch.randint(0, len(ids) - length, (count,), generator=torch.Generator().manual_seed(seed))
        self.windows = torch.stack([ids[s:s + length] for s in starts.tolist()])

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.windows[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def main(argv: list[str] | None = None) -> transformers.Trainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--out", default="runs/trainer_gpt2")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)

    text = load_shakespeare()[:500_000]
    vocabulary = "".join(sorted(set(text)))
    data = Characters(text, vocabulary)
    config = transformers.GPT2Config(vocab_size=len(vocabulary), n_positions=64, n_embd=96, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0, use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    sparse = fxsparse.sparsify(model, args.density, "erk", example_inputs=torch.utils.data.default_collate([data[0], data[1]]))
    training = transformers.TrainingArguments(
        args.out, max_steps=args.steps, per_device_train_batch_size=16, gradient_accumulation_steps=2,
        learning_rate=3e-3, warmup_steps=args.steps // 20, lr_scheduler_type="cosine", logging_steps=max(args.steps // 8, 1),
        save_steps=max(args.steps // 2, 1), report_to="none", use_cpu=not torch.cuda.is_available(),
        bf16=args.bf16, torch_compile=args.compile, disable_tqdm=True, seed=0,
    )
    callback = SparseTrainingCallback(delta_t=max(args.steps // 20, 1), alpha=0.3, end_fraction=0.75)
    trainer = transformers.Trainer(model=sparse, args=training, train_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    for record in trainer.state.log_history:
        if "fxsparse/density" in record:
            print(f"step {record['step']}: loss {record['loss']:.3f}  density {record['fxsparse/density']:.4f}  "
                  f"updates {int(record['fxsparse/updates'])}  last churn {record.get('fxsparse/churn', 0.0):.4f}")
    print(sparse.summary())
    return trainer


if __name__ == "__main__":
    main()
