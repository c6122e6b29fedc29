"""Does ``sparsify`` keep its guarantees on this model? The checks of the timm coverage sweep.

:func:`check_model` runs, on a copy of any model and an input it accepts: sparsify at density 0.1
ERK; exact per-layer counts; at density 1.0 the outputs equal the model's (eval mode); after one
backward every parameter the dense model trains has a gradient, zero where inactive; one
``rigl_step`` keeps the counts; and the fraction (by parameter count) of conv/linear/matmul
weights that ended up sparsified. Each check is one function, ``_check_<name>`` for every name
of ``CHECKS`` (``_STAGES``), run in that order on one shared ``_Checking``; the first that raises
is the report's failure. ``benchmarks/timm_coverage.py`` runs it over timm's registry
and ``tests/test_timm_sample.py`` over a fixed sample.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxsparse.api import copy_model, sparsify
from fxsparse.budgets import active_counts, layer_densities
from fxsparse.capture import split_inputs
from fxsparse.draws import seed_everything
from fxsparse.passes.find_weights import LAYERS, canonical_names
from fxsparse.probe import ProductReads, SparseReads

__all__ = ["CheckReport", "check_model", "product_weights", "CHECKS"]

CHECKS = ("sparsify", "counts", "covered", "reads", "density_one", "modes", "gradients", "rigl_step")


@dataclass
class CheckReport:
    """Outcome of :func:`check_model`: which checks passed, why the first failure failed."""

    passed: dict[str, bool] = field(default_factory=dict)
    failure: str | None = None  # "check: ExceptionType: message" of the first failure
    coverage: float | None = None  # sparsified / all conv/linear/matmul weights (by parameter count)
    masked_params: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    capture: str | None = None  # the front-end sparsify chose ("symbolic" | "export")
    mode_graphs: bool | None = None  # the module runs a graph per mode (its modes compute differently)

    @property
    def ok(self) -> bool:
        return self.failure is None and all(self.passed.get(c, False) for c in CHECKS)


def _counts_exact(sparse: Any, density: float, init: str) -> None:
    shapes = {fqn: tuple(mask.shape) for fqn, mask in sparse.masks.items()}
    # sparsify's default: uniform keeps the first layer dense
    dense = [next(iter(shapes))] if init == "uniform" and len(shapes) > 1 else []
    want = active_counts(shapes, layer_densities(shapes, density, init, dense=dense))
    got = {fqn: int(mask.sum()) for fqn, mask in sparse.masks.items()}
    bad = {fqn: (got[fqn], want[fqn]) for fqn in shapes if got[fqn] != want[fqn]}
    if bad:
        raise AssertionError(f"active counts differ from the budget (got, want): {bad}")


@dataclass
class _Checking:
    """What the checks of one :func:`check_model` run share: the arguments, the model's copy,
    the modules sparsify made, and the report they fill."""

    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: Any  # example_inputs as passed on to sparsify
    density: float
    init: str
    rtol: float
    atol: float
    capture: str
    embeddings: bool
    report: CheckReport
    sparse: Any = None  # sparsify at ``density``
    full: Any = None  # sparsify at density 1.0 (density_one and modes)


def check_model(
    model: nn.Module, example_inputs: Any, *, density: float = 0.1, init: str = "erk",
    rtol: float = 1e-5, atol: float = 1e-5, capture: str = "auto", embeddings: bool = False,
) -> CheckReport:
    """Runs every check on copies of ``model`` (never modified); stops at the first failure.

    ``example_inputs`` as :func:`fxsparse.sparsify` takes them (a tensor, a tuple, a dict of
    keyword inputs, or ``(args, kwargs)``); ``capture`` and ``embeddings`` are passed on. The
    checks run in the order of ``CHECKS``, one function each (``_STAGES``).
    """
    report = CheckReport()
    split = split_inputs(example_inputs)
    if split is None:
        raise ValueError("expected example_inputs to run the model on, got None")
    args, kwargs = split
    inputs = (args, kwargs) if kwargs else args
    run = _Checking(model, args, kwargs, inputs, density, init, rtol, atol, capture, embeddings, report)
    stage = CHECKS[0]
    try:
        for stage in CHECKS:
            _STAGES[stage](run)
            report.passed[stage] = True
    except Exception as e:  # the report says which check failed and how
        report.passed.setdefault(stage, False)
        lines = traceback.format_exception_only(type(e), e)
        report.failure = f"{stage}: {''.join(lines).strip().splitlines()[0][:300]}"
    return report


def _check_sparsify(run: _Checking) -> None:
    """sparsify at ``density`` on a copy of the model (train mode); the report's front-end,
    mode graphs, skipped weights and masked parameter count."""
    run.model = copy_model(run.model)
    run.model.train()
    sparse = sparsify(
        run.model, run.density, run.init, example_inputs=run.inputs, capture=run.capture, embeddings=run.embeddings
    )
    run.sparse = sparse
    run.report.capture = sparse.capture
    run.report.mode_graphs = sparse._fxsparse.mode_graphs is not None
    run.report.skipped = sparse.skipped
    run.report.masked_params = sum(m.numel() for m in sparse.masks.values())


def _check_counts(run: _Checking) -> None:
    """Exact per-layer active counts."""
    _counts_exact(run.sparse, run.density, run.init)


def _check_covered(run: _Checking) -> None:
    """Every conv/linear/matmul weight (:func:`product_weights`) masked or listed in skipped;
    the report's coverage."""
    sparse = run.sparse
    weights = product_weights(run.model, run.args, run.kwargs)
    listed = {fqn for fqn, _ in sparse.skipped}
    hidden = sorted(set(weights) - set(sparse.masks) - listed)
    everything = set(weights) | set(sparse.masks)
    total = sum(sparse.get_parameter(fqn).numel() for fqn in everything)
    run.report.coverage = run.report.masked_params / total if total else 1.0
    if hidden:
        raise AssertionError(
            f"{len(hidden)} conv/linear/matmul weight(s) neither masked nor listed in skipped: "
            + ", ".join(f"{fqn} ({weights[fqn]})" for fqn in hidden[:5])
        )


