"""prune_oneshot: each layer's top weights by magnitude or by Wanda's score, at sparsify's budgets.

The references are brute force: scores computed by hand (|W|, and |W| times the norm of the
inputs forward hooks record on a copy of the model), ranked by a full sort with the documented
tie order (score descending, flat index ascending).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.oneshot import prune_oneshot

CAPTURES = ("symbolic", "export")


class Proj(nn.Module):
    """``x @ w`` with ``w`` of shape (in, out): the weight is the matmul's right operand."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(features, out) / features**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


class Net(nn.Module):
    """A strided, padded convolution, a linear layer and a right-operand matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 24)
        self.proj = Proj(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.proj(torch.relu(self.fc1(h)))


ROW_AXES = {"conv.weight": 0, "fc1.weight": 0, "proj.w": 1}  # the axis of output units


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net()


def _batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(n)]


def _reference_top(score: torch.Tensor, count: int, axis: int | None = None) -> torch.Tensor:
    """Brute force: a full sort by (score descending, index ascending); with ``axis``, per slice,
    ``count`` split evenly and the remainder to the slices whose next entry scores highest."""
    if axis is None:
        flat = score.reshape(-1).tolist()
        keep = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:count]
        mask = torch.zeros(len(flat), dtype=torch.bool)
        mask[keep] = True
        return mask.view(score.shape)
    rows = score.movedim(axis, 0).reshape(score.shape[axis], -1).tolist()
    base, extra = divmod(count, len(rows))
    ranked = [sorted(range(len(r)), key=lambda i, r=r: (-r[i], i)) for r in rows]
    bonus = sorted(range(len(rows)), key=lambda j: (-rows[j][ranked[j][base]] if extra else 0, j))[:extra]
    mask = torch.zeros(len(rows), len(rows[0]), dtype=torch.bool)
    for j, order in enumerate(ranked):
        mask[j, order[: base + (j in bonus)]] = True
    moved = score.movedim(axis, 0).shape
    return mask.reshape(moved).movedim(0, axis)


def _input_norms(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``||X_j||^2`` of every weight entry, W-shaped, from inputs recorded by forward hooks on a
    copy of ``model`` (float64): conv patches unfolded with the layer's stride and padding."""
    probe = copy.deepcopy(model).eval().double()
    sums: dict[str, torch.Tensor] = {}

    def hook(name, module, inputs, output):
        x = inputs[0].detach()
        if isinstance(module, nn.Conv2d):
            cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
            norm = cols.square().sum((0, 2)).view(module.weight.shape[1:]).expand_as(module.weight)
        elif isinstance(module, nn.Linear):
            norm = x.square().reshape(-1, x.shape[-1]).sum(0).expand_as(module.weight)
        else:  # Proj and transformers' Conv1D: x @ w, w of shape (in, out)
            weight = module.w if isinstance(module, Proj) else module.weight
            norm = x.square().reshape(-1, x.shape[-1]).sum(0).unsqueeze(1).expand_as(weight)
        key = f"{name}.w" if isinstance(module, Proj) else f"{name}.weight"
        sums[key] = sums.get(key, 0) + norm

    handles = [m.register_forward_hook(lambda m, i, o, n=n: hook(n, m, i, o)) for n, m in probe.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, Proj)) or type(m).__name__ == "Conv1D"]
    with torch.no_grad():
        for batch in batches:
            if isinstance(batch, dict):
                probe(**{k: v for k, v in batch.items()})
            else:
                probe(batch.double())
    for h in handles:
        h.remove()
    return sums


def _wanda_reference(model, batches, counts, group="row", axes=ROW_AXES):
    norms = _input_norms(model, batches)
    params = dict(model.named_parameters())
    return {fqn: _reference_top(params[fqn].detach().double().abs() * norms[fqn].sqrt(), count,
                                axes[fqn] if group == "row" else None) for fqn, count in counts.items()}


