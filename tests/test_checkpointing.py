"""Activation checkpointing of a sparse module's blocks (fxsparse.checkpointing).

With checkpointing on, a training step gives the same loss, the same gradients (dropout and drop
path included: the recomputation replays the forward's random numbers), the same growth
gradients and so the same RigL topology as without; the activations kept for the backward are
fewer; the state dict, masks and ``unwrap`` do not change; turning it off restores the graphs.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import fxsparse
from fxsparse.checkpointing import SEGMENT_PREFIX

transformers = pytest.importorskip("transformers")


def _llama(layers: int = 3, dropout: float = 0.1) -> nn.Module:
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, attention_dropout=dropout)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def _vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                             drop_path_rate=0.2, proj_drop_rate=0.1, num_classes=5)


IDS = torch.randint(1, 61, (2, 16), generator=torch.Generator().manual_seed(0))
CASES = {
    "llama-export": (lambda: _llama(), lambda m: fxsparse.sparsify(m, 0.25, example_inputs={"input_ids": IDS, "labels": IDS}),
                     lambda s: s(input_ids=IDS, labels=IDS)["loss"], ["model.layers.0", "model.layers.1", "model.layers.2"]),
    "vit-symbolic": (_vit, lambda m: fxsparse.sparsify(m, 0.25),
                     lambda s: s(torch.ones(16, 3, 32, 32)).pow(2).mean(), ["blocks.0", "blocks.1", "blocks.2"]),
}


def _step(sparse, loss_fn, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    loss = loss_fn(sparse)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("case", list(CASES))
def test_same_losses_gradients_and_topology(case):
    make, sparsify, loss_fn, blocks = CASES[case]
    plain = sparsify(make())
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    assert fxsparse.checkpointing.checkpointed_blocks(checkpointed) == blocks
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, checkpointed)]
    for step in range(3):
        losses = [_step(m, loss_fn, seed=step) for m in (plain, checkpointed)]
        assert torch.equal(*losses)
        for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
            assert torch.equal(a.grad, b.grad), name
        if step == 1:  # growth from the dense gradients recorded through the checkpointed blocks
            changes = [m.rigl_step(0.3, optimizer=o) for m, o in zip((plain, checkpointed), opts)]
            assert sum(c.grown for c in changes[0].values()) > 0
        else:
            for o in opts:
                o.step()
        for m, o in zip((plain, checkpointed), opts):
            o.zero_grad()
            m.arm_growth()
    assert all(torch.equal(plain.masks[f], checkpointed.masks[f]) for f in plain.masks)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), checkpointed.parameters()))
    checkpointed.verify()


def _saved_bytes(sparse, loss_fn) -> int:
    """Bytes of the tensors autograd keeps from a forward for the backward, outside checkpoints
    (a checkpoint keeps its inputs and recomputes the rest)."""
    total = 0

    def pack(t):
        nonlocal total
        if not isinstance(t, nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(sparse)
    loss.backward()
    return total


@pytest.mark.parametrize("case", list(CASES))
def test_fewer_activations_are_kept(case):
    make, sparsify, loss_fn, _ = CASES[case]
    plain = sparsify(make())
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    kept, kept_checkpointed = _saved_bytes(plain, loss_fn), _saved_bytes(checkpointed, loss_fn)
    assert kept_checkpointed < 0.5 * kept, (kept, kept_checkpointed)


def test_state_unwrap_copies_and_disable():
    make, sparsify, loss_fn, _ = CASES["llama-export"]
    sparse = sparsify(make())
    keys = set(sparse.state_dict())
    nodes = [n.format_node() for n in sparse.graph.nodes]
    sparse.gradient_checkpointing_enable({"use_reentrant": False})
    assert set(sparse.state_dict()) == keys
    assert any(name.startswith(SEGMENT_PREFIX) for name in sparse._modules)
    assert type(sparse.unwrap()).__name__ == "LlamaForCausalLM"
    copied = copy.deepcopy(sparse)
    assert copied.is_gradient_checkpointing
    torch.testing.assert_close(_step(copied, loss_fn, 0), _step(sparse, loss_fn, 0))
    sparse.eval()  # the eval graph is checkpointed alike, and runs without grad as usual
    with torch.no_grad():
        sparse(input_ids=IDS, labels=IDS)
    sparse.train()
    sparse.gradient_checkpointing_disable()
    assert not sparse.is_gradient_checkpointing
    assert not any(name.startswith(SEGMENT_PREFIX) for name in sparse._modules)
    assert [n.format_node() for n in sparse.graph.nodes] == nodes


def test_every_n_layers_and_errors():
    make, sparsify, _, _ = CASES["llama-export"]
    sparse = sparsify(make())
    sparse.activation_checkpointing_enable(every_n_layers=2)
    assert fxsparse.checkpointing.checkpointed_blocks(sparse) == ["model.layers.0", "model.layers.2"]
    with pytest.raises(ValueError, match="offload"):
        sparse.activation_checkpointing_enable(offload=True)
    flat = fxsparse.sparsify(nn.Linear(4, 4), 0.5)
    with pytest.raises(ValueError, match="no repeated blocks"):
        flat.gradient_checkpointing_enable()


def test_blocks_are_the_models_own():
    from fxsparse.passes.checkpoint import block_paths

    resnet = timm.create_model("resnet18", pretrained=False)
    assert block_paths(resnet) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    convnext = timm.create_model("convnext_atto", pretrained=False)
    assert block_paths(convnext)[:3] == ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0"]
    assert block_paths(_llama(layers=4), every_n_layers=3) == ["model.layers.0", "model.layers.3"]
    assert block_paths(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == []


def test_a_resnet_trains_alike_with_checkpointed_stages():
    sparse = fxsparse.sparsify(timm.create_model("resnet18", pretrained=False, num_classes=5), 0.3)
    checkpointed = copy.deepcopy(sparse)
    assert len(checkpointed.gradient_checkpointing_enable() or fxsparse.checkpointing.checkpointed_blocks(checkpointed)) == 8
    x = torch.randn(4, 3, 32, 32)
    losses = [_step(m, lambda s: s(x).pow(2).mean(), 0) for m in (sparse, checkpointed)]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for a, b in zip(sparse.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    assert torch.equal(sparse.get_buffer("layer2.0.bn1.running_mean"), checkpointed.get_buffer("layer2.0.bn1.running_mean"))
