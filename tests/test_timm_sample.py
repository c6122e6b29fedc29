"""A fixed, diverse sample of timm architectures: every check of benchmarks/timm_coverage.py.

The full registry sweep is benchmarks/timm_coverage.py (hours); this sample runs in CI. Each
model is built with ``pretrained=False`` at a small input it accepts.
"""

from __future__ import annotations

import pytest
import timm
import torch

import fxsparse
from invariants import assert_budget

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


def coverage(sparse: fxsparse.SparseGraphModule) -> float:
    """Fraction (by parameter count) of conv/linear/matmul weights that were sparsified."""
    masked = sum(m.numel() for m in sparse.masks.values())
    left = sum(sparse.get_parameter(fqn).numel() for fqn, reason in sparse.skipped if "excluded" not in reason)
    return masked / (masked + left)


@pytest.mark.parametrize("name,size,kwargs", SAMPLE, ids=[s[0] for s in SAMPLE])
def test_timm_model_sparsifies_with_every_check(name, size, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    x = torch.randn(2, 3, size, size)

    # density 1.0 computes what the model computes (eval: no dropout or drop-path noise)
    model.eval()
    full = fxsparse.sparsify(model, 1.0, example_inputs=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(x), model(x), rtol=1e-5, atol=1e-5)

    # density 0.1 ERK: exact budgets, nearly every product weight covered
    model.train()
    sparse = fxsparse.sparsify(model, 0.1, "erk", example_inputs=x)
    assert_budget(sparse, 0.1, "erk")
    assert coverage(sparse) >= 0.99, sparse.skipped

    # one backward: every parameter the dense model trains gets a gradient, masked where inactive
    model(x).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    sparse(x).sum().backward()
    got = {n for n, p in sparse.named_parameters() if p.grad is not None}
    assert trained <= got, sorted(trained - got)
    for fqn, mask in sparse.masks.items():
        grad = sparse.get_parameter(fqn).grad
        assert grad is None or bool((grad * ~mask).eq(0).all()), fqn

    # one topology update keeps every count
    sparse.rigl_step(0.3)
    assert_budget(sparse, 0.1, "erk")
    sparse.verify()