def _zeroed_by_hand(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for fqn, mask in masks.items():
            pruned.get_parameter(fqn).mul_(mask)
    return pruned


def _counts(sparse) -> dict[str, int]:
    return {fqn: int(mask.sum()) for fqn, mask in sparse.masks.items()}


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("group", ["layer", "row"])
def test_magnitude_keeps_each_layers_largest_weights_at_sparsifys_counts(capture, group):
    model = _net()
    before = copy.deepcopy(model.state_dict())
    x = _batches(1)[0]
    sparse = prune_oneshot(model, 0.3, "erk", group=group, capture=capture, example_inputs=x)
    random = fxsparse.sparsify(model, 0.3, "erk", capture=capture, example_inputs=x)
    assert _counts(sparse) == _counts(random)  # the same budgets, exactly
    for fqn, count in _counts(random).items():
        weight = model.get_parameter(fqn).detach().abs()
        expected = _reference_top(weight, count, ROW_AXES[fqn] if group == "row" else None)
        assert torch.equal(sparse.masks[fqn], expected), fqn
        torch.testing.assert_close(sparse.sparse_weights[fqn].detach(), model.get_parameter(fqn).detach() * expected)
    sparse.verify()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # yours untouched
    model.eval(), sparse.eval()
    torch.testing.assert_close(sparse(x), _zeroed_by_hand(model, sparse.masks)(x))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("group", ["layer", "row"])
def test_wanda_scores_by_weight_times_input_norm_one_pass(capture, group):
    model, batches = _net(), _batches()
    before = copy.deepcopy(model.state_dict())
    sparse = prune_oneshot(model, 0.5, "uniform", dense=[], score="wanda", calibration=batches, group=group,
                           sequential=False, capture=capture, example_inputs=batches[0])
    assert sparse.capture == capture and sparse.training  # the model's mode, its front-end
    counts = _counts(fxsparse.sparsify(model, 0.5, "uniform", dense=[], capture=capture, example_inputs=batches[0]))
    assert _counts(sparse) == counts
    expected = _wanda_reference(model, batches, counts, group)
    for fqn in counts:
        assert torch.equal(sparse.masks[fqn], expected[fqn]), fqn
    if group == "row":  # per output unit: the layer's count split as evenly as possible
        for fqn, mask in sparse.masks.items():
            per_row = mask.movedim(ROW_AXES[fqn], 0).reshape(mask.shape[ROW_AXES[fqn]], -1).sum(1)
            assert int(per_row.max() - per_row.min()) <= 1 and int(per_row.sum()) == counts[fqn], fqn
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = batches[0]
    model.eval(), sparse.eval()
    torch.testing.assert_close(sparse(x), _zeroed_by_hand(model, sparse.masks)(x))


def test_sequential_scores_each_layer_on_activations_of_the_earlier_layers_pruned():
    model, batches = _net(), _batches()
    kw = dict(score="wanda", calibration=batches, group="layer", dense=[])
    seq = prune_oneshot(model, 0.3, "uniform", sequential=True, **kw)
    one = prune_oneshot(model, 0.3, "uniform", sequential=False, **kw)
    counts = _counts(seq)
    dense = _wanda_reference(model, batches, counts, "layer")
    assert all(torch.equal(one.masks[f], dense[f]) for f in counts)  # one pass: the dense model's inputs
    # the first layer sees the model's input either way
    assert torch.equal(seq.masks["conv.weight"], one.masks["conv.weight"])
    after_conv = _zeroed_by_hand(model, {"conv.weight": seq.masks["conv.weight"]})
    assert torch.equal(seq.masks["fc1.weight"], _wanda_reference(after_conv, batches, counts, "layer")["fc1.weight"])
    after_fc1 = _zeroed_by_hand(model, {f: seq.masks[f] for f in ("conv.weight", "fc1.weight")})
    assert torch.equal(seq.masks["proj.w"], _wanda_reference(after_fc1, batches, counts, "layer")["proj.w"])
    assert not torch.equal(seq.masks["fc1.weight"], one.masks["fc1.weight"])  # and that differs here


class Reshaped(nn.Module):
    """A weight read through a reshape (``x @ w.reshape(24, 10)``) and one read by einsum."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(10, 24))
        self.e = nn.Parameter(torch.randn(5, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,oi->bo", x @ self.w.reshape(24, 10), self.e)


def test_wanda_follows_any_view_and_refuses_what_it_cannot_score():
    torch.manual_seed(0)
    model = Reshaped()
    batches = [torch.randn(8, 24) for _ in range(2)]
    with pytest.raises(ValueError, match=r"score='wanda' needs .*\['e'\].*exclude="):
        prune_oneshot(model, 0.5, "uniform", dense=[], score="wanda", calibration=batches)
    sparse = prune_oneshot(model, 0.5, "uniform", dense=[], score="wanda", calibration=batches, group="layer",
                           exclude=["e"])
    norms = sum(b.double().square().sum(0) for b in batches)  # per row of the (24, 10) view
    score = (model.w.detach().double().reshape(24, 10).abs() * norms.sqrt().unsqueeze(1)).reshape(10, 24)
    assert torch.equal(sparse.masks["w"], _reference_top(score, 120))
    with pytest.raises(ValueError, match=r"group='row'.*\['w'\].*group='layer'"):
        prune_oneshot(model, 0.5, "uniform", dense=[], score="wanda", calibration=batches, exclude=["e"])
    magnitude = prune_oneshot(model, 0.5, "uniform", dense=[])  # |W| needs no product
    assert torch.equal(magnitude.masks["e"], _reference_top(model.e.detach().abs(), 25))


def test_ties_are_broken_by_ascending_index():
    model = nn.Sequential(nn.Linear(6, 4))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    layer = prune_oneshot(model, 0.25, "uniform", dense=[]).masks["0.weight"]
    assert layer.reshape(-1).nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 5]
    rows = prune_oneshot(model, 7 / 24, "uniform", dense=[], group="row").masks["0.weight"]
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[:3, :2] = True  # the remainder to the first rows on equal scores, each its first entries
    expected[3, 0] = True
    assert torch.equal(rows, expected)


def test_fine_tuning_afterwards_keeps_the_masks_with_static():
    model, batches = _net(), _batches()
    sparse = prune_oneshot(model, 0.3, "uniform", score="wanda", calibration=batches)
    masks = {f: m.clone() for f, m in sparse.masks.items()}
    opt = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    scheduler = fxsparse.TopologyScheduler(sparse, opt, total_steps=6, delta_t=2, end_fraction=1.0, method="static")
    y = torch.randint(0, 10, (4,))
    for batch in batches * 2:
        F.cross_entropy(sparse(batch), y).backward()
        if scheduler.step():
            opt.step()
        opt.zero_grad()
    sparse.verify()
    assert all(torch.equal(sparse.masks[f], m) for f, m in masks.items())


def test_a_compact_layout_is_applied_after_the_masks_are_chosen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    batches = [torch.randn(8, 16) for _ in range(2)]
    masked = prune_oneshot(model, 0.2, "uniform", dense=[], score="wanda", calibration=batches)
    compact = prune_oneshot(model, 0.2, "uniform", dense=[], score="wanda", calibration=batches,
                            layout={"*": "compact"})
    assert {c.layout for c in compact.layouts.values()} == {"compact"}
    assert all(torch.equal(compact.masks[f], m) for f, m in masked.masks.items())
    torch.testing.assert_close(compact(batches[0]), masked(batches[0]))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(score="snip"), r"expected score to be one of \('magnitude', 'wanda'\), got 'snip'"),
    (dict(score="wanda"), r"calibration=\[batch, ...\].*got None; or use score='magnitude'"),
    (dict(score="wanda", calibration=[]), "got an empty iterable"),
    (dict(density=None), r"expected a density in \(0, 1\].*sparsify\(model, None, 'zeros'\)"),
    (dict(init="zeros"), "an init other than 'zeros'"),
    (dict(group="column"), r"expected group to be one of \('layer', 'row'\)"),
    (dict(density=1.5), "density"),
    (dict(layout="sparse"), "expected layout"),
])
def test_bad_calls_are_clear_errors_and_change_nothing(kwargs, message):
    model = _net()
    before = copy.deepcopy(model.state_dict())
    kwargs = {"density": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        prune_oneshot(model, kwargs.pop("density"), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_wanda_on_a_transformers_model_through_torch_export():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16, use_cache=False,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": (ids := torch.randint(0, 50, (4, 12), generator=gen)), "labels": ids} for _ in range(3)]
    before = copy.deepcopy(model.state_dict())
    sparse = prune_oneshot(model, 0.5, "uniform", dense=[], score="wanda", calibration=batches, sequential=False)
    assert sparse.capture == "export"  # the first batch was the example input; symbolic tracing cannot follow GPT-2
    counts = _counts(sparse)  # uniform, every layer sparse: exactly half of each (sparsify's budgets)
    assert len(counts) == 8 and all(2 * n == sparse.masks[f].numel() for f, n in counts.items())
    expected = _wanda_reference(model, batches, counts, "row", axes=dict.fromkeys(counts, 1))  # Conv1D: (in, out)
    for fqn in counts:
        assert torch.equal(sparse.masks[fqn], expected[fqn]), fqn
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval(), sparse.eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(**batches[0]).logits, _zeroed_by_hand(model, sparse.masks)(**batches[0]).logits)
    seq = prune_oneshot(model, 0.5, "uniform", dense=[], score="wanda", calibration=batches)  # sequential, the default
    assert _counts(seq) == counts
    assert torch.equal(seq.masks["transformer.h.0.attn.c_attn.weight"], sparse.masks["transformer.h.0.attn.c_attn.weight"])
