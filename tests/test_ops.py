"""The op tables the passes share (fxsparse/passes/ops.py): what export_inference lowers is what
find_weights calls a product, and the old name of the masker still reaches it."""

import operator

import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.passes import ops


def test_every_product_export_lowers_is_a_product_find_weights_reads_the_weight_of():
    lowered = [F.linear, F.conv2d, torch.matmul, operator.matmul, torch.mm,
               torch.ops.aten.linear.default, torch.ops.aten.conv2d.default, torch.ops.aten.mm.default,
               torch.ops.aten.matmul.default]
    for target in lowered:
        kind = ops.product_kind(target)
        assert kind in ("linear", "conv2d", "matmul"), target
        positions = ops.FUNCTION_WEIGHT_ARGS.get(target) or ops.ATEN_WEIGHT_ARGS.get(ops.packet(target))
        assert positions and 1 in positions, target  # export reads the weight as the second operand


def test_product_kind_refuses_what_is_not_a_lowered_product():
    for target in (torch.add, F.embedding, torch.ops.aten.bmm.default, F.conv1d, "matmul", [1]):
        assert ops.product_kind(target) is None


def test_growth_capture_is_the_masker_under_its_former_name():
    sparse = fxsparse.sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), density=0.5)
    assert sparse.growth_capture is sparse.masker
    sparse(torch.randn(4, 8)).sum().backward()
    assert set(sparse.masker.grads) == set(sparse.masks)
