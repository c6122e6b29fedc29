"""Every public entry point that takes ``example_inputs`` takes every form ``sparsify`` documents
(a tensor, a tuple, a dict of keyword inputs, ``(args, kwargs)``) under both front-ends, through
one helper (``fxsparse.capture.split_inputs``), and the exported inference module is called as
the model is, keywords included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.checks import check_model
from fxsparse.export import ExportError


class Shifted(nn.Module):
    """Two inputs, the second one keyword-friendly: ``model(x, shift)`` or ``model(x=x, shift=s)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x) + shift))


FORMS = {
    "tuple": lambda x, s: (x, s),
    "dict": lambda x, s: {"x": x, "shift": s},
    "args and kwargs": lambda x, s: ((x,), {"shift": s}),
    "kwargs only": lambda x, s: ((), {"x": x, "shift": s}),
}
CALLS = {
    "positional": lambda m, x, s: m(x, s),
    "keyword": lambda m, x, s: m(x, shift=s),
    "all keywords": lambda m, x, s: m(x=x, shift=s),
}


def _rows(report):
    return [(r.name, r.op, r.density, r.dense_flops, r.params, r.active_params) for r in report.rows]


@pytest.mark.parametrize("capture", ["symbolic", "export"])
@pytest.mark.parametrize("form", FORMS)
def test_every_entry_point_takes_every_form_and_the_export_is_called_as_the_model(capture, form):
    torch.manual_seed(0)
    model = Shifted()
    x, s = torch.randn(8, 16), torch.randn(8, 32)
    example = FORMS[form](x, s)
    sparse = fxsparse.sparsify(model, 0.3, "uniform", example_inputs=example, capture=capture, dense=[])
    plain = fxsparse.sparsify(model, 0.3, "uniform", example_inputs=(x, s), capture=capture, dense=[])
    assert sparse.capture == plain.capture
    assert all(torch.equal(m, plain.masks[f]) for f, m in sparse.masks.items())
    assert fxsparse.flops(sparse, example) == fxsparse.flops(plain, (x, s)) > 0
    assert _rows(fxsparse.flop_report(sparse, example)) == _rows(fxsparse.flop_report(plain, (x, s)))
    pruned = fxsparse.prune_oneshot(model, 0.3, score="wanda", calibration=[example], example_inputs=example,
                                    capture=capture, dense=[])
    assert abs(pruned.density - 0.3) < 0.02

    exported = fxsparse.export_inference(sparse, example, autotune=False)
    sparse.eval()
    with torch.no_grad():
        for name, call in CALLS.items():
            torch.testing.assert_close(call(exported, x, s), call(sparse, x, s), msg=name)
        # the batch the sparse module takes: another size than the example's
        torch.testing.assert_close(exported(x[:3], shift=s[:3]), sparse(x[:3], shift=s[:3]))

    report = check_model(model, example, density=0.3, capture=capture)
    assert report.ok, report


def test_export_inference_without_inputs_says_what_it_expects():
    sparse = fxsparse.sparsify(Shifted(), 0.3, dense=[])
    with pytest.raises(ExportError, match="a dict of keyword inputs or \\(args, kwargs\\)"):
        fxsparse.export_inference(sparse, None)
    with pytest.raises(ExportError, match="keyword inputs \\{x: \\(8, 16\\)\\}"):
        fxsparse.export_inference(sparse, {"x": torch.randn(8, 16)})  # shift missing
