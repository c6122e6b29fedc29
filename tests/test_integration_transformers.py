"""fxsparse.integrations.transformers: sparse training inside ``transformers.Trainer``.

A tiny Llama built from a config trains under ``Trainer`` with gradient accumulation 2 for 200
optimizer steps; a run stopped at step 100 and resumed from its checkpoint ends with the
uninterrupted run's masks, weights and update history. Update iterations do not step the
optimizer; steps are counted as ``Trainer`` counts them; bf16 and ``torch.compile`` as
``Trainer`` applies them train with exact budgets.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import fxsparse

transformers = pytest.importorskip("transformers")
from fxsparse.integrations.transformers import STATE_FILE, SparseTrainingCallback  # noqa: E402

VOCAB = 61


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 48, length: int = 12) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.fixture(scope="module")
def sparse_llama() -> fxsparse.SparseGraphModule:
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, use_cache=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    batch = torch.utils.data.default_collate([Tokens()[i] for i in range(4)])
    return fxsparse.sparsify(model, 0.2, example_inputs=batch)


class StopAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _args(out, **overrides) -> transformers.TrainingArguments:
    settings = dict(max_steps=200, per_device_train_batch_size=4, gradient_accumulation_steps=2, save_steps=100,
                    logging_steps=50, report_to="none", use_cpu=True, learning_rate=3e-3, seed=0,
                    disable_tqdm=True, save_only_model=False)
    return transformers.TrainingArguments(str(out), **{**settings, **overrides})


def _train(model, out, callback, *, resume=None, extra=(), **overrides):
    trainer = transformers.Trainer(model=model, args=_args(out, **overrides), train_dataset=Tokens(),
                                   callbacks=[callback, *extra])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resumed_run_ends_with_the_uninterrupted_runs_masks(sparse_llama, tmp_path):
    initial = {fqn: m.clone() for fqn, m in sparse_llama.masks.items()}
    whole, whole_cb = copy.deepcopy(sparse_llama), SparseTrainingCallback(delta_t=20)
    trainer = _train(whole, tmp_path / "whole", whole_cb)
    scheduler = whole_cb.scheduler
    # steps are Trainer's optimizer steps: 200 of them, updates every 20 until 0.75 * 200
    assert scheduler.total_steps == 200 and scheduler.step_count == 200
    assert [r["step"] for r in scheduler.history] == [20, 40, 60, 80, 100, 120, 140]
    assert any(not torch.equal(whole.masks[f], initial[f]) for f in initial), "RigL changed no mask"
    for fqn, mask in whole.masks.items():  # exact budgets after every update
        assert int(mask.sum()) == int(initial[fqn].sum())
    # update iterations did not step the optimizer: Adam counted 200 - 7 steps
    state = trainer.optimizer.optimizer.state[whole.get_parameter(next(iter(whole.masks)))]
    assert int(state["step"]) == 200 - 7
    logged = [r for r in trainer.state.log_history if "fxsparse/density" in r]
    assert len(logged) == 4 and logged[-1]["fxsparse/updates"] == 7.0
    assert logged[-1]["fxsparse/density"] == pytest.approx(whole.density)

    part, part_cb = copy.deepcopy(sparse_llama), SparseTrainingCallback(delta_t=20)
    _train(part, tmp_path / "part", part_cb, extra=[StopAt(100)])
    assert part_cb.scheduler.step_count == 100
    assert os.path.isfile(tmp_path / "part" / "checkpoint-100" / STATE_FILE)
    resumed, resumed_cb = copy.deepcopy(sparse_llama), SparseTrainingCallback(delta_t=20)
    _train(resumed, tmp_path / "part", resumed_cb, resume=True)
    assert resumed_cb.scheduler.history == scheduler.history
    for fqn in whole.masks:
        assert torch.equal(resumed.masks[fqn], whole.masks[fqn]), fqn
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)

    os.remove(tmp_path / "part" / "checkpoint-100" / STATE_FILE)
    with pytest.raises(FileNotFoundError, match="resume_from"):
        _train(copy.deepcopy(sparse_llama), tmp_path / "part", SparseTrainingCallback(delta_t=20),
               resume=str(tmp_path / "part" / "checkpoint-100"))


def test_steps_are_counted_as_trainer_counts_them_over_epochs(sparse_llama, tmp_path):
    # 48 samples, batch 4, accumulation 2: 6 optimizer steps an epoch, 3 epochs
    callback = SparseTrainingCallback(delta_t=4, end_fraction=0.5)
    _train(copy.deepcopy(sparse_llama), tmp_path, callback, max_steps=-1, num_train_epochs=3, save_strategy="no")
    assert callback.scheduler.total_steps == 18 and callback.scheduler.t_end == 9
    assert [r["step"] for r in callback.scheduler.history] == [4, 8]


@pytest.mark.parametrize("setting", ["bf16", "torch_compile"])
def test_bf16_and_compile_as_trainer_applies_them(sparse_llama, tmp_path, setting):
    sparse = copy.deepcopy(sparse_llama)
    counts = {fqn: int(m.sum()) for fqn, m in sparse.masks.items()}
    callback = SparseTrainingCallback(delta_t=2)
    _train(sparse, tmp_path, callback, max_steps=6, save_strategy="no", **{setting: True})
    assert [r["step"] for r in callback.scheduler.history] == [2, 4]
    assert {fqn: int(m.sum()) for fqn, m in sparse.masks.items()} == counts
    for fqn, weight in sparse.sparse_weights.items():  # inactive weights stayed exactly zero
        assert weight.dtype == torch.float32 and not weight[~sparse.masks[fqn]].any(), fqn


def test_a_model_that_is_not_sparse_is_refused(tmp_path):
    model = torch.nn.Linear(4, 4)
    with pytest.raises(TypeError, match="fxsparse.sparsify"):
        SparseTrainingCallback().on_train_begin(
            _args(tmp_path), transformers.TrainerState(max_steps=10), transformers.TrainerControl(), model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="unexpected scheduler option"):
        SparseTrainingCallback(delta=3)


def test_tensorboard_gets_the_stats_and_the_masks(sparse_llama, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sparse = copy.deepcopy(sparse_llama)
    callback = SparseTrainingCallback(delta_t=2)
    trainer = transformers.Trainer(model=sparse, args=_args(tmp_path, max_steps=4, logging_steps=2, save_strategy="no",
                                                            report_to=["tensorboard"]),
                                   train_dataset=Tokens(), callbacks=[callback])
    trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(SparseTrainingCallback))  # as docs/trainer.md says
    trainer.train()
    images, scalars = set(), set()
    for events in (tmp_path / "runs").rglob("events.out.tfevents.*"):  # Trainer's and fxsparse's
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        accumulator.Reload()
        images |= set(accumulator.Tags()["images"])
        scalars |= set(accumulator.Tags()["scalars"])
    assert {f"fxsparse/mask/{fqn}" for fqn in sparse.masks} <= images
    assert {f"fxsparse/density/{fqn}" for fqn in sparse.masks} <= scalars
    assert {"train/fxsparse/churn", "train/fxsparse/density", "train/loss"} <= scalars  # through Trainer's own logger
