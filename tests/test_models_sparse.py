"""The fixed model set: timm resnet18 / resnet50 / vit_tiny and WRN-22-2 (never pretrained)."""

from __future__ import annotations

import pytest
import timm
import torch

import fxsparse
from fxsparse.models import wrn22_2
from invariants import assert_budget, assert_inactive_no_influence, assert_inactive_zero_grad, snapshot, assert_update_invariants

MODELS = {
    "resnet18": (lambda: timm.create_model("resnet18", pretrained=False, num_classes=10), (2, 3, 64, 64)),
    "vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10), (2, 3, 224, 224)),
    "wrn22_2": (lambda: wrn22_2(num_classes=10), (2, 3, 32, 32)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_input(request):
    factory, shape = MODELS[request.param]
    torch.manual_seed(0)
    return factory(), torch.randn(shape)


def test_density_one_equals_the_original_in_eval(model_and_input):
    model, x = model_and_input
    sparse = fxsparse.sparsify(model, 1.0)
    model.eval(), sparse.eval()
    with torch.no_grad():
        assert torch.equal(model(x), sparse(x))


def test_sparse_training_invariants_on_real_architectures(model_and_input):
    model, x = model_and_input
    sparse = fxsparse.sparsify(model, 0.1, "erk")
    assert_budget(sparse, 0.1, "erk")
    n_weights = sum(p.numel() for n, p in model.named_parameters() if n in sparse.masks)
    matmul_like = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert n_weights / matmul_like > 0.99  # only embeddings/tokens/positions are left out
    opt = torch.optim.SGD(sparse.parameters(), lr=0.01, momentum=0.9)
    sparse.train()
    for _ in range(2):
        opt.zero_grad()
        sparse(x).logsumexp(-1).mean().backward()
        assert_inactive_zero_grad(sparse)
        opt.step()
        opt.zero_grad()
        sparse(x).logsumexp(-1).mean().backward()
        before = snapshot(sparse, opt)
        sparse.rigl_step(0.3, optimizer=opt)
        assert_update_invariants(before, sparse, opt, 0.3)
    sparse.verify()
    assert_inactive_no_influence(sparse, x)


def test_resnet50_erk_budgets_are_exact():
    model = timm.create_model("resnet50", pretrained=False)
    sparse = fxsparse.sparsify(model, 0.1, "erk")
    assert len(sparse.masks) == 54  # 53 convolutions and the classifier
    assert_budget(sparse, 0.1, "erk")
    total = sum(m.numel() for m in sparse.masks.values())
    assert abs(sparse.density * total - 0.1 * total) <= len(sparse.masks)
    # ERK keeps the 7x7 stem and the classifier denser than the 3x3 bottleneck convs
    d = {f: float(m.float().mean()) for f, m in sparse.masks.items()}
    assert d["conv1.weight"] > d["layer3.0.conv2.weight"] and d["fc.weight"] > d["layer4.0.conv2.weight"]
    assert sparse.skipped == []
