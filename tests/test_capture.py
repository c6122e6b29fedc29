"""The torch.export front-end: what it captures, the modes, the names, the inputs, the errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from invariants import assert_inactive_no_influence, assert_inactive_zero_grad, train_step


class ShapeBranch(nn.Module):
    """Shape-dependent Python control flow: symbolic tracing cannot follow it, export can."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if h.shape[-1] > 8:  # a Proxy cannot be a bool
            h = h * 2
        return self.b(h)


class Modal(nn.Module):
    """Everything that bakes the mode into an exported graph: dropout, batch norm, an
    ``if self.training`` of its own and SDPA's dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        if self.training:
            h = h + 1.0  # stands in for stochastic depth and the like
        h = self.drop(h).flatten(2).transpose(1, 2)  # (N, HW, C)
        h = F.scaled_dot_product_attention(self.q(h), self.k(h), h, dropout_p=0.3 if self.training else 0.0)
        return self.head(h.mean(1))


class Products(nn.Module):
    """Raw parameters through every ATen product torch.export emits: addmm (GPT-2's Conv1D),
    bmm, einsum, matmul of a transposed view, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.w_addmm = nn.Parameter(torch.randn(6, 12) * 0.3)
        self.b_addmm = nn.Parameter(torch.zeros(12))
        self.w_bmm = nn.Parameter(torch.randn(2, 6, 6) * 0.3)
        self.w_einsum = nn.Parameter(torch.randn(6, 6) * 0.3)
        self.w_matmul = nn.Parameter(torch.randn(6, 6) * 0.3)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 6)
        h = torch.addmm(self.b_addmm, x, self.w_addmm)[:, :6]
        h = torch.bmm(torch.stack([h, h]), self.w_bmm).mean(0)
        h = torch.tanh(torch.einsum("ni,oi->no", h, self.w_einsum))
        h = h @ self.w_matmul.t()
        return self.out(h)


class Keyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(torch.relu(self.proj(x)) * scale)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class TiedLM(nn.Module):
    """A language model whose head is its input embedding (GPT-2 style)."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_export_and_symbolic_give_the_same_masks_outputs_and_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x = torch.randn(4, 3, 8, 8)
    symbolic = fxsparse.sparsify(net, 0.3, seed=2, capture="symbolic")
    exported = fxsparse.sparsify(net, 0.3, seed=2, example_inputs=x, capture="export")
    assert (symbolic.capture, exported.capture) == ("symbolic", "export")
    assert list(exported.masks) == list(symbolic.masks) == ["0.weight", "3.weight"]  # the model's own FQNs
    for fqn in symbolic.masks:
        assert torch.equal(symbolic.masks[fqn], exported.masks[fqn])
    assert [n for n, _ in exported.named_parameters()] == [n for n, _ in net.named_parameters()]
    out_s, out_e = symbolic(x), exported(x)
    torch.testing.assert_close(out_e, out_s)
    out_s.square().sum().backward()
    out_e.square().sum().backward()
    for fqn in symbolic.masks:
        torch.testing.assert_close(exported.get_parameter(fqn).grad, symbolic.get_parameter(fqn).grad)
    assert_inactive_zero_grad(exported)
    assert_inactive_no_influence(exported, x)


def test_auto_falls_back_to_export_when_tracing_fails_and_inputs_are_given():
    x = torch.randn(3, 8)
    sparse = fxsparse.sparsify(ShapeBranch(), 0.5, example_inputs=x)
    assert sparse.capture == "export"
    assert set(sparse.masks) == {"a.weight", "b.weight"}
    assert sparse(torch.randn(7, 8)).shape == (7, 4)  # dynamic batch size
    with pytest.raises(TypeError, match="example_inputs"):  # without inputs: the hint
        fxsparse.sparsify(ShapeBranch(), 0.5)
    with pytest.raises(TypeError, match="trace symbolically"):
        fxsparse.sparsify(ShapeBranch(), 0.5, example_inputs=x, capture="symbolic")


def test_bad_capture_arguments_are_clear_errors_and_leave_the_model_untouched():
    model = ShapeBranch().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="capture="):
        fxsparse.sparsify(model, 0.5, capture="jit")
    with pytest.raises(ValueError, match="example_inputs"):
        fxsparse.sparsify(model, 0.5, capture="export")
    with pytest.raises(TypeError, match="torch.export can capture"):
        fxsparse.sparsify(model, 0.5, example_inputs=torch.randn(3, 5), capture="export")  # wrong width
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_each_mode_runs_the_graph_captured_in_that_mode():
    torch.manual_seed(0)
    model = Modal()
    x = torch.randn(4, 3, 5, 5)
    sparse = fxsparse.sparsify(model, 1.0, example_inputs=x, capture="export")
    reference = copy.deepcopy(model)
    # eval: deterministic, equal to the eager model in eval
    sparse.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), reference(x))
        torch.testing.assert_close(sparse(torch.randn(2, 3, 5, 5).mul(0)), reference(torch.randn(2, 3, 5, 5).mul(0)))
    stats = sparse.get_buffer("bn.running_mean").clone()
    with torch.no_grad():
        sparse(x)
    assert torch.equal(sparse.get_buffer("bn.running_mean"), stats)  # eval leaves the statistics alone
    # train: the same random draws give the eager model's train-mode output (branch and dropouts)
    sparse.train()
    reference.train()
    torch.manual_seed(5)
    out = sparse(x)
    torch.manual_seed(5)
    expected = reference(x)
    torch.testing.assert_close(out, expected)
    assert not torch.equal(sparse.get_buffer("bn.running_mean"), stats)  # train updates them
    torch.testing.assert_close(sparse.get_buffer("bn.running_mean"), reference.bn.running_mean)
    # and back: switching twice costs one recompile each, the outputs follow
    sparse.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), reference(x))


def test_every_aten_product_of_a_raw_parameter_is_found_and_masked():
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    sparse = fxsparse.sparsify(Products(), 0.5, example_inputs=x, capture="export")
    assert set(sparse.masks) == {"w_addmm", "w_bmm", "w_einsum", "w_matmul", "out.weight"}
    assert not [name for name, _ in sparse.skipped]
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    train_step(sparse, opt, x)
    assert_inactive_zero_grad(sparse)
    assert_inactive_no_influence(sparse, x)
    sparse.rigl_step(0.3)
    sparse.verify()


def test_keyword_inputs_and_dict_outputs():
    torch.manual_seed(0)
    batch = {"x": torch.randn(3, 4), "scale": torch.ones(3, 1), "labels": torch.tensor([0, 1, 1])}
    sparse = fxsparse.sparsify(Keyword(), 0.5, example_inputs=batch)
    assert sparse.capture == "export"  # keyword inputs: symbolic tracing takes positional ones
    out = sparse(**batch)
    assert set(out) == {"logits", "loss"}
    out["loss"].backward()
    assert_inactive_zero_grad(sparse)
    other = {"x": torch.randn(6, 4), "scale": torch.ones(6, 1), "labels": torch.zeros(6, dtype=torch.long)}
    assert sparse(**other)["logits"].shape == (6, 2)
    args, kwargs = sparse.example_inputs()
    assert args == () and kwargs["x"].shape == (3, 4)
    assert sparse.summary().has_flops


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_a_tied_embedding_stays_dense_unless_asked_and_then_has_one_mask(capture):
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (2, 5))
    default = fxsparse.sparsify(TiedLM(), 0.5, example_inputs=ids, capture=capture)
    assert "embed.weight" not in default.masks
    assert "embed.weight" in dict(default.skipped) and "embeddings=True" in dict(default.skipped)["embed.weight"]
    tied = fxsparse.sparsify(TiedLM(), 0.5, example_inputs=ids, capture=capture, embeddings=True)
    assert set(tied.masks) == {"embed.weight", "mix.weight"}  # one mask for both names
    mask = tied.masks["embed.weight"]
    # the lookup reads the masked table: perturbing inactive entries changes nothing
    assert_inactive_no_influence(tied, ids)
    tied.train()
    tied(ids).square().mean().backward()
    assert bool(tied.get_parameter("embed.weight").grad[~mask].eq(0).all())
    assert tied.get_parameter("head.weight") is tied.get_parameter("embed.weight")


def test_copies_pickles_and_state_dicts_of_an_exported_module():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    sparse = fxsparse.sparsify(Modal(), 0.3, example_inputs=x, capture="export").eval()
    with torch.no_grad():
        expected = sparse(x)
    twin = copy.deepcopy(sparse)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), expected)
    twin.train()
    train_step(twin, torch.optim.SGD(twin.parameters(), lr=0.1), x)
    assert_inactive_zero_grad(twin)
    buffer = io.BytesIO()
    torch.save(sparse, buffer)  # whole: the graphs of both modes travel as data
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert loaded.capture == "export" and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)
    loaded.train()
    train_step(loaded, torch.optim.SGD(loaded.parameters(), lr=0.1), x)
    assert_inactive_zero_grad(loaded)
    assert all(torch.equal(loaded.masks[f], m) for f, m in sparse.masks.items())
    fresh = fxsparse.sparsify(Modal(), 0.3, seed=7, example_inputs=x, capture="export")
    fresh.load_state_dict(sparse.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected)
    for fqn in sparse.masks:
        assert torch.equal(fresh.masks[fqn], sparse.masks[fqn])


def test_export_inference_lowers_the_aten_layers_of_an_exported_module_in_eval_mode():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10),
    )
    x = torch.randn(4, 3, 8, 8)
    sparse = fxsparse.sparsify(net, 0.1, example_inputs=x, capture="export")
    train_step(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), x)  # train mode: BN statistics move
    exported = fxsparse.export_inference(sparse, x, repeats=1)
    assert sparse.training  # the user's module keeps its mode
    assert {c.weight for c in exported.fxsparse_choices} == {"0.weight", "5.weight", "7.weight"}
    sparse.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), sparse(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(exported(x[:1]), sparse(x[:1]), rtol=1e-5, atol=1e-6)


class Blocks(nn.Module):
    """Weights read inside ``no_grad`` / ``enable_grad`` / ``autocast`` blocks, nested: torch.export
    wraps each block in a higher-order op whose subgraph hides the read."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen, self.inner = nn.Linear(8, 8), nn.Linear(8, 8)
        self.low, self.full = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.frozen(x)  # a teacher / EMA-style read: no gradient
            with torch.enable_grad():
                h = torch.tanh(self.inner(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = self.low(h)
            with torch.autocast("cpu", enabled=False):
                full = self.full(h + target)
        return full + low.float().mean(-1, keepdim=True)


def test_weights_inside_grad_mode_and_autocast_blocks_are_found_masked_and_counted():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    model = Blocks()
    sparse = fxsparse.sparsify(model, 0.5, example_inputs=x, capture="export")
    assert sparse.capture == "export"
    assert set(sparse.masks) == {"frozen.weight", "inner.weight", "low.weight", "full.weight"}
    assert not any(isinstance(m, torch.fx.GraphModule) for _, m in sparse.named_children()), "blocks inlined"
    full = fxsparse.sparsify(model, 1.0, example_inputs=x, capture="export")
    for mode in (True, False):
        model.train(mode), full.train(mode)
        torch.testing.assert_close(full(x), model(x))
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")  # the modes were restored
    sparse.train()
    sparse(x).sum().backward()
    assert sparse.get_parameter("frozen.weight").grad is None  # no_grad still holds
    assert sparse.get_parameter("inner.weight").grad is not None  # so does the enable_grad inside it
    for fqn, mask in sparse.masks.items():
        grad = sparse.get_parameter(fqn).grad
        assert fqn == "frozen.weight" or grad is not None and not bool(grad[~mask].any()), fqn
    assert_inactive_no_influence(sparse, x)
    counts = {fqn: int(mask.sum()) for fqn, mask in sparse.masks.items()}
    sparse.rigl_step(0.3)  # the weight without a gradient grows from zeros
    assert {fqn: int(mask.sum()) for fqn, mask in sparse.masks.items()} == counts
    rows = {r.name: r for r in fxsparse.flop_report(sparse, x).rows if r.kind == "weight"}
    assert set(rows) == set(sparse.masks)  # counted as weights, not as one opaque block
    loaded = torch.load(io.BytesIO(_saved(sparse)), weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x))


def _saved(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


def test_weights_read_inside_torch_cond_stay_dense_with_the_reason():
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.cond(x.sum() > 0, lambda x: self.a(x), lambda x: self.b(x), (x,)))

    sparse = fxsparse.sparsify(Branches(), 0.5, example_inputs=torch.randn(2, 8), capture="export")
    assert set(sparse.masks) == {"c.weight"}
    reasons = dict(sparse.skipped)
    assert set(reasons) >= {"a.weight", "b.weight"} and "higher_order.cond" in reasons["a.weight"]


def test_random_layer_skipping_is_refused_with_the_line_and_the_remedy():
    class LayerDrop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                if self.training and torch.rand([]) < 0.1:  # LayerDrop
                    continue
                x = layer(x)
            return x

    model = LayerDrop()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError) as caught:
        fxsparse.sparsify(model, 0.5, example_inputs=torch.randn(2, 8), capture="export")
    message = str(caught.value)
    assert "in train mode" in message and "LayerDrop" in message and "layerdrop" in message
    assert "torch.rand([]) < 0.1" in message  # the model's own line
    assert len(message) < 2000  # not torch.export's whole graph dump
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training


