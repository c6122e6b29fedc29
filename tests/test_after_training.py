"""After training: the sparse module goes back out as the user's model (docs/after_training.md).

``unwrap()`` gives the class ``sparsify`` was given, computing what the sparse module computes
in eval mode (timm CNNs and ViTs, torchvision, transformers decoders and encoders, both front-ends,
both layouts); ``save_pretrained`` writes a directory ``from_pretrained`` loads as that class with
its zeros, plus a masks file that ``sparsify(model, None, init=masks)`` continues from; ``generate``
with its KV cache gives the tokens of greedy decoding on the sparse module's logits; timm's own
checkpoint loading reads the unwrapped weights.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import fxsparse
from tiny_transformers import VOCAB
from tiny_transformers import bert as _bert
from tiny_transformers import ids as _ids
from tiny_transformers import llama as _llama
from fxsparse.unwrap import MASKS_ATTRIBUTE

transformers = pytest.importorskip("transformers")



def _out(result):
    return result.logits if hasattr(result, "logits") else result["logits"] if isinstance(result, dict) else result


def _train(sparse: fxsparse.SparseGraphModule, batch, steps: int = 4, update_at: int = 1) -> None:
    """A few AdamW steps with one RigL update, so that weights, masks and BN statistics all move."""
    opt = torch.optim.AdamW(sparse.parameters(), lr=1e-2)
    sparse.train()
    for step in range(steps):
        out = _out(sparse(**batch) if isinstance(batch, dict) else sparse(batch))
        out.float().pow(2).mean().backward()
        if step == update_at:
            sparse.rigl_step(0.3, optimizer=opt)
        else:
            opt.step()
        opt.zero_grad()
        sparse.arm_growth()


CASES = {
    "timm-resnet": (lambda: timm.create_model("resnet18", pretrained=False, num_classes=5), lambda: torch.randn(2, 3, 32, 32)),
    "timm-vit": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32,
                                           patch_size=8, depth=2), lambda: torch.randn(2, 3, 32, 32)),
    "torchvision-mobilenet": (lambda: torchvision.models.mobilenet_v3_small(num_classes=5), lambda: torch.randn(2, 3, 32, 32)),
    "llama": (_llama, lambda: {"input_ids": _ids()}),
    "bert": (_bert, lambda: {"input_ids": _ids(), "attention_mask": torch.ones(2, 10, dtype=torch.long)}),
}


@pytest.mark.parametrize("layout", ["masked", "compact"])
@pytest.mark.parametrize("capture", ["symbolic", "export"])
@pytest.mark.parametrize("case", list(CASES))
def test_unwrapped_model_computes_what_the_sparse_module_computes(case, capture, layout):
    make, inputs = CASES[case]
    if capture == "symbolic" and case in ("llama", "bert"):
        pytest.skip("transformers' models are captured by torch.export only")
    model, batch = make(), inputs()
    sparse = fxsparse.sparsify(model, 0.3, example_inputs=batch, capture=capture,
                               layout={"*": "compact"} if layout == "compact" else "masked")
    if layout == "compact" and case != "timm-resnet":  # resnet18's ERK budget leaves no layer compact-able
        assert any(sparse.compact_layer(f) is not None for f in sparse.masks), "no layer went compact"
    _train(sparse, batch)
    sparse.eval()
    unwrapped = sparse.unwrap()
    assert type(unwrapped) is type(model) and not unwrapped.training
    with torch.no_grad():
        expected = _out(sparse(**batch) if isinstance(batch, dict) else sparse(batch))
        got = _out(unwrapped(**batch) if isinstance(batch, dict) else unwrapped(batch))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the trained weights with exact zeros at inactive entries, the masks beside them
    params = dict(unwrapped.named_parameters(remove_duplicate=False))
    for fqn, mask in sparse.masks.items():
        assert torch.equal(getattr(unwrapped, MASKS_ATTRIBUTE)[fqn], mask)
        assert not params[fqn][~mask].any()
    # its own copy: training the sparse module further leaves it as it was
    before = {k: v.clone() for k, v in unwrapped.state_dict().items()}
    _train(sparse, batch, steps=1)
    assert all(torch.equal(before[k], v) for k, v in unwrapped.state_dict().items())
    # the skeleton kept no weights: the model's class and config, not a second copy
    assert all(t.is_meta for t in sparse._fxsparse.skeleton.parameters())


def test_unwrap_keeps_ties_buffers_and_attributes():
    model = _llama(tie_word_embeddings=True)
    sparse = fxsparse.sparsify(model, 0.3, example_inputs={"input_ids": _ids()}, embeddings=True)
    _train(sparse, {"input_ids": _ids()})
    shared = sparse.unwrap(share=True)
    assert shared.lm_head.weight is shared.model.embed_tokens.weight  # the tie, kept
    assert shared.lm_head.weight is sparse.get_parameter("lm_head.weight")  # share=True: no copy
    assert shared.config.to_dict() == model.config.to_dict()
    own = sparse.unwrap()
    assert own.lm_head.weight is own.model.embed_tokens.weight
    assert own.lm_head.weight is not sparse.get_parameter("lm_head.weight")
    torch.testing.assert_close(own.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def test_unwrap_follows_dtype():
    sparse = fxsparse.sparsify(timm.create_model("resnet18", pretrained=False, num_classes=5), 0.3)
    sparse = sparse.to(torch.float64).eval()
    unwrapped = sparse.unwrap()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert next(unwrapped.parameters()).dtype == torch.float64
    torch.testing.assert_close(unwrapped(x), sparse(x))


def test_save_pretrained_round_trip_and_continued_training(tmp_path):
    batch = {"input_ids": _ids()}
    sparse = fxsparse.sparsify(_llama(), 0.25, example_inputs=batch)
    _train(sparse, batch, update_at=3)  # saved right after an update: the grown weights are still 0
    sparse.eval()
    sparse.save_pretrained(tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", fxsparse.serialization.MASKS_FILE} <= files
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, _out(sparse(**batch)))
    masks, meta = fxsparse.load_masks(tmp_path / "out", with_metadata=True)
    assert meta["init"] == "erk" and abs(meta["density"] - sparse.density) < 1e-12 and meta["updates"] == 1
    assert masks.keys() == sparse.masks.keys()
    # a grown weight can be exactly zero: the masks file, not the zeros, is the topology
    zeros = {f: w.detach() != 0 for f, w in loaded.named_parameters() if f in masks}
    assert any(not torch.equal(zeros[f], masks[f]) for f in masks)
    again = fxsparse.sparsify(loaded, None, init=masks, example_inputs=batch)
    assert all(torch.equal(again.masks[f], m) for f, m in masks.items())
    with torch.no_grad():
        torch.testing.assert_close(_out(again.eval()(**batch)), _out(sparse(**batch)))
    counts = {f: int(m.sum()) for f, m in again.masks.items()}
    _train(again, batch)
    assert {f: int(m.sum()) for f, m in again.masks.items()} == counts
    again.verify()


def test_masks_init_errors_name_the_fix():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sparse = fxsparse.sparsify(net, 0.5)
    masks = sparse.masks
    with pytest.raises(ValueError, match="density must be None"):
        fxsparse.sparsify(net, 0.5, init=masks)
    with pytest.raises(ValueError, match=r"no mask for \['2.weight'\]"):
        fxsparse.sparsify(net, None, init={"0.weight": masks["0.weight"]})
    with pytest.raises(ValueError, match="shape"):
        fxsparse.sparsify(net, None, init={**masks, "0.weight": masks["0.weight"].t()})
    with pytest.raises(TypeError, match="not both"):
        fxsparse.sparsify(net, None, init={"0.weight": masks["0.weight"], "2.weight": 0.5})
    before = copy.deepcopy(net.state_dict())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched


def test_load_masks_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="zeros"):
        fxsparse.load_masks(tmp_path)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / fxsparse.serialization.MASKS_FILE))
    with pytest.raises(ValueError, match="fxsparse masks file"):
        fxsparse.load_masks(tmp_path)


def test_generate_with_cache_gives_greedy_tokens_of_the_sparse_logits():
    batch = {"input_ids": _ids(1, 6)}
    sparse = fxsparse.sparsify(_llama(), 0.3, example_inputs=batch)
    _train(sparse, batch)
    sparse.eval()
    new = 8
    generated = sparse.generate(batch["input_ids"], max_new_tokens=new, do_sample=False, use_cache=True,
                                pad_token_id=0, eos_token_id=None)
    # greedy decoding on the sparse module's own logits, without a cache (whole sequence each step)
    ids = batch["input_ids"]
    with torch.no_grad():
        for _ in range(new):
            logits = _out(sparse(input_ids=ids))
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)
    unwrapped = sparse.unwrap()
    assert torch.equal(unwrapped.generate(batch["input_ids"], max_new_tokens=new, do_sample=False, use_cache=True,
                                          pad_token_id=0, eos_token_id=None), ids)


def test_generate_needs_a_model_that_generates():
    sparse = fxsparse.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5)
    with pytest.raises(AttributeError, match="no generate"):
        sparse.generate(torch.zeros(1, 4))


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_timm_loads_the_unwrapped_checkpoint(tmp_path, suffix):
    model = timm.create_model("resnet18", pretrained=False, num_classes=5)
    sparse = fxsparse.sparsify(model, 0.2)
    x = torch.randn(2, 3, 32, 32)
    _train(sparse, x)
    sparse.eval()
    path = tmp_path / f"model.{suffix}"
    if suffix == "safetensors":
        sparse.save_pretrained(tmp_path)
        assert (tmp_path / fxsparse.serialization.MASKS_FILE).is_file()
    else:
        torch.save(sparse.unwrap().state_dict(), path)
    loaded = timm.create_model("resnet18", pretrained=False, num_classes=5, checkpoint_path=str(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), sparse(x))


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, length: int = 12) -> None:
        self.ids = torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def _trainer_run(out, gradient_checkpointing: bool):
    from fxsparse.integrations.transformers import SparseTrainingCallback

    data = _Tokens()
    example = torch.utils.data.default_collate([data[i] for i in range(4)])
    sparse = fxsparse.sparsify(_llama(attention_dropout=0.1), 0.25, example_inputs=example)
    args = transformers.TrainingArguments(
        str(out), max_steps=6, per_device_train_batch_size=4, save_steps=3, logging_steps=1, report_to="none",
        use_cpu=True, learning_rate=3e-3, seed=0, disable_tqdm=True, gradient_checkpointing=gradient_checkpointing)
    trainer = transformers.Trainer(model=sparse, args=args, train_dataset=data, callbacks=[SparseTrainingCallback(delta_t=2)])
    trainer.train()
    return trainer, sparse


def test_trainer_checkpointing_and_a_directory_from_pretrained_loads(tmp_path):
    trainer, sparse = _trainer_run(tmp_path / "plain", gradient_checkpointing=False)
    checkpointed, sparse_ckpt = _trainer_run(tmp_path / "checkpointed", gradient_checkpointing=True)
    assert sparse_ckpt.is_gradient_checkpointing and not sparse.is_gradient_checkpointing
    losses = [[r["loss"] for r in t.state.log_history if "loss" in r] for t in (trainer, checkpointed)]
    assert len(losses[0]) == 6 and losses[0] == losses[1]  # dropout on: the recomputation replays it
    assert all(torch.equal(sparse.masks[f], sparse_ckpt.masks[f]) for f in sparse.masks)
    assert any(r.get("fxsparse/updates") for r in trainer.state.log_history)
    # trainer.save_model() into output_dir, and every checkpoint, load as the original class
    trainer.save_model()
    sparse.eval()
    batch = {"input_ids": _Tokens()[0]["input_ids"][None]}
    with torch.no_grad():
        expected = _out(sparse(input_ids=batch["input_ids"], labels=batch["input_ids"]))
    for directory in (tmp_path / "plain", tmp_path / "plain" / "checkpoint-6"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(directory)
        assert type(loaded).__name__ == "LlamaForCausalLM"
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(**batch).logits, expected)
        masks = fxsparse.load_masks(directory)
        assert all(torch.equal(masks[f], m) for f, m in sparse.masks.items())
    assert (tmp_path / "plain" / "checkpoint-3" / "config.json").is_file()


@pytest.mark.parametrize("compiled", [False, True])
def test_timm_style_loop_with_ema_channels_last_and_amp(compiled):
    """timm's train.py loop: channels-last, bf16 autocast, torch.compile, model EMA (ModelEmaV3)
    of a sparse model, RigL updates every 2 steps. EMA of a changing topology: each weight's
    average runs while it is active; the EMA copy takes the model's masks at every update, so its
    entries are zero where the model's are inactive (a dropped connection's average is zeroed, a
    regrown one restarts from 0)."""
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    sparse = fxsparse.sparsify(timm.create_model("resnet10t", pretrained=False, num_classes=5), 0.2)
    sparse = sparse.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(sparse, decay=0.8)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    scheduler = fxsparse.TopologyScheduler(sparse, opt, total_steps=8, delta_t=2, end_fraction=1.0)
    run = torch.compile(sparse) if compiled else sparse
    counts = {f: int(m.sum()) for f, m in sparse.masks.items()}
    for step in range(8):
        x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
        y = torch.randint(0, 5, (4,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(run(x), y)
        loss.backward()
        if scheduler.step():
            opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(sparse, step=step)
    assert len(scheduler.history) >= 3
    sparse.verify()
    assert {f: int(m.sum()) for f, m in sparse.masks.items()} == counts
    state = ema.module.state_dict()
    for fqn, mask in sparse.masks.items():
        assert torch.equal(ema.module.masks[fqn], mask)
        assert not state[fqn][~mask].any()  # the EMA is zero where the model is inactive
    ema.module.verify()
    assert any(not torch.equal(state[f], sparse.get_parameter(f)) for f in sparse.masks)  # an average, not a copy
    # the EMA model goes out like any sparse module
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(ema.module.eval().unwrap()(x), ema.module(x))


def test_the_after_training_example_runs(tmp_path):
    import subprocess
    import sys

    from scripts import ROOT

    done = subprocess.run([sys.executable, "examples/after_training.py", "--steps", "6", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "from_pretrained gave LlamaForCausalLM" in done.stdout and "same masks" in done.stdout
    assert (tmp_path / "model" / fxsparse.serialization.MASKS_FILE).is_file()
