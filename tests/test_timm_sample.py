"""A fixed, diverse sample of timm architectures: every check of benchmarks/timm_coverage.py
(fxsparse.checks.check_model).

The full registry sweep is benchmarks/timm_coverage.py (hours); this sample runs in CI. Each
model is built with ``pretrained=False`` at a small input it accepts, with drop path and dropout
at 0.1 (timm's training recipes; the sweep's ``--drop-path 0.1``), so that the check of both modes
(``modes``) meets stochastic depth and dropout wherever the architecture has them.
"""

from __future__ import annotations

import pytest
import torch
from scripts import load_script

from fxsparse.checks import CHECKS, check_model

# (name, input size, extra create_model kwargs): one per family the issue names
SAMPLE = [
    ("resnet18", 32, {}),
    ("convnext_atto", 32, {}),
    ("vit_tiny_patch16_224", 32, {"img_size": 32}),
    ("deit_tiny_patch16_224", 32, {"img_size": 32}),
    ("swin_tiny_patch4_window7_224", 224, {}),
    ("efficientnet_b0", 32, {}),
    ("mobilenetv3_small_050", 32, {}),
    ("regnetx_002", 32, {}),
    ("densenet121", 32, {}),
    ("mixer_s16_224", 32, {"img_size": 32}),
    ("coatnet_nano_rw_224", 224, {}),
    ("resnest14d", 32, {}),
    ("nf_regnet_b0", 32, {}),
    ("levit_128s", 224, {}),
    ("eva02_tiny_patch14_224", 56, {"img_size": 56}),
]


@pytest.mark.parametrize("name,size,kwargs", SAMPLE, ids=[s[0] for s in SAMPLE])
def test_timm_model_sparsifies_with_every_check(name, size, kwargs):
    torch.manual_seed(0)
    drop = {"drop_path_rate": 0.1, "drop_rate": 0.1}
    model = load_script("benchmarks/timm_coverage.py").create(name, drop, **kwargs)  # drop: what it took
    report = check_model(model, torch.randn(2, 3, size, size))
    assert report.ok, report.failure
    assert set(report.passed) == set(CHECKS)
    # NF-RegNet's convolutions standardize their weight before the product (in the graph and inside
    # its opaque NormFreeBlocks): their masks go on the standardized kernels (the reads check)
    assert report.coverage >= 0.99, report.skipped
