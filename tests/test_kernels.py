"""Masks on computed kernels (fxsparse.kernels): weight standardization.

A convolution that standardizes its weight before the product (timm's StdConv2d and
ScaledStdConv2d: NFNet, BiT) reads ``standardize(w)``, which a mask on ``w`` does not make sparse.
fxsparse masks the kernel, in the graph and inside opaque leaf modules, and these tests hold it to
what the product kernels really read (:class:`fxsparse.probe.SparseReads`), to the gradients and
to the unwrapped and exported modules.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse import api
from fxsparse.checks import check_model
from fxsparse.probe import SparseReads


class StdConv(nn.Conv2d):
    """Weight standardization as timm's StdConv2d computes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv(nn.Conv2d):
    """With a learned per-channel gain, as timm's ScaledStdConv2d (NFNet)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * 0.5).view(-1), training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


@fxsparse.register_leaf_module
class LeafStdConv(StdConv):
    """A standardizing layer that is itself a leaf (as timm keeps StdConv2dSame whole)."""


@fxsparse.register_leaf_module
class OpaqueBlock(nn.Module):
    """Kept whole by tracing (as timm keeps NormFreeBlock): the graph cannot see its layers."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = ScaledStdConv(width, width, 3, padding=1)
        self.skip_gain = nn.Parameter(torch.full((1,), 0.5))  # not 0-d: fully_shard refuses scalars

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(F.relu(x))
        out.mul_(self.skip_gain)  # in place, the reason timm keeps its block whole
        return x + out


class Net(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = StdConv(3, 8, 3, padding=1)
        self.leaf = LeafStdConv(8, 8, 1)
        self.block = OpaqueBlock(8)
        self.head = nn.Linear(8, 4)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.leaf(self.stem(x))).mean((2, 3))
        if self.dropout:  # functional: the train and eval traces differ, a graph per mode
            h = F.dropout(h, self.dropout, self.training)
        return self.head(h)


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
KERNELS = ("stem.weight", "leaf.weight", "block.conv.weight")


def _dense_reads(sparse: nn.Module, x: torch.Tensor, train: bool, grad: bool) -> tuple[set[str], set[str]]:
    twin = copy.deepcopy(sparse).train(train)
    tensors = {**dict(twin.named_parameters()), **dict(twin.named_buffers())}
    with torch.set_grad_enabled(grad), SparseReads(tensors, twin.masks) as reads:
        twin(x)
    return reads.checked, reads.dense


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_standardized_kernels_are_masked_in_the_graph_and_inside_opaque_leaves(capture, dropout):
    torch.manual_seed(0)
    model = Net(dropout)
    sparse = fxsparse.sparsify(copy.deepcopy(model), 0.3, "uniform", dense=[], example_inputs=X, capture=capture)
    assert set(KERNELS) <= set(sparse.masks) and not sparse.skipped, sparse.skipped
    sites = sparse._fxsparse.sites
    if capture == "symbolic":  # export always fixes the mode in its graphs
        assert (sparse._fxsparse.mode_graphs is not None) == bool(dropout)  # the eval graph is masked too
    assert sites["stem.weight"].kernel == "graph"
    # symbolic tracing keeps the block whole: its layer is replaced by its own masked trace
    assert sites["block.conv.weight"].kernel == ("block.conv" if capture == "symbolic" else "graph")
    assert sites["leaf.weight"].kernel == ("leaf" if capture == "symbolic" else "graph")
    for train in (True, False):
        for grad in (True, False):
            checked, dense = _dense_reads(sparse, X, train, grad)
            assert set(KERNELS) <= checked and not dense, (train, grad, dense)
    # the parameter holds the active count; its inactive entries get no gradient; the growth
    # gradient is the dense gradient of the kernel the product reads
    sparse.train()
    sparse(X).square().mean().backward()
    for fqn in KERNELS:
        weight, mask = sparse.get_parameter(fqn), sparse.masks[fqn]
        assert bool((weight * ~mask).eq(0).all()) and bool((weight.grad * ~mask).eq(0).all())
        grown = sparse.masker.grads[fqn]
        assert grown.shape == mask.shape and bool(grown[~mask].ne(0).any()), fqn
    before = {fqn: int(m.sum()) for fqn, m in sparse.masks.items()}
    sparse.rigl_step(0.3)
    assert {fqn: int(m.sum()) for fqn, m in sparse.masks.items()} == before
    assert not _dense_reads(sparse, X, True, True)[1]
    sparse.verify()


def test_density_one_computes_what_the_model_computes():
    torch.manual_seed(0)
    model = Net().eval()
    full = fxsparse.sparsify(copy.deepcopy(model), 1.0, example_inputs=X).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(X), model(X), rtol=1e-6, atol=1e-6)


def test_unwrap_and_export_inference_compute_what_the_sparse_module_computes():
    torch.manual_seed(0)
    model = Net()
    sparse = fxsparse.sparsify(copy.deepcopy(model), 0.3, "uniform", dense=[], example_inputs=X)
    sparse.eval()
    with torch.no_grad():
        expected = sparse(X)
        unwrapped = sparse.unwrap().eval()
        torch.testing.assert_close(unwrapped(X), expected)
        # the user's state dict keys: the kernel masks travel in fxsparse_masks, not in the state
        assert set(unwrapped.state_dict()) == set(model.state_dict())
        assert set(unwrapped.fxsparse_masks) == set(sparse.masks)
        exported = fxsparse.export_inference(sparse, X)
        torch.testing.assert_close(exported(X), expected, rtol=1e-4, atol=1e-5)


def test_check_model_fails_a_kernel_left_dense(monkeypatch):
    assert check_model(Net(), X, density=0.3).ok
    # masks on the parameters only, as a standardized layer inside a leaf was masked before
    monkeypatch.setattr(api, "swap_layers", lambda sparse, sites: None)
    report = check_model(Net(), X, density=0.3)
    assert not report.ok and report.failure.startswith("reads:"), report.failure
    assert "block.conv.weight" in report.failure


class PaddedStdConv(StdConv):
    """Pads by the input's size in Python (timm's "same" padding): it cannot be traced alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


@fxsparse.register_leaf_module
class PaddedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = PaddedStdConv(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_standardizing_layer_that_cannot_be_traced_alone_is_watched_running_and_listed():
    # before, such a layer was taken as reading its weight: masked on the parameter only, its
    # kernel dense (dm_nfnet's strided "same" convolutions)
    net = nn.Sequential(PaddedBlock(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    sparse = fxsparse.sparsify(copy.deepcopy(net), 0.5, "uniform", dense=[])
    reason = dict(sparse.skipped)["0.conv.weight"]
    assert "cannot be traced alone" in reason and "seen running" in reason, reason
    assert "0.conv.weight" not in sparse.masks and "2.weight" in sparse.masks
    assert check_model(net, torch.randn(2, 3, 8, 8), density=0.5).ok


def test_a_new_call_signature_masks_its_kernels_with_the_live_masks():
    # a new dtype captures the model again from unwrap(share=True): its masked layers must read the
    # sparse module's own masks, which updates change, not a copy of them
    torch.manual_seed(0)
    sparse = fxsparse.sparsify(Net(), 0.3, "uniform", dense=[], example_inputs=X, capture="export")
    sparse.double()
    x = X.double()
    sparse(x).square().mean().backward()  # the float64 signature, captured on this call
    sparse.rigl_step(0.5)
    sparse.eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), sparse.unwrap().eval()(x))
    assert not _dense_reads(sparse, x, False, False)[1]
