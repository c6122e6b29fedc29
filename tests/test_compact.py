"""The compact layout (fxsparse/layouts/): the same training as the masked layout,
stored and computed as the active weights only."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxsparse
from fxsparse.layouts.compact import CompactWeight, compact_linear
from fxsparse.masking import Masker
from fxsparse.state import StateDictError

# --- the kernel ----------------------------------------------------------------------------------


@pytest.mark.parametrize("transposed", [False, True])
def test_the_compact_kernel_computes_the_masked_product_and_its_gradients(transposed):
    torch.manual_seed(0)
    mask = torch.rand(7, 5) < 0.3
    weight = (torch.randn(7, 5, dtype=torch.float64) * mask).requires_grad_()
    layer = CompactWeight("w", weight.detach(), mask, transposed)
    layer.values.requires_grad_()
    assert torch.equal(layer.dense(), weight.detach()) and torch.equal(layer.mask(), mask)
    x = torch.randn(2, 3, 7 if transposed else 5, dtype=torch.float64, requires_grad=True)
    bias = None if transposed else torch.randn(7, dtype=torch.float64, requires_grad=True)
    masker = Masker()
    masker.armed = True
    out = compact_linear(x, layer, masker, bias)
    reference = x @ weight if transposed else F.linear(x, weight, bias)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    inputs = [x, layer.values] + ([bias] if bias is not None else [])
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(reference, [x, weight] + ([bias] if bias is not None else []), grad)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(masker.grads["w"], want[1])  # the dense growth gradient, recorded
    torch.testing.assert_close(got[1], want[1][mask] if not transposed else want[1].t()[mask.t()])
    if bias is not None:
        torch.testing.assert_close(got[2], want[2])
    masker.armed = False  # not armed: the value gradient at the active positions only
    masker.clear()
    out = compact_linear(x, layer, masker, bias)
    again = torch.autograd.grad(out, [layer.values], grad)[0]
    torch.testing.assert_close(again, got[1])
    assert not masker.grads


def test_assign_keeps_kept_values_and_their_state_and_zeroes_new_ones():
    torch.manual_seed(1)
    mask = torch.rand(6, 8) < 0.4
    weight = torch.randn(6, 8) * mask
    layer = CompactWeight("w", weight, mask)
    state = layer.values.detach().clone() * 3  # a state tensor that follows the values
    flat = mask.reshape(-1).clone()
    on, off = flat.nonzero().flatten(), (~flat).nonzero().flatten()
    flat[on[:3]], flat[off[:3]] = False, True
    new = flat.view_as(mask)
    layer.assign(new, [state])
    dense = layer.dense()
    assert torch.equal(layer.mask(), new)
    assert torch.equal(dense[new & mask], weight[new & mask]) and bool(dense[new & ~mask].eq(0).all())
    torch.testing.assert_close(state, layer.values.detach() * 3)
    with pytest.raises(ValueError, match="keep their count"):
        layer.assign(mask & new)


# --- the same training in both layouts ------------------------------------------------------------


class Block(nn.Module):
    """A transformer block in small: q/k/v/out projections, attention by matmuls, an MLP, and a
    product by a bare weight parameter."""

    def __init__(self, width: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.head = nn.Parameter(torch.randn(width, classes) / width**0.5)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        attention = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        x = self.norm(x + self.o(attention @ v))
        x = x + self.down(F.gelu(self.up(x)))
        return x.mean(1) @ self.head


class Pointwise(nn.Module):
    """1x1 convolutions (stride 1 with a bias, stride 2 without) around a 3x3 one (which stays
    masked), as in a ResNet bottleneck or a MobileNet block, and a linear head."""

    def __init__(self, width: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(width, hidden, 1)
        self.spatial = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.reduce = nn.Conv2d(hidden, width, 1, stride=2, bias=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(F.relu(self.spatial(F.relu(self.expand(x)))))
        return self.head(x.mean((2, 3)))


def _model(kind: str, width: int, hidden: int, classes: int) -> tuple[nn.Module, torch.Tensor]:
    """A model of ``kind`` in float64 and a batch of 8 inputs for it."""
    if kind == "mlp":
        return _mlp(width, hidden, classes, 2).double(), torch.randn(8, width, dtype=torch.float64)
    if kind == "block":
        return Block(width, hidden, classes).double(), torch.randn(8, 4, width, dtype=torch.float64)
    return Pointwise(width, hidden, classes).double(), torch.randn(8, width, 6, 6, dtype=torch.float64)


def _mlp(width: int, hidden: int, classes: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(width, hidden), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, classes))


def _budget(model: nn.Module) -> dict:
    # ERK makes small 1x1 convolutions dense (nothing to compare): every layer at the density
    return {"init": "uniform", "dense": []} if isinstance(model, Pointwise) else {"init": "erk"}


def _train(model, layout, method, density, capture, x, y, steps=10, optimizer="adamw", kernel=None):
    sparse = fxsparse.sparsify(model, density, seed=5, example_inputs=x, capture=capture, layout=layout, **_budget(model))
    for fqn in sparse.masks:
        if kernel is not None and sparse.compact_layer(fqn) is not None:
            sparse.compact_layer(fqn).kernel = kernel
    opt = (torch.optim.AdamW(sparse.parameters(), lr=0.02) if optimizer == "adamw"
           else torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9))
    scheduler = fxsparse.RigLScheduler(sparse, opt, steps, delta_t=2, end_fraction=1.0, method=method)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(sparse(x), y)
        loss.backward()
        if scheduler.step():
            opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return sparse, losses


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["mlp", "block", "pointwise"]),
    width=st.integers(6, 20),
    hidden=st.integers(8, 40),
    density=st.sampled_from([0.05, 0.1, 0.3, 0.5]),
    method=st.sampled_from(["rigl", "set", "static"]),
    optimizer=st.sampled_from(["sgd", "momentum"]),
    seed=st.integers(0, 3),
    kernel=st.sampled_from(["numba", "torch"]),
)
def test_compact_and_masked_runs_make_the_same_decisions(kind, width, hidden, density, method, optimizer, seed, kernel):
    # SGD (with or without momentum) keeps the two layouts' rounding differences at float64's
    # level all run long; Adam normalizes each step by the gradient's own size, so that weights
    # grown together move by nearly equal amounts and their order is rounding's: AdamW is
    # compared update by update below instead
    torch.manual_seed(seed)
    model, x = _model(kind, width, hidden, 3)
    y = torch.randint(0, 3, (8,))
    masked, masked_losses = _train(model, "masked", method, density, "symbolic", x, y, optimizer=optimizer)
    compact, compact_losses = _train(model, {"*": "compact"}, method, density, "symbolic", x, y, optimizer=optimizer,
                                     kernel=kernel)
    assert any(c.layout == "compact" for c in compact.layouts.values())
    assert all(compact.compact_layer(f) is not None for f, c in compact.layouts.items() if c.layout == "compact")
    for fqn, mask in masked.masks.items():
        assert torch.equal(mask, compact.masks[fqn]), fqn
        torch.testing.assert_close(compact.sparse_weights[fqn], masked.sparse_weights[fqn].detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(compact_losses, masked_losses, rtol=1e-9, atol=1e-12)
    compact.verify()
    if method != "static" and max(s.active for s in masked._fxsparse.sites.values()) >= 20:
        # the topology moved, or the comparison proves little
        start = fxsparse.sparsify(model, density, seed=5, example_inputs=x, **_budget(model))
        assert any(not torch.equal(start.masks[f], m) for f, m in masked.masks.items())


@pytest.mark.parametrize("kind", ["mlp", "block", "pointwise"])
def test_adamw_updates_decide_alike(kind):
    """Every update, both layouts start from the masked run's weights (a checkpoint moved across
    layouts) and must choose the same masks."""
    torch.manual_seed(4)
    model, x = _model(kind, 24 if kind == "mlp" else 16, 48 if kind == "mlp" else 32, 3)
    y = torch.randint(0, 3, (8,))
    runs = {}
    for layout in ("masked", {"*": "compact"}):
        sparse = fxsparse.sparsify(model, 0.2, seed=5, layout=layout, **_budget(model))
        opt = torch.optim.AdamW(sparse.parameters(), lr=0.02)
        runs[str(layout)] = (sparse, opt, fxsparse.RigLScheduler(sparse, opt, 24, delta_t=3, end_fraction=1.0))
    (masked, masked_opt, masked_scheduler), (compact, compact_opt, compact_scheduler) = runs.values()
    updates = 0
    for step in range(1, 13):
        update = masked_scheduler.is_update_step(step)
        if update:
            compact.load_state_dict(masked.state_dict())  # the same weights, from the other layout
            before = {f: m.clone() for f, m in masked.masks.items()}
        for sparse, opt, scheduler in runs.values():
            F.cross_entropy(sparse(x), y).backward()
            if scheduler.step():
                opt.step()
            opt.zero_grad()
        if update:
            updates += 1
            for fqn, mask in masked.masks.items():
                assert torch.equal(mask, compact.masks[fqn]), (step, fqn)
            changed = any(not torch.equal(before[f], m) for f, m in masked.masks.items())
            assert changed, step
    assert updates >= 3
    assert sum(c.layout == "compact" for c in compact.layouts.values()) >= 2


@pytest.mark.parametrize("optimizer", ["adamw", "momentum"])
def test_a_topology_change_carries_values_and_optimizer_state_with_the_kept_connections(optimizer):
    sparse = _compact_mlp()
    opt = (torch.optim.AdamW(sparse.parameters(), lr=0.02) if optimizer == "adamw"
           else torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9))
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    for _ in range(3):
        F.cross_entropy(sparse(x), y).backward()
        opt.step()
        opt.zero_grad()

    def scattered(layer, tensor):  # a values-shaped tensor at its positions in the weight
        twin = copy.deepcopy(layer)
        twin.values.data = tensor.detach().clone()
        return twin.dense()

    layers = {f: sparse.compact_layer(f) for f in sparse.masks}
    names = ("exp_avg", "exp_avg_sq") if optimizer == "adamw" else ("momentum_buffer",)
    before = {f: (layer.mask(), layer.dense(), {n: scattered(layer, opt.state[layer.values][n]) for n in names})
              for f, layer in layers.items()}
    F.cross_entropy(sparse(x), y).backward()
    changes = sparse.rigl_step(0.3, opt)
    assert sum(c.grown for c in changes.values()) > 0
    for fqn, layer in layers.items():
        old_mask, old_values, old_state = before[fqn]
        mask = layer.mask()
        kept, new = mask & old_mask, mask & ~old_mask
        assert torch.equal(layer.dense()[kept], old_values[kept]) and bool(layer.dense()[new].eq(0).all())
        for name in names:
            state = scattered(layer, opt.state[layer.values][name])
            assert torch.equal(state[kept], old_state[name][kept]), (fqn, name)
            assert bool(state[new].eq(0).all()), (fqn, name)


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_both_front_ends_train_the_same_in_both_layouts(capture):
    torch.manual_seed(0)
    model = Block(12, 24, 3).double()
    x, y = torch.randn(6, 5, 12, dtype=torch.float64), torch.randint(0, 3, (6,))
    masked, a = _train(model, "masked", "rigl", 0.2, capture, x, y)
    compact, b = _train(model, "compact" if capture == "export" else {"*": "compact"}, "rigl", 0.2, capture, x, y)
    if capture == "export":  # timed: whichever wins; ask for every layer to compare all
        compact, b = _train(model, {"*": "compact"}, "rigl", 0.2, capture, x, y)
    assert sum(c.layout == "compact" for c in compact.layouts.values()) == 7  # q k v o up down head
    assert all(torch.equal(m, compact.masks[f]) for f, m in masked.masks.items())
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


# --- what users rely on ------------------------------------------------------------------------


def _compact_mlp(**kwargs):
    torch.manual_seed(0)
    return fxsparse.sparsify(_mlp(16, 32, 4, 2), 0.2, seed=1, layout={"*": "compact"}, **kwargs)


def test_compact_layers_hold_only_the_active_weights():
    torch.manual_seed(0)
    masked = fxsparse.sparsify(_mlp(16, 32, 4, 2), 0.2, seed=1)
    compact = _compact_mlp()
    dense_weights = sum(m.numel() for m in masked.masks.values())
    active = sum(int(m.sum()) for m in masked.masks.values())
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(masked) - count(compact) == dense_weights - active
    assert not any(n.endswith("_mask") for n, _ in compact.named_buffers(remove_duplicate=False))
    assert "compact" in str(compact.layouts["0.weight"])


def test_checkpoints_move_between_layouts_in_the_masked_format():
    torch.manual_seed(2)
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    compact, _ = _train(_mlp(16, 32, 4, 2), {"*": "compact"}, "rigl", 0.2, "symbolic", x, y)
    masked = fxsparse.sparsify(_mlp(16, 32, 4, 2), 0.2, seed=5)
    state = compact.state_dict()
    assert set(state) == set(masked.state_dict())
    assert all(state[site.mask].dtype == torch.bool for site in compact._fxsparse.sites.values())
    masked.load_state_dict(state)
    torch.testing.assert_close(masked(x), compact(x))
    fresh = _compact_mlp()
    fresh.load_state_dict(masked.state_dict())
    torch.testing.assert_close(fresh(x), compact(x))
    assert all(torch.equal(fresh.masks[f], m) for f, m in compact.masks.items())
    bad = dict(state)
    bad["0.weight_mask"] = torch.zeros_like(bad["0.weight_mask"])
    before = fresh.state_dict()
    with pytest.raises(StateDictError):
        fresh.load_state_dict(bad)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # untouched


def test_resume_gives_the_uninterrupted_runs_topology():
    torch.manual_seed(3)
    data = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(12)]

    def run(stop=None, resume=None):
        sparse = _compact_mlp()
        opt = torch.optim.AdamW(sparse.parameters(), lr=0.02)
        scheduler = fxsparse.RigLScheduler(sparse, opt, 12, delta_t=2, end_fraction=1.0)
        start = 0
        if resume is not None:
            sparse.load_state_dict(resume["model"])
            opt.load_state_dict(resume["opt"])
            scheduler.load_state_dict(resume["scheduler"])
            start = resume["step"]
        for step, (x, y) in enumerate(data[start:stop], start):
            F.cross_entropy(sparse(x), y).backward()
            if scheduler.step():
                opt.step()
            opt.zero_grad()
        return sparse, {"model": sparse.state_dict(), "opt": opt.state_dict(), "scheduler": scheduler.state_dict(),
                        "step": stop}

    whole, _ = run()
    _, checkpoint = run(stop=5)
    resumed, _ = run(resume=copy.deepcopy(checkpoint))
    assert all(torch.equal(whole.masks[f], resumed.masks[f]) for f in whole.masks)
    torch.testing.assert_close(resumed.state_dict(), whole.state_dict())


def test_copies_and_saved_modules_compute_the_same():
    sparse = _compact_mlp()
    x = torch.randn(5, 16)
    twin = copy.deepcopy(sparse)
    buffer = io.BytesIO()
    torch.save(sparse, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded):
        torch.testing.assert_close(other(x), sparse(x))
        assert other.compact_layer("0.weight") is not None
        other(x).sum().backward()  # trains
        assert other.compact_layer("0.weight").values.grad is not None


def test_bf16_autocast_trains_and_updates():
    sparse = _compact_mlp()
    opt = torch.optim.AdamW(sparse.parameters(), lr=0.01)
    scheduler = fxsparse.RigLScheduler(sparse, opt, 12, delta_t=2, end_fraction=1.0)
    torch.manual_seed(0)
    reference = fxsparse.sparsify(_mlp(16, 32, 4, 2), 0.2, seed=1)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(sparse(x).float(), reference(x).float(), rtol=0.05, atol=0.05)
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(sparse(x), y)
        loss.backward()
        if scheduler.step():
            opt.step()
        opt.zero_grad()
    assert scheduler.last_changes is not None and sum(c.grown for c in scheduler.last_changes.values()) > 0
    assert sparse.compact_layer("0.weight").values.dtype == torch.float32  # the parameters stay fp32
    sparse.verify()


def test_torch_compile_gives_the_eager_results():
    sparse = _compact_mlp()
    x = torch.randn(4, 16)
    compiled = torch.compile(sparse)
    torch.testing.assert_close(compiled(x), sparse(x))
    compiled(x).sum().backward()
    got = {n: p.grad.clone() for n, p in sparse.named_parameters()}
    sparse.zero_grad()
    sparse(x).sum().backward()
    for name, parameter in sparse.named_parameters():
        torch.testing.assert_close(got[name], parameter.grad)


def test_export_inference_takes_a_compact_module():
    sparse = _compact_mlp()
    x = torch.randn(4, 16)
    exported = fxsparse.export_inference(sparse, x, autotune=False)
    torch.testing.assert_close(exported(x), sparse.eval()(x))
    assert {c.weight for c in exported.fxsparse_choices} == set(sparse.masks)


# --- what compact layers refuse ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["snfs", "rigl-sg", "rigl-sm", "pruning"])
def test_methods_that_move_counts_refuse_compact_layers(method):
    sparse = _compact_mlp()
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="layout='masked'"):
        fxsparse.RigLScheduler(sparse, opt, 10, method=method, density=0.1)


def test_pruning_and_redistribution_refuse_compact_layers_before_any_change():
    sparse = _compact_mlp()
    before = {f: m.clone() for f, m in sparse.masks.items()}
    with pytest.raises(ValueError, match="fixed number"):
        sparse.prune({"0.weight": 3})
    sparse(torch.randn(4, 16)).sum().backward()
    with pytest.raises(ValueError, match="fixed number"):
        sparse.rigl_step(0.5, redistribute="score")
    assert all(torch.equal(before[f], m) for f, m in sparse.masks.items())


def test_bad_layouts_are_clear_errors():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, dilation=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    with pytest.raises(ValueError, match="expected layout"):
        fxsparse.sparsify(conv, 0.5, layout="sparse")
    with pytest.raises(ValueError, match="0.weight"):
        fxsparse.sparsify(conv, 0.5, layout={"0.weight": "compact"})
    chosen = fxsparse.sparsify(conv, 0.1, "uniform", dense=[], layout="compact")  # the dilated conv stays masked, with why
    assert chosen.layouts["0.weight"].layout == "masked" and "cannot be compact" in chosen.layouts["0.weight"].reason
    assert chosen.layouts["2.weight"].layout == "compact"  # by the density rule (no inputs to time)
    spatial = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    for density, layout in ((0.1, "masked"), (0.05, "compact")):  # a kxk convolution's rule: 0.05
        choice = fxsparse.sparsify(spatial, density, "uniform", dense=[], layout="compact").layouts["0.weight"]
        assert choice.layout == layout and "(no example_inputs to time on)" in choice.reason


def test_flops_and_model_size_count_a_compact_module_as_its_masked_twin():
    torch.manual_seed(0)
    model = _mlp(16, 32, 4, 2)
    x = torch.randn(4, 16)
    masked = fxsparse.sparsify(model, 0.2, seed=1, example_inputs=x)
    compact = fxsparse.sparsify(model, 0.2, seed=1, example_inputs=x, layout={"*": "compact"})
    assert fxsparse.flops(compact, x) == fxsparse.flops(masked, x) < fxsparse.flops(model, x)
    a, b = fxsparse.flop_report(masked, x), fxsparse.flop_report(compact, x)
    assert [(r.name, r.dense_flops, r.active_params) for r in a.rows] == [(r.name, r.dense_flops, r.active_params) for r in b.rows]
    assert (a.size_bytes, a.dense_size_bytes) == (b.size_bytes, b.dense_size_bytes)


def test_nan_in_a_compact_layers_values_is_refused_before_any_change():
    sparse = _compact_mlp()
    sparse(torch.randn(4, 16)).sum().backward()
    before = {f: m.clone() for f, m in sparse.masks.items()}
    with torch.no_grad():
        sparse.compact_layer("2.weight").values[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"2\.weight \(weights\)"):
        sparse.rigl_step(0.3)
    assert all(torch.equal(before[f], m) for f, m in sparse.masks.items())


# --- 1x1 convolutions ------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [(1, 1), (2, 1)])
def test_a_pointwise_convolution_is_its_compact_product_and_gradients(stride):
    torch.manual_seed(2)
    mask = torch.rand(6, 5, 1, 1) < 0.4
    weight = (torch.randn(6, 5, 1, 1, dtype=torch.float64) * mask).requires_grad_()
    layer = CompactWeight("w", weight.detach(), mask, stride=stride)
    layer.values.requires_grad_()
    assert torch.equal(layer.dense(), weight.detach()) and torch.equal(layer.mask(), mask)
    x = torch.randn(3, 5, 7, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    masker = Masker()
    masker.armed = True
    out = compact_linear(x, layer, masker, bias)
    reference = F.conv2d(x, weight, bias, stride)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, layer.values, bias], grad)
    want = torch.autograd.grad(reference, [x, weight, bias], grad)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(masker.grads["w"], want[1])  # recorded in the weight's shape
    torch.testing.assert_close(got[1], want[1][mask])
    torch.testing.assert_close(got[2], want[2])
    unbatched = compact_linear(x[0], layer, masker, bias)  # (C, H, W)
    torch.testing.assert_close(unbatched, reference[0])


def test_which_convolutions_can_be_compact():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.padded = nn.Conv2d(4, 8, 1, padding=1)  # stride 1: a kxk convolution with k = 1
            self.grouped = nn.Conv2d(8, 8, 1, groups=2)
            self.pointwise = nn.Conv2d(8, 8, 1, stride=2)
            self.shared = nn.Conv2d(8, 8, 1)  # read at two strides: stays masked
            self.spatial = nn.Conv2d(8, 8, 3)
            self.same = nn.Conv2d(8, 8, 3, padding="same")
            self.strided = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.pointwise(self.grouped(self.padded(x)))
            x = self.shared(x) + F.conv2d(x, self.shared.weight, stride=1)
            y = F.conv2d(x, self.shared.weight, stride=2)
            z = self.dilated(self.same(x)) + self.strided(x).mean() + self.spatial(x).mean()
            return z.mean((2, 3)) + y.mean((2, 3))

    x = torch.randn(2, 4, 9, 9)
    for capture in ("symbolic", "export"):
        sparse = fxsparse.sparsify(Net(), 0.2, "uniform", dense=[], example_inputs=(x,), capture=capture,
                                   layout={"*": "compact"})
        chosen = {f: c.layout for f, c in sparse.layouts.items()}
        assert chosen == {"padded.weight": "compact", "grouped.weight": "masked", "pointwise.weight": "compact",
                          "shared.weight": "masked", "spatial.weight": "compact", "same.weight": "compact",
                          "strided.weight": "compact", "dilated.weight": "masked"}, capture
        assert sparse.compact_layer("same.weight").padding == (1, 1)
        masked = fxsparse.sparsify(Net(), 0.2, "uniform", dense=[], example_inputs=(x,), capture=capture)
        masked.load_state_dict(sparse.state_dict())
        sparse.eval(), masked.eval()
        torch.testing.assert_close(sparse(x), masked(x))
        assert sparse.compact_layer("strided.weight").conv_stride == (2, 2)
        with pytest.raises(ValueError, match="kxk convolution without dilation"):
            fxsparse.sparsify(Net(), 0.2, dense=[], example_inputs=(x,), capture=capture, layout={"dilated.weight": "compact"})


def test_a_pointwise_compact_module_checkpoints_counts_and_exports_as_its_masked_twin():
    torch.manual_seed(0)
    model = Pointwise(8, 16, 3)
    x = torch.randn(4, 8, 6, 6)
    masked = fxsparse.sparsify(model, 0.2, "uniform", seed=1, example_inputs=x, dense=[])
    compact = fxsparse.sparsify(model, 0.2, "uniform", seed=1, example_inputs=x, dense=[], layout={"*": "compact"})
    assert {f for f, c in compact.layouts.items() if c.layout == "compact"} == {"expand.weight", "spatial.weight", "reduce.weight",
                                                                               "head.weight"}
    assert fxsparse.flops(compact, x) == fxsparse.flops(masked, x)
    assert fxsparse.flop_report(compact, x).size_bytes == fxsparse.flop_report(masked, x).size_bytes
    state = masked.state_dict()
    compact.load_state_dict(state)
    assert compact.state_dict().keys() == state.keys()
    assert all(torch.equal(compact.state_dict()[k], v) for k, v in state.items())
    masked.eval(), compact.eval()
    torch.testing.assert_close(compact(x), masked(x))
    torch.testing.assert_close(fxsparse.export_inference(compact, x)(x), masked(x), rtol=1e-5, atol=1e-6)


class Spatial(nn.Module):
    """A CIFAR block in small: 3x3 convolutions (padding 1, and a 5x5 one without), a strided one
    (on the input's phases), batch norm, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 5, padding=2, bias=False)
        self.norm = nn.BatchNorm2d(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.norm(self.conv(x))) + x
        return self.head(self.down(x).mean((2, 3)))


@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_kxk_compact_convolutions_train_count_checkpoint_and_export_as_their_masked_twin(kernel):
    torch.manual_seed(0)
    model = Spatial().double()
    x, y = torch.randn(6, 3, 10, 10, dtype=torch.float64), torch.randint(0, 10, (6,))
    masked, masked_losses = _train(model, "masked", "rigl", 0.2, "symbolic", x, y)
    compact, compact_losses = _train(model, {"*": "compact"}, "rigl", 0.2, "symbolic", x, y, kernel=kernel)
    chosen = {f for f, c in compact.layouts.items() if c.layout == "compact"}
    assert {"stem.weight", "conv.weight", "down.weight"} <= chosen  # (the head: ERK may keep it dense)
    assert masked.get_buffer("fxsparse_updates").item() > 0
    for fqn, mask in masked.masks.items():
        assert torch.equal(mask, compact.masks[fqn]), fqn
    torch.testing.assert_close(compact_losses, masked_losses, rtol=1e-9, atol=1e-12)
    compact.verify()
    x = x.float()
    masked, compact = masked.float(), compact.float()
    assert fxsparse.flops(compact, x) == fxsparse.flops(masked, x)
    masked.eval(), compact.eval()
    torch.testing.assert_close(compact(x), masked(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fxsparse.export_inference(compact, x)(x), masked(x), rtol=1e-5, atol=1e-6)


def test_a_compact_addmm_weight_keeps_its_bias_in_export_and_flops():
    """transformers' Conv1D computes addmm(b, x, W): the exported module adds b too."""

    class Conv1D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(16, 32)), nn.Parameter(torch.randn(32))
            self.head = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.addmm(self.bias, x, self.weight))

    x = torch.randn(4, 16)
    compact = fxsparse.sparsify(Conv1D(), 0.2, "uniform", example_inputs=x, dense=[], layout={"*": "compact"}).eval()
    masked = fxsparse.sparsify(Conv1D(), 0.2, "uniform", example_inputs=x, dense=[]).eval()
    assert compact.layouts["weight"].layout == "compact"
    torch.testing.assert_close(fxsparse.export_inference(compact, x)(x), compact(x))
    assert fxsparse.flops(compact, x) == fxsparse.flops(masked, x)