def _check_reads(run: _Checking) -> None:
    """Every product reads zeros where its weight's mask is False, in train and in eval mode: the
    weight itself, and a kernel computed from it (weight standardization), watched running
    (:class:`fxsparse.probe.SparseReads`) on a copy of the sparse module."""
    twin = copy_model(run.sparse)
    tensors = {**dict(twin.named_parameters(remove_duplicate=False)), **dict(twin.named_buffers(remove_duplicate=False))}
    dense: set[str] = set()
    for mode in (True, False):
        twin.train(mode)
        with torch.no_grad(), SparseReads(tensors, twin.masks) as reads:
            twin(*run.args, **run.kwargs)
        dense |= reads.dense
    if dense:
        raise AssertionError(f"{len(dense)} product(s) read nonzero values where the mask is False: {sorted(dense)[:5]}")


def _check_density_one(run: _Checking) -> None:
    """At density 1.0 the outputs equal the model's (eval mode)."""
    model, args, kwargs = run.model, run.args, run.kwargs
    run.full = full = sparsify(model, 1.0, example_inputs=run.inputs, capture=run.capture, embeddings=run.embeddings)
    model.eval()
    full.eval()
    with torch.no_grad():
        expected = _tensors(model(*args, **kwargs))
        try:
            torch.testing.assert_close(_tensors(full(*args, **kwargs)), expected, rtol=run.rtol, atol=run.atol)
        except AssertionError as e:
            if full.capture == "export":
                _blame_export(model, args, kwargs, expected, run.rtol, run.atol, e)
            raise


