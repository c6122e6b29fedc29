"""fxsparse.export_inference: the exported module computes what the sparse one does (every
kernel of every layer), survives torch.save, records its choices, and refuses bad input."""

from __future__ import annotations

import copy
import io
import time
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxsparse
import fxsparse.export as export_mod
from fxsparse.export import ExportError, LayerChoice, SparseConv2d, SparseLinear, SparseMatmul, export_inference
from strategies import build, heavy, net_specs, sparsify

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
LOWERED = (SparseLinear, SparseConv2d, SparseMatmul)


def _assert_every_kernel_matches(exported, sparse, x):
    sparse.eval()
    with torch.no_grad():
        expected = sparse(x)
        assert torch.allclose(exported(x), expected, rtol=1e-4, atol=1e-5)
        for module in exported.modules():
            if isinstance(module, LOWERED):
                chosen = module.kernel
                for kernel in module.kernels:
                    module.kernel = kernel
                    assert torch.allclose(exported(x), expected, rtol=1e-4, atol=1e-5), kernel
                module.kernel = chosen


def _train(sparse, x, steps=3):
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, total_steps=steps * 4, delta_t=1)
    sparse.train()
    for _ in range(steps):
        sparse(x).square().mean().backward()
        if scheduler.step():
            optimizer.step()
        optimizer.zero_grad()


@heavy()
@given(net_specs(), st.sampled_from([0.5, 0.2, 0.05]), st.integers(1, 4))
def test_exported_outputs_equal_the_sparse_module_for_every_kernel(spec, density, batch):
    sparse = sparsify(build(spec), density)
    x = spec.input(batch)
    _train(sparse, x)
    exported = export_inference(sparse, x, repeats=1)
    _assert_every_kernel_matches(exported, sparse, x)
    _assert_every_kernel_matches(exported, sparse, spec.input(batch + 2))  # another batch size
    assert not any(p.requires_grad for p in exported.parameters())
    assert not any(name.endswith("_mask") for name, _ in exported.named_buffers())


def _conv_bn_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def test_batchnorm_folds_into_its_convolution():
    sparse = fxsparse.sparsify(_conv_bn_net(), 0.2)
    x = torch.randn(4, 3, 8, 8)
    _train(sparse, x)
    exported = export_inference(sparse, x, repeats=1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in exported.modules())
    _assert_every_kernel_matches(exported, sparse, x)
    folded = [c for c in exported.fxsparse_choices if c.kind == "conv2d"]
    assert [c.weight for c in folded] == ["0.weight", "3.weight", "6.weight"]  # names kept through the fold


def test_the_sparse_module_is_left_as_it_was():
    sparse = fxsparse.sparsify(_conv_bn_net(), 0.2).train()
    before = copy.deepcopy(sparse.state_dict())
    export_inference(sparse, torch.randn(2, 3, 8, 8), repeats=1)
    assert sparse.training
    after = sparse.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    sparse(torch.randn(2, 3, 8, 8)).sum().backward()  # still trainable
    sparse.verify()


def test_choices_are_recorded_and_empty_rows_can_be_skipped():
    torch.manual_seed(0)
    sparse = fxsparse.sparsify(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8)), 0.1, init="uniform", dense=[])
    mask = sparse.masks["0.weight"]
    weight = sparse.get_parameter("0.weight")
    with torch.no_grad():  # move every active weight of the first 64 rows into the other 64
        moved = int(mask[:64].sum())
        mask[:64] = False
        free = (~mask[64:]).nonzero()[:moved]
        mask[64 + free[:, 0], free[:, 1]] = True
        weight.normal_()
    sparse.rezero()
    x = torch.randn(3, 64)
    exported = export_inference(sparse, x, repeats=1)
    choices = exported.fxsparse_choices
    assert [c.weight for c in choices] == ["0.weight", "2.weight"] and all(isinstance(c, LayerChoice) for c in choices)
    first = choices[0]
    assert first.shape == (128, 64) and first.density == pytest.approx(0.1, abs=0.01)
    assert set(first.ms) == {"dense", "csr", "dense-rows"} and first.kernel in first.ms
    _assert_every_kernel_matches(exported, sparse, x)


