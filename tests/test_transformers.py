"""Hugging Face ``transformers`` models through the torch.export front-end (fxsparse[transformers]).

A CI sample of eight architectures, each built from a tiny config with random weights (never
downloaded), passes fxsparse.checks.check_model; and a training loop written with transformers'
own conventions (``model(**batch).loss``, AdamW, gradient accumulation, bf16 autocast) trains
under RigLScheduler with every invariant kept. The full sweep over every model type is
benchmarks/transformers_coverage.py (docs/transformers_coverage.md).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fxsparse
from fxsparse.checks import check_model

transformers = pytest.importorskip("transformers")

VOCAB = 97


def _text(batch: int = 2, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _image(batch: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen), "labels": torch.tensor([0, 2])[:batch]}


def _classify(batch: int = 2) -> dict[str, torch.Tensor]:
    inputs = _text(batch)
    inputs["labels"] = torch.tensor([0, 1])[:batch]
    return inputs


_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# model type -> (auto class, config overrides, inputs)
SAMPLE = {
    "bert": ("AutoModelForMaskedLM", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=2, intermediate_size=64, max_position_embeddings=64), _text),
    "gpt2": ("AutoModelForCausalLM", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
             bos_token_id=0, eos_token_id=0), _text),
    "t5": ("AutoModelForSeq2SeqLM", dict(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2,
           num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), _text),
    "llama": ("AutoModelForCausalLM", dict(_DECODER), _text),
    "distilbert": ("AutoModelForSequenceClassification", dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2,
                   hidden_dim=64, max_position_embeddings=64, num_labels=2), _classify),
    "vit": ("AutoModelForImageClassification", dict(image_size=16, patch_size=4, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3), _image),
    "opt": ("AutoModelForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32), _text),
    "mixtral": ("AutoModelForCausalLM", dict(_DECODER, num_local_experts=4, num_experts_per_tok=2), _text),
}


def build(model_type: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    auto, overrides, inputs = SAMPLE[model_type]
    config = transformers.AutoConfig.for_model(model_type, use_cache=False, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, auto).from_config(config)
    return model, inputs()


@pytest.mark.parametrize("model_type", sorted(SAMPLE))
def test_sample_architecture_passes_every_check(model_type):
    model, inputs = build(model_type)
    report = check_model(model, inputs, density=0.2)
    assert report.ok, report.failure
    assert report.capture == "export"  # symbolic tracing cannot follow these models
    assert report.coverage is not None and report.coverage > 0.5, (report.coverage, report.skipped)


def test_names_are_the_models_own_and_the_tied_head_stays_dense_by_default():
    model, inputs = build("gpt2")
    sparse = fxsparse.sparsify(model, 0.2, example_inputs=inputs)
    names = dict(model.named_parameters())
    assert set(sparse.masks) <= set(names)
    assert "transformer.h.0.attn.c_attn.weight" in sparse.masks  # GPT-2's Conv1D: an addmm
    assert "transformer.wte.weight" in dict(sparse.skipped)  # tied to lm_head: an embedding
    assert set(sparse.state_dict()) >= set(model.state_dict())
    tied = fxsparse.sparsify(model, 0.2, example_inputs=inputs, embeddings=True)
    assert "transformer.wte.weight" in tied.masks and "lm_head.weight" not in tied.masks


def test_transformers_training_conventions_under_the_rigl_scheduler():
    """model(**batch).loss, AdamW, 2 micro-batches per step, bf16 autocast: it learns, the
    topology changes at the updates, and every invariant holds throughout."""
    model, _ = build("llama")
    batches = [_text(batch=4, length=16, seed=s) for s in range(4)]  # a few batches, seen repeatedly
    sparse = fxsparse.sparsify(model, 0.3, example_inputs=batches[0])
    sparse.train()
    optimizer = torch.optim.AdamW(sparse.parameters(), lr=3e-3, weight_decay=0.01)
    steps, accumulation = 24, 2
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, total_steps=steps, delta_t=4, alpha=0.3, end_fraction=0.75)
    counts = {fqn: int(m.sum()) for fqn, m in sparse.masks.items()}
    start_masks = {fqn: m.clone() for fqn, m in sparse.masks.items()}
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(accumulation):
            batch = batches[(step * accumulation + micro) % len(batches)]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = sparse(**batch).loss / accumulation
            loss.backward()
            total += float(loss.detach())
        for fqn, mask in sparse.masks.items():
            grad = sparse.get_parameter(fqn).grad
            assert grad is None or bool(grad[~mask].eq(0).all()), f"{fqn}: inactive weights have gradient"
        if scheduler.step():
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        for fqn, mask in sparse.masks.items():
            assert mask.dtype == torch.bool and int(mask.sum()) == counts[fqn], fqn
            weight = sparse.get_parameter(fqn)
            assert weight.dtype == torch.float32
        sparse.verify()
    assert any(not torch.equal(start_masks[f], sparse.masks[f]) for f in counts), "no topology update changed a mask"
    assert math.isfinite(losses[-1]) and sum(losses[-4:]) < sum(losses[:4]), losses
    # evaluation in eval mode is deterministic and matches a deepcopy
    sparse.eval()
    with torch.no_grad():
        a = sparse(**batches[0]).loss
        b = copy.deepcopy(sparse)(**batches[0]).loss
    torch.testing.assert_close(a, b)


def test_device_constants_of_both_captured_graphs_follow_the_module():
    """An exported graph names its device (arange(..., device=cpu)); .to() moves them along."""
    model, inputs = build("gpt2")
    sparse = fxsparse.sparsify(model, 0.2, example_inputs=inputs)

    def devices() -> set[str]:
        found = set()
        for graph in sparse._fxsparse.mode_graphs.values():
            for node in graph.nodes:
                found |= {str(v) for v in [*node.args, *node.kwargs.values()] if isinstance(v, torch.device)}
        return found

    assert devices() == {"cpu"}
    sparse.to("meta")
    assert devices() == {"meta"} and next(sparse.parameters()).device.type == "meta"
    assert "device(type='meta')" in sparse.code or "meta" in sparse.code


def test_mixture_of_experts_weights_are_sparsified_through_the_grouped_product():
    """transformers 5 runs the experts through a custom op (grouped_mm_fallback) on 3-D weights:
    found by the op's schema, masked and trained like any product weight."""
    model, inputs = build("mixtral")
    experts = {name for name, _ in model.named_parameters() if ".experts." in name}
    assert experts
    sparse = fxsparse.sparsify(model, 0.2, example_inputs=inputs)
    assert experts <= set(sparse.masks), sorted(experts - set(sparse.masks))
    sparse(**inputs).loss.backward()
    for fqn in experts:
        mask, grad = sparse.masks[fqn], sparse.get_parameter(fqn).grad
        assert grad is not None and bool(grad[~mask].eq(0).all()) and bool(grad[mask].ne(0).any()), fqn
    sparse.rigl_step(0.3)
    sparse.verify()


def test_a_key_value_cache_in_the_outputs_is_refused_with_the_remedy():
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)  # use_cache on
    model = transformers.GPT2LMHeadModel(config)
    inputs = {"input_ids": torch.randint(0, 100, (2, 8))}
    with pytest.raises(TypeError, match=r"key/value cache in the outputs .* model.config.use_cache = False"):
        fxsparse.sparsify(model, 0.5, example_inputs=inputs)
    model.config.use_cache = False  # the remedy the message gives
    assert check_model(model, inputs).ok