def _check_modes(run: _Checking) -> None:
    """Back to train mode: what depends on the mode must follow it, at each of two random seeds
    (every generator the model may draw from seeded: a draw the capture froze as a constant
    matches at one seed at most)."""
    model, full, args, kwargs = run.model, run.full, run.args, run.kwargs
    model.train()
    full.train()
    for seed in (0, 1):
        with torch.no_grad():
            seed_everything(seed)
            expected = _tensors(model(*args, **kwargs))
            seed_everything(seed)
            got = _tensors(full(*args, **kwargs))
        try:
            torch.testing.assert_close(got, expected, rtol=run.rtol, atol=run.atol)
        except AssertionError as e:
            if full.capture == "export":  # torch.export's own train-mode graph, same seed
                _blame_export(model, args, kwargs, expected, run.rtol, run.atol, e, seed=seed)
            first = str(e).strip().splitlines()
            raise AssertionError(
                f"in train mode (random seed {seed} for torch, numpy and Python) the density-1.0 "
                f"module differs from the model, after it computed the same in eval mode: "
                f"{' '.join(first[:3])}"
            ) from e
    run.full = None


def _check_gradients(run: _Checking) -> None:
    """After one backward every parameter the dense model trains has a gradient, zero where
    inactive."""
    model, sparse, args, kwargs = run.model, run.sparse, run.args, run.kwargs
    model.train()
    _scalar(model(*args, **kwargs)).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    try:
        seed_everything(0)
        _scalar(sparse(*args, **kwargs)).backward()
    except RuntimeError as e:
        if sparse.capture == "export":
            _blame_export_backward(model, args, kwargs, e)
        raise
    # every name (a module reachable by two paths has its parameters under both)
    got = {n for n, p in sparse.named_parameters(remove_duplicate=False) if p.grad is not None}
    if not trained <= got:
        raise AssertionError(f"no gradient for {sorted(trained - got)[:5]}")
    grads = {fqn: sparse.get_parameter(fqn).grad for fqn in sparse.masks}
    nonfinite = sorted(f for f, g in grads.items() if g is not None and not bool(torch.isfinite(g).all()))
    if nonfinite:
        _blame_model_numerics(model, sparse.masks, args, kwargs, nonfinite)
        raise AssertionError(f"the gradients of {nonfinite[:3]} are not finite")
    for fqn, mask in sparse.masks.items():
        grad = grads[fqn]
        if grad is not None and bool(torch.where(mask, 0, grad).ne(0).any()):
            raise AssertionError(f"{fqn}: inactive weights have gradient")


def _blame_model_numerics(model: nn.Module, masks: dict[str, torch.Tensor], args: tuple[Any, ...],
                          kwargs: dict[str, Any], nonfinite: list[str]) -> None:
    """Raises an AssertionError that says so when the model itself, eager and with the same
    weights zeroed (no fxsparse pass involved), also computes non-finite gradients there: a
    property of the model at this sparsity (a normalization of a constant channel, say)."""
    twin = copy_model(model)
    with torch.no_grad():
        for fqn, mask in masks.items():
            twin.get_parameter(fqn).mul_(mask)
    twin.train()
    seed_everything(0)
    _scalar(twin(*args, **kwargs)).backward()
    eager = sorted(f for f in nonfinite if twin.get_parameter(f).grad is not None
                   and not bool(torch.isfinite(twin.get_parameter(f).grad).all()))
    if eager:
        raise AssertionError(
            f"the model's own gradients are not finite with the inactive weights zeroed (eager, no fxsparse "
            f"pass): {eager[:3]}; a property of the model at this density and input, not masking"
        )


def _check_rigl_step(run: _Checking) -> None:
    """One ``rigl_step`` keeps the counts, and ``verify`` passes."""
    run.sparse.rigl_step(0.3)
    _counts_exact(run.sparse, run.density, run.init)
    run.sparse.verify()


_STAGES: dict[str, Callable[[_Checking], None]] = {
    "sparsify": _check_sparsify,
    "counts": _check_counts,
    "covered": _check_covered,
    "reads": _check_reads,
    "density_one": _check_density_one,
    "modes": _check_modes,
    "gradients": _check_gradients,
    "rigl_step": _check_rigl_step,
}
assert tuple(_STAGES) == CHECKS