def test_the_whole_module_check_reverts_per_layer_wins_that_make_the_whole_slower(monkeypatch):
    torch.manual_seed(0)
    sparse = fxsparse.sparsify(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)), 0.2, init="uniform", dense=[])
    x = torch.randn(2, 32)

    def fooled(module, x, kernels, repeats, margin):  # per-layer timing that favoured csr wrongly
        module.kernel = "csr"
        return "csr", {"dense": 1.0, "csr": 0.5}

    real_product = export_mod._Compressed.csr_times_rows

    def slow_product(self, x):
        time.sleep(0.02)  # far above scheduling noise on a loaded 2-core machine (2 ms was not)
        return real_product(self, x)

    monkeypatch.setattr(export_mod, "_choose", fooled)
    monkeypatch.setattr(export_mod._Compressed, "csr_times_rows", slow_product)
    exported = export_inference(sparse, x, repeats=3)
    assert exported.fxsparse_kept == "dense"
    assert set(exported.fxsparse_whole_ms) == {"chosen", "dense"}
    assert exported.fxsparse_whole_ms["chosen"] > exported.fxsparse_whole_ms["dense"]
    assert [c.kernel for c in exported.fxsparse_choices] == ["dense", "dense"]
    assert [m.kernel for m in exported.modules() if isinstance(m, LOWERED)] == ["dense", "dense"]


def test_save_and_load_round_trip_with_a_file_that_holds_only_active_weights():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    dense_bytes = len(_saved(mlp.state_dict()))
    sparse = fxsparse.sparsify(mlp, 0.05, init="uniform", dense=[])
    x = torch.randn(1, 512)
    exported = export_inference(sparse, x, repeats=1)
    data = _saved(exported)
    loaded = torch.load(io.BytesIO(data), weights_only=False)
    sparse.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), sparse(x), atol=1e-5)
    assert [m.kernel for m in loaded.modules() if isinstance(m, LOWERED)] == [
        m.kernel for m in exported.modules() if isinstance(m, LOWERED)]
    assert [c.kernel for c in loaded.fxsparse_choices] == [c.kernel for c in exported.fxsparse_choices]
    assert len(_saved(exported.state_dict())) < 0.15 * dense_bytes  # values + int32 indices
    assert len(data) < 0.15 * dense_bytes + 100_000  # the pickled code adds a little


def _saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_bad_input_gets_a_clear_error():
    with pytest.raises(TypeError, match="expected a SparseGraphModule"):
        export_inference(nn.Linear(4, 4), torch.randn(1, 4))
    sparse = fxsparse.sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), 0.3)
    with pytest.raises(ExportError, match=r"expected example_inputs .* shape \[\(2, 7\)\]"):
        export_inference(sparse, torch.randn(2, 7))
    exported = export_inference(sparse, torch.randn(2, 16), repeats=1)
    with pytest.raises(ExportError, match="last dimension is 16"):
        exported(torch.randn(2, 7))
    conv = fxsparse.sparsify(_conv_bn_net(), 0.3)
    exported = export_inference(conv, torch.randn(1, 3, 8, 8), repeats=1)
    with pytest.raises(ExportError, match=r"expected an \(N, 3, H, W\) input"):
        exported(torch.randn(1, 4, 8, 8))


def test_torch_export_takes_an_export_whose_layers_run_dense_kernels():
    sparse = fxsparse.sparsify(_conv_bn_net(), 0.3)
    x = torch.randn(1, 3, 8, 8)
    exported = export_inference(sparse, x, autotune=False)
    assert {c.kernel for c in exported.fxsparse_choices} == {"dense"}
    program = torch.export.export(exported, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), exported(x), atol=1e-6)


def test_kernel_timing_waits_for_accelerator_work_before_reading_the_clock(monkeypatch):
    """On CUDA a call returns once its kernels are queued: the export's timer must synchronize the
    output's device, or it would time launches. Simulated here (no accelerator on this machine):
    an output that reports a cuda device must be synchronized once per timed call."""
    import fxsparse.export as export

    waited = []
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: waited.append(str(device)))

    class OnCuda:
        device = torch.device("cuda", 0)

    monkeypatch.setattr(export, "_flatten", lambda value: [OnCuda()] if value == "queued" else [])
    export._time(lambda: "queued", repeats=3)
    assert waited == ["cuda:0"] * 4  # the warm-up call and 3 timed ones
    waited.clear()
    export._time(lambda: "on cpu", repeats=3)
    assert waited == []
