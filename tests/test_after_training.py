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
from fxsparse.unwrap import MASKS_ATTRIBUTE

transformers = pytest.importorskip("transformers")

VOCAB = 61


def _llama(**overrides) -> nn.Module:
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, **overrides)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def _bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _ids(batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


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
