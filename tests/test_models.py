"""Tests for fxsparse.models: shapes, sizes and FLOPs of the reference models, timm registration."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import nn

import fxsparse.models as models
from fxsparse.models import SmallCNN, WideResNet, small_cnn, wrn22_2

__all__: list[str] = []

# Published anchor (Evci et al. 2020; the reproduction report): dense WRN-22-2 at 32x32.
_WRN22_2_FLOPS = 3.15e8
_WRN22_2_PARAMS = 1_079_642


def _dense_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Inference FLOPs per sample of ``model``: 2 per MAC, convolutions and linear layers only."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs_per_output = module.in_channels // module.groups * kh * kw
            total += 2 * macs_per_output * output[0].numel()
        elif isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return total


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_wrn22_2_output_shape() -> None:
    model = wrn22_2(num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_wrn22_2_parameter_count() -> None:
    assert _num_params(wrn22_2()) == _WRN22_2_PARAMS


def test_wrn22_2_flops_match_published_anchor() -> None:
    flops = _dense_flops(wrn22_2(), torch.randn(1, 3, 32, 32))
    assert flops == pytest.approx(_WRN22_2_FLOPS, rel=0.01)


@pytest.mark.parametrize(("depth", "blocks"), [(10, 1), (16, 2), (28, 4)])
def test_wide_resnet_depth_sets_blocks_per_group(depth: int, blocks: int) -> None:
    model = WideResNet(depth=depth, widen_factor=1, num_classes=3, in_chans=1)
    assert [len(g) for g in (model.block1, model.block2, model.block3)] == [blocks] * 3
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("depth", [0, 21, 24])
def test_wide_resnet_rejects_bad_depth(depth: int) -> None:
    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=depth)


def test_wrn22_2_is_fx_traceable_and_equivalent() -> None:
    model = wrn22_2().eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(traced(x), model(x))


def test_small_cnn_output_shape_and_gradients() -> None:
    model = SmallCNN(num_classes=10, width=8)
    out = model(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_timm_create_model() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("wrn22_2", num_classes=10)
    assert isinstance(model, WideResNet)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    cnn = timm.create_model("small_cnn", num_classes=5, width=8)
    assert isinstance(cnn, SmallCNN) and cnn.fc2.out_features == 5


def test_timm_drop_rate_maps_to_dropout() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("wrn22_2", drop_rate=0.3)
    assert isinstance(model.block1[0].dropout, nn.Dropout)
    assert model.block1[0].dropout.p == 0.3


@pytest.mark.parametrize("name", ["wrn22_2", "small_cnn"])
def test_pretrained_raises(name: str) -> None:
    timm = pytest.importorskip("timm")
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model(name, pretrained=True)
    factory = {"wrn22_2": wrn22_2, "small_cnn": small_cnn}[name]
    with pytest.raises(ValueError, match="pretrained"):
        factory(pretrained=True)


def test_reimport_registers_silently() -> None:
    timm = pytest.importorskip("timm")
    saved = dict(vars(models))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            importlib.import_module("fxsparse.models")
            reloaded = importlib.reload(models)
        assert timm.models.model_entrypoint("wrn22_2") is reloaded.wrn22_2
    finally:
        # Put the original classes and entrypoints back so other tests' isinstance checks hold.
        vars(models).update(saved)
        models._register_with_timm((models.wrn22_2, models.small_cnn))
    assert timm.models.model_entrypoint("wrn22_2") is wrn22_2


def test_cifar_resnet50_is_the_reports_model_and_registered_with_timm():
    import timm

    from fxsparse.models import CifarResNet

    model = timm.create_model("cifar_resnet50", num_classes=100, pretrained=False)
    assert isinstance(model, CifarResNet)
    convs = [m for m in model.stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((3, 3), (1, 1))] * 2  # two 3x3 convs, no 7x7
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [3, 4, 6, 3]
    for block in model.modules():
        if hasattr(block, "bn3"):
            assert bool((block.bn3.weight == 0).all())  # last BN of each bottleneck starts at zero
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    narrow = CifarResNet(num_classes=100, width=0.5)
    assert sum(p.numel() for p in narrow.parameters()) < 0.3 * sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("cifar_resnet50", pretrained=True)
