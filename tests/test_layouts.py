"""Layouts are objects (fxsparse/layouts/): a third layout is this one file.

``IndexedLayout`` below stores each weight of a linear layer, ``x @ W`` or convolution as its
active values and their flat positions (COO), and computes by scattering them into a dense
weight. It is written against the public interface only (``Layout``, ``register_layout``, the
shared product-read pass, ``Masker.record``), and everything else follows from it: sparsify's
``layout=``, training with RigL and SET (the same decisions as the masked layout), the
checkpoint in the masked format, FLOP and size accounting, inference export, refusals.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.layouts import LAYOUTS, Layout, Plan, available_layouts, register_layout
from fxsparse.layouts.reads import conv_geometry, product_reads, replace_reads  # noqa: F401  (the shared pass)
from fxsparse.masking import MASKER
from fxsparse.topology import apply_update

HOLDER = "indexed_layers"


class IndexedWeight(nn.Module):
    """The active values (a Parameter) and their ascending flat positions (a buffer)."""

    def __init__(self, fqn: str, weight: torch.Tensor, mask: torch.Tensor, plan: Plan) -> None:
        super().__init__()
        self.fqn, self.shape, self.product = fqn, tuple(weight.shape), plan.product
        positions = torch.nonzero(mask.reshape(-1)).flatten()
        self.values = nn.Parameter(weight.detach().reshape(-1)[positions].clone(), requires_grad=weight.requires_grad)
        self.register_buffer("positions", positions, persistent=False)

    def dense(self) -> torch.Tensor:  # differentiable in the values
        flat = self.values.new_zeros(math.prod(self.shape)).index_put((self.positions,), self.values)
        return flat.view(self.shape)

    def mask(self) -> torch.Tensor:
        flat = torch.zeros(math.prod(self.shape), dtype=torch.bool, device=self.positions.device)
        flat[self.positions] = True
        return flat.view(self.shape)

    def _save_to_state_dict(self, *args) -> None:  # the module writes the masked format (IndexedLayout.save)
        return None

    def _load_from_state_dict(self, *args) -> None:
        return None


def indexed_product(x: torch.Tensor, layer: IndexedWeight, masker, bias=None) -> torch.Tensor:
    weight = layer.dense()
    if masker.armed and torch.is_grad_enabled() and layer.values.requires_grad:
        weight.register_hook(lambda grad: masker.record(layer.fqn, grad))  # the dense growth gradient
    fn, options = layer.product
    return fn(x, weight, bias, **options)


@register_layout
class IndexedLayout(Layout):
    name = "indexed"
    keeps_parameter = False
    shardable = False
    recapturable = False
    graph_functions = (indexed_product,)
    fixed_count = True  # apply keeps each layer's count (a simpler storage)

    def plan(self, sparse, fqn, graphs):
        site = sparse._fxsparse.sites[fqn]
        kind = None if site.opaque or site.kernel else product_reads(graphs, MASKER, fqn)
        if kind in ("linear", "matmul"):
            return Plan(kind, (F.linear, {}) if kind == "linear" else (matmul, {})), ""
        if kind is not None and kind.startswith("conv2d:") and len(site.shape) == 4:
            _, stride, padding, dilation = kind.split(":")
            options = {"stride": _pair(stride), "dilation": _pair(dilation),
                       "padding": padding if padding == "same" else _pair(padding)}
            return Plan(kind, (F.conv2d, options)), ""
        return None, "not read only by products"

    def install(self, sparse, graphs, fqn, plan, kernel):
        site = sparse._fxsparse.sites[fqn]
        if not hasattr(sparse, HOLDER):
            sparse.add_module(HOLDER, nn.Module())
        name = fqn.replace(".", "_")
        weight, mask = sparse.get_parameter(fqn), sparse.get_buffer(site.mask)
        sparse.get_submodule(HOLDER).add_module(name, IndexedWeight(fqn, weight, mask, plan))
        for graph in graphs:
            replace_reads(graph, MASKER, fqn, f"{HOLDER}.{name}", indexed_product)
        for target in (fqn, site.mask):
            owner, _, attr = target.rpartition(".")
            delattr(sparse.get_submodule(owner) if owner else sparse, attr)
        site.layout, site.storage = self.name, f"{HOLDER}.{name}"

    def timed_steps(self, sparse, fqn, plan, x):
        layer = IndexedWeight(fqn, sparse.get_parameter(fqn).detach(), sparse.get_buffer(sparse._fxsparse.sites[fqn].mask), plan)
        layer.values.requires_grad_()
        masker = sparse.masker

        def step():
            armed, masker.armed = masker.armed, False
            try:
                indexed_product(x, layer, masker).sum().backward()
            finally:
                masker.armed = armed
        return {f"{self.name}/scatter": step}

    def without_inputs(self, sparse, fqn, plan):
        return True, "always, without inputs"

    def mask(self, sparse, fqn):
        return self.storage(sparse, fqn).mask()

    def weight(self, sparse, fqn):
        return self.storage(sparse, fqn).dense().detach()

    def trainable(self, sparse, fqn):
        return self.storage(sparse, fqn).values

    def apply(self, sparse, fqn, result, states, zero_grad):
        layer = self.storage(sparse, fqn)
        if int(result.mask.sum()) != layer.values.numel():  # a new count: new storage
            raise ValueError("the indexed layout keeps its count")
        old = layer.positions
        dense = [layer.dense().detach().clone()] + [
            t.new_zeros(math.prod(layer.shape)).index_put((old,), t).view(layer.shape) for t in states]
        grad = None if layer.values.grad is None else \
            layer.values.grad.new_zeros(math.prod(layer.shape)).index_put((old,), layer.values.grad).view(layer.shape)
        apply_update(dense[0], layer.mask(), result, dense[1:] + ([grad] if grad is not None else []))
        new = torch.nonzero(result.mask.reshape(-1)).flatten()
        layer.positions.copy_(new)
        with torch.no_grad():
            layer.values.copy_(dense[0].reshape(-1)[new])
            for tensor, full in zip(states, dense[1:]):
                tensor.copy_(full.reshape(-1)[new])
            if grad is not None:
                layer.values.grad.copy_(grad.reshape(-1)[new])

    def save(self, sparse, fqn, destination, prefix):
        layer = self.storage(sparse, fqn)
        destination[prefix + fqn] = layer.dense().detach()
        destination[prefix + sparse._fxsparse.sites[fqn].mask] = layer.mask()

    def take(self, sparse, fqn, state_dict, prefix, missing_keys):
        keys = (prefix + fqn, prefix + sparse._fxsparse.sites[fqn].mask)
        if all(k in state_dict for k in keys):
            return state_dict.pop(keys[0]), state_dict.pop(keys[1])
        if missing_keys is not None:
            missing_keys.extend(k for k in keys if k not in state_dict)
        return None

    def load(self, sparse, fqn, weight, mask):
        layer = self.storage(sparse, fqn)
        positions = torch.nonzero(mask.reshape(-1).bool()).flatten()
        with torch.no_grad():
            layer.positions = positions
            layer.values.data = weight.reshape(-1)[positions].to(layer.values.dtype).clone()

    def call_operands(self, args):
        x, storage, _, bias = args
        return x, storage, bias

    def dense_call(self, storage):
        return storage.fqn, storage.product

    def stored_spec(self, storage):
        return storage.shape, storage.values.dtype

    def stored_weight(self, storage):
        return storage.dense().detach()

    def reads(self, sparse, fqn, graph):
        storage = sparse._fxsparse.sites[fqn].storage
        return sum(1 for n in graph.nodes if n.op == "call_function" and n.target is indexed_product
                   and getattr(n.args[1], "target", None) == storage)


def matmul(x, weight, bias=None):
    out = x @ weight
    return out if bias is None else out + bias


def _pair(text: str) -> tuple[int, int]:
    a, b = text.split("x")
    return int(a), int(b)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Parameter(torch.randn(8, 12) / 3)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x)).mean((2, 3))
        return self.head(F.relu(h @ self.proj))


def _train(layout, method, steps=8):
    torch.manual_seed(0)
    model = Net().double()
    x, y = torch.randn(6, 3, 5, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    sparse = fxsparse.sparsify(model, 0.3, "uniform", seed=3, layout=layout, dense=[])
    opt = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    scheduler = fxsparse.RigLScheduler(sparse, opt, steps, delta_t=2, end_fraction=1.0, method=method)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(sparse(x), y)
        loss.backward()
        if scheduler.step():
            opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return sparse, losses, x


def test_a_layout_registers_and_sparsify_takes_it():
    assert "indexed" in available_layouts() and isinstance(LAYOUTS.get("indexed"), IndexedLayout)
    sparse = fxsparse.sparsify(Net(), 0.3, "uniform", layout="indexed", dense=[])
    assert {c.layout for c in sparse.layouts.values()} == {"indexed"}
    assert {fqn: sparse.layout_of(fqn).name for fqn in sparse.masks} == dict.fromkeys(sparse.masks, "indexed")
    names = dict(sparse.named_parameters())
    assert not {"conv.weight", "proj", "head.weight"} & set(names)  # moved into the layout's storage
    assert abs(sparse.density - 0.3) < 0.05


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_a_third_layout_trains_as_the_masked_layout_decides(method):
    masked, masked_losses, x = _train("masked", method)
    indexed, indexed_losses, _ = _train({"*": "indexed"}, method)
    assert masked.get_buffer("fxsparse_updates").item() == 4  # the topology changed on the way
    for fqn, mask in masked.masks.items():
        assert torch.equal(mask, indexed.masks[fqn]), fqn
        torch.testing.assert_close(indexed.sparse_weights[fqn], masked.sparse_weights[fqn].detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(indexed_losses, masked_losses, rtol=1e-9, atol=1e-12)
    # the checkpoint is in the masked format, and loads into either layout
    state = indexed.state_dict()
    assert set(state) == set(masked.state_dict())
    other = copy.deepcopy(masked)
    other.load_state_dict(state)
    torch.testing.assert_close(other(x), indexed(x), rtol=1e-12, atol=1e-12)
    # accounting and export see the weight its layout holds
    reports = [fxsparse.flop_report(module, x) for module in (indexed, masked)]
    assert [(r.name, r.op, r.density, r.dense_flops, r.params, r.active_params) for r in reports[0].rows] == \
        [(r.name, r.op, r.density, r.dense_flops, r.params, r.active_params) for r in reports[1].rows]
    assert (reports[0].size_bytes, reports[0].dense_size_bytes) == (reports[1].size_bytes, reports[1].dense_size_bytes)
    exported = fxsparse.export_inference(indexed, (x,), autotune=False)
    torch.testing.assert_close(exported(x), indexed.eval()(x), rtol=1e-9, atol=1e-12)


def test_methods_that_move_counts_refuse_a_fixed_count_layout_before_any_change():
    sparse = fxsparse.sparsify(Net(), 0.3, "uniform", layout={"*": "indexed"}, dense=[])
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="indexed layout .* fixed number of active weights"):
        fxsparse.RigLScheduler(sparse, opt, 10, method="snfs")


def test_a_mapping_naming_a_weight_the_layout_cannot_hold_changes_nothing():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ (self.w * 2)  # read through a product of its own: not a product's operand

    with pytest.raises(ValueError, match=r"w \(not read only by products\)"):
        fxsparse.sparsify(Scaled(), 0.5, "uniform", layout={"w": "indexed"}, dense=[])
    with pytest.raises(ValueError, match=r"expected layout to be one of \['compact', 'indexed', 'masked'\]"):
        fxsparse.sparsify(Net(), 0.5, layout="coo")