def test_the_timing_times_each_kind_of_convolution_as_it_computes():
    """The masked step timed against a compact one computes the layer's own convolution (its
    stride and padding): a strided 3x3 one on a 2x2 input (which only its padding makes
    computable), a padded 3x3 one, a 1x1 one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(32, 16, 1, stride=2))
    x = torch.randn(4, 16, 2, 2)
    sparse = fxsparse.sparsify(model, 0.05, "uniform", dense=[], example_inputs=x, layout="compact")
    masked = fxsparse.sparsify(model, 0.05, "uniform", dense=[], example_inputs=x)
    for fqn in ("0.weight", "2.weight", "4.weight"):
        choice = sparse.layouts[fqn]
        assert choice.reason == "timed on example_inputs" and {"masked", "compact"} <= set(choice.ms), fqn
    torch.testing.assert_close(sparse(x), masked(x), rtol=1e-5, atol=1e-6)


def test_the_timing_chooses_for_pointwise_convolutions_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 256, 1), nn.ReLU(), nn.Conv2d(256, 64, 1))
    sparse = fxsparse.sparsify(model, 0.05, "uniform", dense=[], example_inputs=torch.randn(8, 64, 16, 16), layout="compact")
    for fqn in ("0.weight", "2.weight"):
        choice = sparse.layouts[fqn]
        assert choice.reason == "timed on example_inputs"
        assert set(choice.ms) == {"masked", "compact", "compact/numba", "compact/torch"}
        assert choice.ms["compact"] == min(choice.ms["compact/numba"], choice.ms["compact/torch"])
        assert (choice.layout == "compact") == (choice.ms["compact"] <= 0.95 * choice.ms["masked"])
        if choice.layout == "compact":
            fastest = min(("numba", "torch"), key=lambda k: choice.ms[f"compact/{k}"])
            assert choice.kernel == fastest == sparse.compact_layer(fqn).kernel


# --- the compact update step -----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), density=st.sampled_from([0.1, 0.4, 0.9]),
       transposed=st.booleans(), chunk=st.integers(1, 50), count=st.integers(0, 20), seed=st.integers(0, 10**6))
def test_candidates_made_block_by_block_are_the_dense_gradients(rows, cols, density, transposed, chunk, count, seed):
    from fxsparse.topology import growth_candidates

    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=generator) < density
    # ties on purpose (rounded gradients), so that the position order matters
    grad = torch.round(torch.randn(rows, cols, generator=generator, dtype=torch.float64) * 2) / 2
    layer = CompactWeight("w", torch.randn(rows, cols, dtype=torch.float64) * mask, mask, transposed)
    got = layer.growth_candidates(lambda r0, r1: grad[r0:r1], count, chunk_elements=chunk)
    want = growth_candidates(mask, grad, count)
    order = lambda c: sorted(zip((-c.keys).tolist(), c.index.tolist()))  # noqa: E731
    assert order(got) == order(want)
    assert got.active.tolist() == want.active.tolist() and got.finite == want.finite


def test_an_armed_compact_step_keeps_growth_candidates_not_the_dense_gradient():
    sparse = _compact_mlp()
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    scheduler = fxsparse.RigLScheduler(sparse, opt, 100, delta_t=2, end_fraction=1.0)
    compact = [f for f, c in sparse.layouts.items() if c.layout == "compact"]
    assert compact
    x = torch.randn(8, 16)
    sparse(x).sum().backward()  # step 1: ordinary (one backward seen: candidates from now on)
    assert scheduler.step() and not sparse.masker.candidates
    opt.zero_grad()
    sparse(x).sum().backward()  # step 2: an update step
    assert set(compact) <= set(sparse.masker.candidates) and not set(compact) & set(sparse.masker.grads)
    before = {f: sparse.masks[f].clone() for f in compact}
    assert scheduler.step() is False  # the update ran, from the candidates
    assert any(not torch.equal(before[f], sparse.masks[f]) for f in compact)
    sparse.verify()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["linear", "transposed", "strided"]), density=st.sampled_from([0.1, 0.3, 0.7]),
       fraction=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 10**6))
def test_moving_by_the_updates_indices_is_assigning_its_mask(kind, density, fraction, seed):
    """The update step moves a compact layer by the update's dropped and grown positions (no dense
    mask): the same structure, values and state as assigning the new mask."""
    from fxsparse.topology import update_mask

    generator = torch.Generator().manual_seed(seed)
    shape = (6, 5) if kind != "strided" else (4, 3, 3, 3)
    mask = torch.rand(shape, generator=generator) < density
    weight = torch.randn(shape, generator=generator) * mask
    options = {"stride": (2, 2), "padding": (1, 1)} if kind == "strided" else {}
    layers = [CompactWeight("w", weight, mask, kind == "transposed", **options) for _ in range(2)]
    update = update_mask(mask, weight, torch.randn(shape, generator=generator), fraction, absolute=True)
    states = [[layer.values.detach().clone() * 2, layer.values.detach().clone() + 1] for layer in layers]
    layers[0].assign(update.mask, states[0])
    layers[1].move(update.dropped_idx, update.grown_idx, states[1])
    for name in ("values", "crow", "col", "t_crow", "t_col", "t_perm"):
        assert torch.equal(getattr(layers[0], name), getattr(layers[1], name)), name
    for a, b in zip(*states):
        assert torch.equal(a, b)
    assert torch.equal(layers[1].mask(), update.mask)