def product_weights(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, str]:
    """The conv/linear/matmul weights of ``model``, by canonical FQN, with why each counts: the
    weight of every ``nn.Conv*``/``nn.Linear`` module, and every parameter a product kernel reads
    (directly, or through a computation of parameters alone) while a copy of the model runs on
    the inputs in train mode and in eval mode (:class:`fxsparse.probe.ProductReads`)."""
    names = canonical_names(model)
    found: dict[str, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, LAYERS) and isinstance(getattr(module, "weight", None), nn.Parameter):
            found[names[f"{path}.weight" if path else "weight"]] = f"weight of {type(module).__name__}"
    twin = copy_model(model)
    params = {names[n]: p for n, p in twin.named_parameters(remove_duplicate=False)}
    for mode in (True, False):
        twin.train(mode)
        with torch.no_grad(), ProductReads(params) as reads:
            twin(*args, **kwargs)
        for fqn in sorted(reads.direct):
            found.setdefault(fqn, "read by a product kernel")
        for fqn in sorted(reads.computed):
            found.setdefault(fqn, "computed into a product's operand")
    return found


def _blame_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], expected: Any,
                  rtol: float, atol: float, error: AssertionError, seed: int | None = None) -> None:
    """Raises an AssertionError that says so when torch.export's own capture of ``model`` in its
    mode (no fxsparse pass involved) already differs from eager, run under ``seed`` when given
    (random ops in train mode); returns when it does not."""
    if seed is not None:  # the capture draws from another state than the run compared, as
        seed_everything(seed + 1)  # the sparse module's did (a draw it freezes then shows)
    plain = _plain_export(model, args, kwargs)
    if plain is None:
        return
    try:
        with torch.no_grad():
            if seed is not None:
                seed_everything(seed)
            torch.testing.assert_close(_tensors(plain(*args, **kwargs)), expected, rtol=rtol, atol=atol)
    except AssertionError as mismatch:
        first = str(mismatch).strip().splitlines()
        raise AssertionError(
            f"torch.export's own graph of {type(model).__name__} differs from eager already "
            f"(without any fxsparse pass: {' '.join(first[1:3]) or first[0]}); a torch.export / "
            f"model issue, not masking"
        ) from error
    except Exception:  # noqa: BLE001 - the plain graph could not even run: keep the first error
        return


def _plain_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> nn.Module | None:
    """torch.export's own capture of ``model`` (no fxsparse pass), or None when it fails."""
    try:
        return torch.export.export(model, args, kwargs, strict=False).module()
    except Exception:  # noqa: BLE001 - the caller keeps its first error
        return None


def _blame_export_backward(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], error: RuntimeError) -> None:
    """Raises a RuntimeError that says so when a backward through torch.export's own capture of
    ``model`` (train mode, no fxsparse pass involved) fails too; returns when it does not."""
    plain = _plain_export(model, args, kwargs)
    if plain is None:
        return
    try:
        _scalar(plain(*args, **kwargs)).backward()
    except RuntimeError as failure:
        first = str(failure).strip().splitlines()
        raise RuntimeError(
            f"a backward through torch.export's own graph of {type(model).__name__} fails already "
            f"(without any fxsparse pass: {first[0][:200] if first else type(failure).__name__}); "
            f"typically a custom autograd.Function whose backward export does not keep"
        ) from error
    finally:
        model.zero_grad(set_to_none=True)


def _tensors(output: Any) -> Any:
    """The tensors of a model output (a ``transformers`` ModelOutput compares as a dict)."""
    if isinstance(output, dict):
        return {k: _tensors(v) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return [_tensors(v) for v in output]
    return output


def _scalar(output: Any) -> torch.Tensor:
    """A scalar to backward from any model output (tensor, tuple, dict)."""
    if isinstance(output, torch.Tensor):
        return output.float().sum()
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return sum(_scalar(o) for o in output if isinstance(o, (torch.Tensor, list, tuple, dict)))
    raise TypeError(f"expected tensor outputs, got {type(output).__name__}")
