"""Reference models for the recipes and tests: Wide ResNet and ResNet-50 for CIFAR, a small CNN.

Both are plain ``nn.Module`` trees with no data-dependent control flow, so ``torch.fx`` traces
them without leaf registrations. When timm is importable the factories are also registered with
timm's model registry, so that after ``import fxsparse.models``::

    import timm
    model = timm.create_model("wrn22_2", num_classes=10)

works like any timm model (no pretrained weights exist; ``pretrained=True`` raises).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WideResNet", "SmallCNN", "CifarResNet", "wrn22_2", "small_cnn", "cifar_resnet50"]

# Keyword arguments that ``timm.create_model`` passes to every entrypoint and that only concern
# pretrained-weight loading, which these models do not have.
_TIMM_WEIGHT_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


class _PreActBlock(nn.Module):
    """Pre-activation basic block of a Wide ResNet: (BN-ReLU-conv3x3) twice plus a shortcut.

    When the block changes the number of channels or the resolution, the shortcut is a 1x1
    convolution applied to the pre-activated input (as in the reference Wide ResNet code);
    otherwise it is the identity on the raw input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``[N, in_planes, H, W]``."""
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        residual = x if self.shortcut is None else self.shortcut(pre)
        return out + residual


class WideResNet(nn.Module):
    """Wide ResNet for 32x32 inputs (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

    WRN-``depth``-``widen_factor``: a 3x3 stem convolution with 16 channels, three groups of
    ``(depth - 4) / 6`` pre-activation basic blocks with widths ``16k``, ``32k`` and ``64k``
    (strides 1, 2, 2), a final BN-ReLU, global average pooling and a linear classifier. The
    first block of a group uses a 1x1 convolution shortcut when the shape changes.

    Measured for WRN-22-2 with 10 classes at 32x32 (forward-hook count, 2 FLOPs per
    multiply-accumulate, convolutions and linear layers only, as in the RigL paper):
    1,079,642 parameters (1,076,912 of them in convolution/linear weights) and
    315,460,096 = 3.15e8 dense inference FLOPs per sample.

    Args:
        depth: Total depth; ``depth - 4`` must be a positive multiple of 6.
        widen_factor: Width multiplier ``k`` of the three groups.
        num_classes: Number of output logits.
        dropout: Dropout probability between the two convolutions of every block.
        in_chans: Number of input channels.
        width: Multiplier of every layer's channel count (rounded, at least 1): the
            small-dense baseline (:func:`fxsparse.small_dense`) shrinks it.

    Raises:
        ValueError: If ``depth`` or another argument is out of range.

    Example:
        >>> model = WideResNet(depth=22, widen_factor=2, num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 22,
        widen_factor: int = 2,
        num_classes: int = 10,
        dropout: float = 0.0,
        in_chans: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if not (width > 0):
            raise ValueError(f"expected width (a multiplier of every layer's channels) > 0, got {width}")
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"expected depth = 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}"
            )
        if widen_factor < 1:
            raise ValueError(f"expected widen_factor >= 1, got {widen_factor}")
        if num_classes < 1 or in_chans < 1:
            raise ValueError(
                f"expected num_classes >= 1 and in_chans >= 1, got {num_classes} and {in_chans}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"expected 0 <= dropout < 1, got {dropout}")
        blocks_per_group = (depth - 4) // 6
        widths = [max(1, round(c * width)) for c in (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)]
        self.num_classes = num_classes
        self.num_features = widths[3]

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _make_group(widths[0], widths[1], blocks_per_group, 1, dropout)
        self.block2 = _make_group(widths[1], widths[2], blocks_per_group, 2, dropout)
        self.block3 = _make_group(widths[2], widths[3], blocks_per_group, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, num_classes]`` for images ``x`` of shape ``[N, in_chans, H, W]``."""
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class SmallCNN(nn.Module):
    """A small CNN for 28x28 single-channel images such as Fashion-MNIST.

    conv3x3(in -> w)-maxpool-BN-ReLU, conv3x3(w -> 2w)-maxpool-BN-ReLU,
    linear(2w * 7 * 7 -> 128)-ReLU, linear(128 -> num_classes). With the default ``width=32``
    it has 421,738 parameters and 8.5e6 dense inference FLOPs per sample, and reaches 91.1%
    Fashion-MNIST test accuracy after two epochs (mean of 3 seeds, ``recipes/demo.py``), at
    under 20 s per epoch on 2 CPU cores.

    Args:
        num_classes: Number of output logits.
        in_chans: Number of input channels.
        width: Channels of the first convolution; the second has ``2 * width``.

    Raises:
        ValueError: If an argument is not positive.

    Example:
        >>> model = SmallCNN(num_classes=10)
        >>> model(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32) -> None:
        super().__init__()
        if min(num_classes, in_chans, width) < 1:
            raise ValueError(
                "expected positive num_classes, in_chans and width, "
                f"got {num_classes}, {in_chans} and {width}"
            )
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, num_classes]`` for ``x`` of shape ``[N, in_chans, 28, 28]``."""
        # Pooling straight after each convolution lets BN and ReLU (and their backward passes)
        # touch 4x fewer values: on 2 CPU cores a training step takes ~40% less time than with
        # conv-BN-ReLU-pool, with no loss of accuracy in recipes/demo.py.
        out = F.relu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        out = F.relu(self.bn2(F.max_pool2d(self.conv2(out), 2)))
        out = F.relu(self.fc1(out.flatten(1)))
        return self.fc2(out)


def wrn22_2(num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """Build WRN-22-2, the RigL papers' CIFAR-10 model (1.08M parameters, 3.15e8 FLOPs).

    Also registered with timm (``timm.create_model("wrn22_2")``) when timm is importable.

    Args:
        num_classes: Number of output logits.
        **kwargs: Passed to :class:`WideResNet` (``dropout``, ``in_chans``; ``drop_rate`` is
            accepted as timm's name for ``dropout``). The keyword arguments that
            ``timm.create_model`` adds (``pretrained``, ``pretrained_cfg``, ...) are accepted too.

    Returns:
        A freshly initialised :class:`WideResNet` with depth 22 and widen factor 2.

    Raises:
        ValueError: If ``pretrained=True`` (there are no pretrained weights).

    Example:
        >>> wrn22_2(num_classes=100).fc.out_features
        100
    """
    placement = _pop_timm_kwargs("wrn22_2", kwargs)
    if "drop_rate" in kwargs:
        kwargs["dropout"] = kwargs.pop("drop_rate")
    model = WideResNet(depth=22, widen_factor=2, num_classes=num_classes, **kwargs)
    return model.to(**placement) if placement else model


def small_cnn(num_classes: int = 10, **kwargs: Any) -> SmallCNN:
    """Build :class:`SmallCNN`, the Fashion-MNIST model of ``recipes/demo.py``.

    Also registered with timm (``timm.create_model("small_cnn")``) when timm is importable.

    Args:
        num_classes: Number of output logits.
        **kwargs: Passed to :class:`SmallCNN` (``in_chans``, ``width``). The keyword arguments
            that ``timm.create_model`` adds (``pretrained``, ``pretrained_cfg``, ...) are accepted.

    Returns:
        A freshly initialised :class:`SmallCNN`.

    Raises:
        ValueError: If ``pretrained=True`` (there are no pretrained weights).

    Example:
        >>> small_cnn(width=8).conv2.out_channels
        16
    """
    placement = _pop_timm_kwargs("small_cnn", kwargs)
    model = SmallCNN(num_classes=num_classes, **kwargs)
    return model.to(**placement) if placement else model


class _Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3), its last BN initialised to zero."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-50 for 32x32 inputs, as in the RigL reproduction report (Sundar & Dwaraknath 2021).

    ImageNet's 7x7 stride-2 stem and max-pool are replaced by two 3x3 stride-1 convolutions
    (BN-ReLU after each), then the four bottleneck stages of ResNet-50 (3, 4, 6, 3 blocks; widths
    64, 128, 256, 512, expansion 4; strides 1, 2, 2, 2), global average pooling and a linear
    classifier. The last BN of every bottleneck starts at zero, so each block starts as the
    identity.

    Args:
        num_classes: Number of output logits.
        width: Multiplier of every layer's channels (rounded, at least 1), for the small-dense
            baseline.
        layers: Blocks per stage (ResNet-50's by default).
        in_chans: Input channels.

    Example:
        >>> CifarResNet(num_classes=100)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(
        self, num_classes: int = 100, width: float = 1.0, layers: tuple[int, ...] = (3, 4, 6, 3), in_chans: int = 3
    ) -> None:
        super().__init__()
        if not (width > 0) or num_classes < 1 or in_chans < 1 or not layers or min(layers) < 1:
            raise ValueError(
                f"expected width > 0, num_classes >= 1, in_chans >= 1 and blocks >= 1 per stage, got "
                f"width={width}, num_classes={num_classes}, in_chans={in_chans}, layers={layers}"
            )

        def scaled(c: int) -> int:
            return max(1, round(c * width))

        stem = scaled(64)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            nn.Conv2d(stem, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
        )
        stages, in_planes = [], stem
        for i, blocks in enumerate(layers):
            planes = scaled(64 * 2**i)
            stage = []
            for j in range(blocks):
                stage.append(_Bottleneck(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes * _Bottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
        self.num_classes = num_classes
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)
        for module in self.modules():
            if isinstance(module, _Bottleneck):
                nn.init.zeros_(module.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, num_classes]`` for images ``x`` of shape ``[N, in_chans, H, W]``."""
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def cifar_resnet50(num_classes: int = 100, **kwargs: Any) -> CifarResNet:
    """Build the CIFAR ResNet-50 of the RigL reproduction report (:class:`CifarResNet`).

    Also registered with timm (``timm.create_model("cifar_resnet50", num_classes=100)``).

    Example:
        >>> sum(p.numel() for p in cifar_resnet50().parameters()) > 23_000_000
        True
    """
    placement = _pop_timm_kwargs("cifar_resnet50", kwargs)
    kwargs.pop("drop_rate", None)
    model = CifarResNet(num_classes=num_classes, **kwargs)
    return model.to(**placement) if placement else model


def _make_group(
    in_planes: int, out_planes: int, num_blocks: int, stride: int, dropout: float
) -> nn.Sequential:
    """Stack ``num_blocks`` blocks; only the first changes width and resolution."""
    blocks = [_PreActBlock(in_planes, out_planes, stride, dropout)]
    blocks += [_PreActBlock(out_planes, out_planes, 1, dropout) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _init_weights(model: nn.Module) -> None:
    """He-normal (fan-out) convolutions, unit BN scale, zero biases (the reference WRN init)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


def _pop_timm_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove ``timm.create_model``'s weight-loading kwargs in place; return device/dtype ones.

    Raises:
        ValueError: If pretrained weights are requested.
    """
    if kwargs.pop("pretrained", False):
        raise ValueError(
            f"no pretrained weights exist for {name!r}; expected pretrained=False, got True. "
            "Train the model yourself (see recipes/) and load its state_dict."
        )
    for key in _TIMM_WEIGHT_KWARGS:
        kwargs.pop(key, None)
    return {key: kwargs.pop(key) for key in ("device", "dtype") if key in kwargs}


def _register_with_timm(entrypoints: tuple[Callable[..., nn.Module], ...]) -> None:
    """Register the factories in timm's model registry, if timm is importable.

    Registration is idempotent: re-running it (``importlib.reload``) replaces this module's own
    earlier registration without timm's "overwriting" warning. A same-named model registered by
    another module is left in place, with a warning.
    """
    try:
        from timm.models import is_model, model_entrypoint, register_model
    except ImportError:  # timm is optional for the models themselves
        return
    for fn in entrypoints:
        if is_model(fn.__name__):
            existing = model_entrypoint(fn.__name__)
            if getattr(existing, "__module__", None) != fn.__module__:
                warnings.warn(
                    f"timm already has a model named {fn.__name__!r} from "
                    f"{getattr(existing, '__module__', '?')}; fxsparse's is not registered. "
                    f"Use fxsparse.models.{fn.__name__}() directly.",
                    stacklevel=2,
                )
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                register_model(fn)
        else:
            register_model(fn)


_register_with_timm((wrn22_2, small_cnn, cifar_resnet50))
