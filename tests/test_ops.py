"""The op tables the passes share (fxsparse/passes/ops.py): what export_inference lowers is what
find_weights calls a product, and the old name of the masker still reaches it."""

import operator

import pytest

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


# Less common products, each with the weight `w` (8 x 16, or 8 x 16 x 16 for bilinear) read whole:
# name -> forward(self, x) with x of shape (4, 16), giving (4, 8)
_PRODUCTS = {
    "tensordot": lambda m, x: torch.tensordot(x, m.w, dims=([1], [1])),
    "inner": lambda m, x: torch.inner(x, m.w),
    "mv": lambda m, x: torch.mv(m.w, x[0]).expand(4, 8),
    "Tensor.mv": lambda m, x: m.w.mv(x[0]).expand(4, 8),
    "addmv": lambda m, x: torch.addmv(x[1, :8], m.w, x[0]).expand(4, 8),
    "multi_dot": lambda m, x: torch.linalg.multi_dot([x, m.w.t(), m.u.t(), m.w.t()]),
    "chain_matmul": lambda m, x: torch.chain_matmul(x, m.w.t(), m.u.t(), m.w.t()),
    "baddbmm of w[None]": lambda m, x: torch.baddbmm(x[None, :, :8], x[None], m.w.t()[None])[0],
    "F.bilinear": lambda m, x: F.bilinear(x, x, m.w3),
    "nn.Bilinear": lambda m, x: m.bilinear(x, x),
}


class _Products(nn.Module):
    def __init__(self, name: str, table: dict = _PRODUCTS) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.product = table[name]
        self.w = nn.Parameter(torch.randn(8, 16) * 0.3)
        self.u = nn.Parameter(torch.randn(16, 8) * 0.3)
        self.w3 = nn.Parameter(torch.randn(8, 16, 16) * 0.3)
        self.bilinear = nn.Bilinear(16, 16, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.product(self, x))


@pytest.mark.parametrize("capture", ["symbolic", "export"])
@pytest.mark.parametrize("name", list(_PRODUCTS))
def test_less_common_products_are_masked_counted_and_checked(name, capture):
    from fxsparse.checks import check_model

    x = torch.randn(4, 16)
    weight = {"F.bilinear": "w3", "nn.Bilinear": "bilinear.weight"}.get(name, "w")
    report = check_model(_Products(name), x, capture=capture)
    assert report.ok, report.failure
    sparse = fxsparse.sparsify(_Products(name), 0.5, "uniform", dense=[], example_inputs=x, capture=capture)
    assert weight in sparse.masks and weight not in dict(sparse.skipped)
    if name in ("multi_dot", "chain_matmul"):
        assert "u" in sparse.masks
    rows = {row.name: row for row in fxsparse.flop_report(sparse, x).rows}
    counted = rows.get(weight) or rows.get(weight.rsplit(".", 1)[0])  # an opaque leaf's row is the leaf's
    assert counted is not None and counted.dense_flops > 0, rows


_KEYWORD_PRODUCTS = {
    "torch.matmul(x, other=w)": lambda m, x: torch.matmul(x, other=m.w.t()),
    "torch.mm(input=x, mat2=w)": lambda m, x: torch.mm(input=x, mat2=m.w.t()),
    "torch.addmm(b, x, mat2=w)": lambda m, x: torch.addmm(m.head.bias[:1], x, mat2=m.w.t())[:, :8],
    "x.matmul(other=w)": lambda m, x: x.matmul(other=m.w.t()),
    "F.linear(input=q, weight=w)": lambda m, x: F.linear(input=x, weight=m.w),
}


@pytest.mark.parametrize("name", list(_KEYWORD_PRODUCTS))
def test_operands_given_by_keyword_are_found(name):
    from fxsparse.checks import check_model

    assert check_model(_Products(name, _KEYWORD_PRODUCTS), torch.randn(4, 16), capture="symbolic").ok
    sparse = fxsparse.sparsify(_Products(name, _KEYWORD_PRODUCTS), 0.5, "uniform", dense=[])
    assert "w" in sparse.masks