def test_check_model_says_when_torch_export_itself_differs_from_eager():
    import random

    class PythonRandom(nn.Module):
        """A Python-side random number: every capture bakes in the one it drew."""

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x) * (1.0 + random.random())

    from fxsparse.checks import check_model

    report = check_model(PythonRandom(), torch.randn(2, 4), capture="export")
    assert report.passed["sparsify"] and not report.passed["density_one"]
    assert "torch.export's own graph of PythonRandom differs from eager already" in report.failure


class StandardizedConv(nn.Module):
    """A convolution whose weight is standardized in the forward (timm's StdConv2d, NF-Nets):
    the product reads a function of the parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.gain = nn.Parameter(torch.ones(8, 1, 1, 1))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        h = F.conv2d(x, w * self.gain, padding=1)
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_a_weight_the_product_reads_through_a_computation_is_masked_on_the_kernel(capture):
    sparse = fxsparse.sparsify(StandardizedConv(), 0.5, example_inputs=torch.randn(2, 3, 6, 6), capture=capture)
    assert set(sparse.masks) == {"weight", "head.weight"} and not sparse.skipped  # a gain is no weight matrix
    assert sparse._fxsparse.sites["weight"].kernel == "graph"
    kernels = [n for n in sparse.graph.nodes if n.meta.get("fxsparse.kernel") == "weight"]
    assert len(kernels) == 1  # masked once, between the standardization and the convolution


class RelativeTable(nn.Module):
    """A relative position table sliced to the sequence length, then a matmul with the queries
    (transformers' VITS): the product reads a function of the table and of the input's size."""

    def __init__(self, padded: bool) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.rel = nn.Parameter(torch.randn(1, 9, 8))
        self.head = nn.Linear(8, 2)
        self.padded = padded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, n = self.q(x), x.shape[1]
        if self.padded:  # VITS: under export, padded by torch.sym_max of the sequence length
            pad = max(n - 5, 0)
            table = F.pad(self.rel, [0, 0, pad, pad, 0, 0]) if pad > 0 else self.rel
            start = max(5 - n, 0)
            table = table[:, start : start + 2 * n - 1]
        else:  # what symbolic tracing can follow: a slice by the size
            table = self.rel[:, 4 - (n - 1) // 2 : 4 + n // 2 + 1]
        scores = torch.matmul(q, table.transpose(-2, -1))
        return self.head(scores.mean(-1, keepdim=True) * q).mean(1)


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_a_table_computed_with_the_input_s_size_is_listed_where_a_product_reads_it(capture):
    x = torch.randn(2, 16, 8)
    model = RelativeTable(padded=capture == "export")
    sparse = fxsparse.sparsify(copy.deepcopy(model), 0.5, "uniform", dense=[], example_inputs=x, capture=capture)
    assert set(sparse.masks) == {"q.weight", "head.weight"}
    assert dict(sparse.skipped)["rel"].startswith("computed into the weight of")  # was neither masked nor listed
    from fxsparse.checks import check_model

    assert check_model(model, x, capture=capture).ok


def test_check_model_says_when_a_backward_through_torch_export_itself_fails():
    class NoGradForward(torch.autograd.Function):
        """Reversible-layer style: the forward runs without autograd, the backward is custom
        (Reformer); torch.export keeps the forward only."""

        @staticmethod
        def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x, weight)
            with torch.no_grad():
                return x @ weight.t()

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x, weight = ctx.saved_tensors
            return grad @ weight, grad.t() @ x

    class Reversible(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return NoGradForward.apply(x, self.weight)

    from fxsparse.checks import check_model

    report = check_model(Reversible(), torch.randn(2, 4), capture="export")
    assert report.passed["density_one"] and not report.passed["gradients"], report.failure
    assert "a backward through torch.export's own graph of Reversible fails already" in report.failure


class Stateful(torch.nn.Module):
    """Keeps results of its last forward in plain attributes, as a recurrent model's state or
    cache (transformers' RecurrentGemma does): autograd results that copy.deepcopy refuses."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)
        self.state = None
        self.history: list = []

    def forward(self, x):
        h = torch.relu(self.a(x))
        self.state = h
        self.history = [h.sum(), {"last": h}]
        return self.b(h)


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_a_model_holding_states_of_an_earlier_forward_is_copied_and_left_as_it_was(capture):
    torch.manual_seed(0)
    model = Stateful()
    x = torch.randn(3, 8)
    model(x).sum().backward()  # leaves non-leaf tensors in model.state and model.history
    state, history = model.state, model.history
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    sparse = fxsparse.sparsify(model, 0.5, example_inputs=x, capture=capture)
    assert set(sparse.masks) == {"a.weight", "b.weight"}
    assert model.state is state and model.history is history and state.grad_fn is not None
    assert history[1]["last"] is state  # the user's objects, not copies
    sparse(x).sum().backward()
    sparse.verify()


def test_check_model_copies_a_model_holding_states_of_an_earlier_forward():
    torch.manual_seed(0)
    model = Stateful()
    x = torch.randn(3, 8)
    model(x).sum().backward()
    from fxsparse.checks import check_model

    report = check_model(model, x, density=0.5)
    assert report.ok, report.failure
    assert model.state.grad_fn is not None  # left as it was


def test_an_adopted_attribute_of_another_mode_s_graph_survives_a_copy():
    # an exported eval graph read a higher-order op's index function as an attribute (transformers'
    # Nemotron ASR streaming encoder); a copy of the sparse module made in train mode lost it
    from fxsparse.recapture import install

    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    install(gm, "fxsparse_eval_index", len)
    assert copy.deepcopy(gm).fxsparse_eval_index is len
