"""A sparse module made by the export front-end takes what the model takes (issue 37).

Each case failed before: a batch-1 example captured a module that ran batch 1 only; keywords
the example lacked (``attention_mask``, ``labels``, ``token_type_ids``, ``position_ids``) were
refused; ``.to(bf16/fp16/fp64)`` after sparsify failed on dtypes baked into the graph. Now every
batch and sequence length runs; a call with new keywords or a new dtype captures that
signature's graphs (fxsparse.recapture), sharing parameters, masks and masker; a dim torch.export
truly fixed is refused before the graph runs, naming the input, the dim and the example's shape.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import timm
import torch
from torch import nn

import fxsparse
from tiny_transformers import VOCAB
from tiny_transformers import bert as _bert
from tiny_transformers import ids as _ids
from tiny_transformers import llama as _llama

transformers = pytest.importorskip("transformers")


def _logits(result):
    return result.logits if hasattr(result, "logits") else result["logits"]


@pytest.mark.parametrize("make", [_llama, _bert], ids=["llama", "bert"])
def test_any_batch_and_length_from_a_batch_of_one(make):
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = fxsparse.sparsify(model, 0.3, example_inputs={"input_ids": _ids(1, 16)}).eval()
    reference = sparse.unwrap()
    for batch, length in [(1, 16), (4, 16), (4, 9), (3, 1), (1, 40)]:
        ids = _ids(batch, length, seed=batch * 100 + length)
        with torch.no_grad():
            torch.testing.assert_close(_logits(sparse(input_ids=ids)), _logits(reference(input_ids=ids)))
    assert len(sparse._fxsparse.signatures) == 0  # one signature: no capture again


def test_a_fixed_dim_is_refused_naming_the_input_dim_and_example():
    sparse = fxsparse.sparsify(timm.create_model("resnet18", pretrained=False, num_classes=3), 0.5,
                               example_inputs=torch.randn(1, 3, 32, 32), capture="export")
    assert sparse(torch.randn(5, 3, 32, 32)).shape == (5, 3)  # the batch of 1 was widened: dynamic
    with pytest.raises(ValueError, match=r"'x' has shape \(2, 3, 40, 32\).*\(\*, 3, 32, 32\).*dim 2 cannot change"):
        sparse(torch.randn(2, 3, 40, 32))


def test_keywords_the_example_lacked():
    model = _llama()
    sparse = fxsparse.sparsify(model, 0.3, example_inputs={"input_ids": _ids(2, 12)})
    reference = sparse.unwrap()
    ids = _ids(4, 10, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    positions = torch.arange(10).expand(4, 10)
    calls = [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids, "labels": ids},
             {"input_ids": ids, "attention_mask": mask, "labels": ids, "position_ids": positions}, {"input_ids": ids}]
    for call in calls:
        out, expected = sparse(**call), reference(**call)
        torch.testing.assert_close(_logits(out), expected.logits)
        if "labels" in call:
            torch.testing.assert_close(out["loss"], expected.loss)
    assert len(sparse._fxsparse.signatures) == 4  # the example's and three captured on first call
    keys = set(sparse.state_dict())
    # training through a captured signature: the same parameters, masks, and topology updates
    opt = torch.optim.AdamW(sparse.parameters(), lr=1e-2)
    counts = {f: int(m.sum()) for f, m in sparse.masks.items()}
    sparse(input_ids=ids, labels=ids)["loss"].backward()
    assert all(sparse.get_parameter(f).grad is not None for f in sparse.masks)
    changes = sparse.rigl_step(0.3, optimizer=opt)
    assert sum(c.grown for c in changes.values()) > 0
    assert {f: int(m.sum()) for f, m in sparse.masks.items()} == counts
    sparse.verify()
    after = sparse.unwrap()
    for call in calls:  # every signature reads the new topology
        torch.testing.assert_close(_logits(sparse(**call)), after(**call).logits)
    assert set(sparse.state_dict()) == keys  # adopted constants are not state


def test_encoder_keywords_and_eval_mode():
    sparse = fxsparse.sparsify(_bert(), 0.3, example_inputs={"input_ids": _ids(2, 8)})
    reference = sparse.unwrap().eval()
    sparse.eval()
    ids = _ids(3, 8, seed=2)
    call = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 2, 1])}
    with torch.no_grad():
        out, expected = sparse(**call), reference(**call)
    torch.testing.assert_close(_logits(out), expected.logits)
    torch.testing.assert_close(out["loss"], expected.loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_after_sparsify(dtype):
    ids = _ids(2, 12)
    sparse = fxsparse.sparsify(_llama(), 0.3, example_inputs={"input_ids": ids, "labels": ids})
    counts = {f: int(m.sum()) for f, m in sparse.masks.items()}
    sparse = sparse.to(dtype)
    reference = sparse.unwrap()
    out = sparse(input_ids=ids, labels=ids)
    assert out["logits"].dtype == dtype
    assert torch.equal(out["logits"], reference(input_ids=ids, labels=ids).logits)  # the model's own computation in dtype
    out["loss"].backward()
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    sparse.rigl_step(0.2, optimizer=opt)
    assert {f: int(m.sum()) for f, m in sparse.masks.items()} == counts and sparse.masks[next(iter(counts))].dtype == torch.bool
    sparse.verify()
    sparse.eval()
    with torch.no_grad():
        assert sparse(input_ids=ids)["logits"].dtype == dtype
    back = sparse.float() if dtype != torch.float16 else sparse.half()  # the method forms, and back again
    assert back(input_ids=ids, labels=ids)["logits"].dtype == (torch.float32 if dtype != torch.float16 else dtype)


def test_symbolic_front_end_follows_dtype():
    sparse = fxsparse.sparsify(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                                 depth=2, num_classes=3), 0.3).to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    sparse(x).float().sum().backward()
    assert sparse(x).dtype == torch.bfloat16
    sparse.verify()


def test_signatures_survive_copies_and_pickles():
    ids = _ids(2, 8)
    sparse = fxsparse.sparsify(_llama(), 0.3, example_inputs={"input_ids": ids})
    expected = _logits(sparse(input_ids=ids, attention_mask=torch.ones_like(ids)))
    copied = copy.deepcopy(sparse)
    torch.testing.assert_close(_logits(copied(input_ids=ids, attention_mask=torch.ones_like(ids))), expected)
    buffer = io.BytesIO()
    torch.save(sparse, buffer)  # the current signature's graphs; the others are captured again when called
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    torch.testing.assert_close(_logits(loaded(input_ids=ids)), _logits(sparse(input_ids=ids)))
    torch.testing.assert_close(_logits(loaded(input_ids=ids, attention_mask=torch.ones_like(ids))), expected)


def test_compact_layers_refuse_a_new_signature_before_any_change():
    ids = _ids(2, 8)
    sparse = fxsparse.sparsify(_llama(), 0.2, example_inputs={"input_ids": ids}, layout={"*": "compact"})
    with pytest.raises(ValueError, match="layers in the compact layout .* cannot be captured again"):
        sparse(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert sparse(input_ids=ids)["logits"].shape == (2, 8, VOCAB)


def test_checkpointing_follows_a_new_signature():
    ids = _ids(2, 8)
    sparse = fxsparse.sparsify(_llama(), 0.3, example_inputs={"input_ids": ids})
    sparse.gradient_checkpointing_enable(every_n_layers=2)
    plain = copy.deepcopy(sparse)
    plain.gradient_checkpointing_disable()
    for module in (sparse, plain):
        module(input_ids=ids, labels=ids)["loss"].backward()
    assert fxsparse.checkpointing.checkpointed_blocks(sparse) == ["model.layers.0"]
    assert any("run_checkpointed" in str(n.target) for n in sparse.graph.nodes)
    for a, b in zip(sparse.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_trainer_keeps_the_columns_the_model_takes(tmp_path):
    """Trainer drops the dataset columns ``forward`` does not name: the module advertises the
    model's signature, so ``labels`` reach it though the example had none."""
    import inspect

    ids = _ids(8, 8)
    sparse = fxsparse.sparsify(_llama(), 0.3, example_inputs={"input_ids": ids[:2]})
    assert {"input_ids", "attention_mask", "labels"} <= set(inspect.signature(sparse.forward).parameters)
    data = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]
    args = transformers.TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to="none",
                                          use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1)
    trainer = transformers.Trainer(model=sparse, args=args, train_dataset=data)
    trainer.train()
    assert len([r for r in trainer.state.log_history if "loss" in r]) == 3


class _Loop(nn.Module):
    """A Python loop over the sequence: torch.export unrolls it, pinning that dim to the example's."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin = nn.Embedding(10, 4), nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return torch.stack([self.lin(h[:, t]) for t in range(ids.shape[1])], 1)


def test_a_dim_the_models_code_pins_is_refused_clearly():
    sparse = fxsparse.sparsify(_Loop(), 0.5, example_inputs=torch.randint(0, 10, (2, 5)), capture="export")
    assert sparse(torch.randint(0, 10, (3, 5))).shape == (3, 5, 4)  # the batch stays dynamic
    with pytest.raises(ValueError, match=r"example of shape \(\*, 5\).*dim 1 cannot change"):
        sparse(torch.randint(0, 10, (3, 7)))
