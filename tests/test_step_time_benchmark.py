"""benchmarks/step_time.py: its statistics, its library clock, and a smoke run of the script.

The benchmark's verdicts rest on a distribution-free confidence interval for the median of
per-round ratios; these tests check that interval's coverage and the verdict rules, that the
clock which times each library's own code counts nested calls once and puts everything back,
and that a short run writes a report with every section.
"""

from __future__ import annotations

import importlib.util
import math
import random
import statistics
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("step_time_under_test", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _binomial_coverage(n: int, j: int) -> float:
    """Probability that [x_(j), x_(n+1-j)] covers the median of a continuous distribution."""
    return 1.0 - 2.0 * sum(math.comb(n, k) for k in range(j)) / 2**n


@pytest.mark.parametrize("n", [6, 9, 20, 21, 60])
def test_median_ci_is_the_tightest_order_statistic_interval_with_95_percent(bench, n):
    values = [float(v) for v in range(1, n + 1)]  # x_(i) == i
    median, low, high = bench.median_ci(values)
    assert median == statistics.median(values)
    j = int(low)
    assert high == n + 1 - j  # symmetric ranks
    assert _binomial_coverage(n, j) >= 0.95
    assert _binomial_coverage(n, j + 1) < 0.95  # one rank further in would cover less


def test_median_ci_with_too_few_values_is_the_range(bench):
    assert bench.median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) == (3.0, 1.0, 5.0)


def test_median_ci_covers_a_skewed_median_at_least_95_percent_of_the_time(bench):
    rng = random.Random(0)
    true_median = math.log(2)  # of an exponential with rate 1: skewed, like step times
    trials, hits = 2000, 0
    for _ in range(trials):
        _, low, high = bench.median_ci([rng.expovariate(1.0) for _ in range(30)])
        hits += low <= true_median <= high
    assert hits / trials >= 0.93  # 0.95 or more, less a margin for 2000 trials


def test_paired_ratios_use_only_rounds_where_both_variants_ran(bench):
    result = bench.ModelResult("m", 32, 1)
    result.rounds = [{"a": 2.0, "b": 1.0}, {"a": 3.0}, {"a": 6.0, "b": 2.0}]
    assert result.paired("a", "b") == [2.0, 3.0]


@pytest.mark.parametrize(("median", "high", "strict", "verdict"), [
    (1.01, 1.02, False, "met"),
    (1.02, 1.03, False, "met"),  # the target itself is within "at most"
    (1.02, 1.06, False, "met (median only)"),
    (1.04, 1.06, False, "not met"),
    (0.99, 1.00, True, "met (median only)"),  # "below" excludes the target itself
    (1.00, 1.01, True, "not met"),
])
def test_verdicts(bench, median, high, strict, verdict):
    assert bench.verdict(median, high, 1.03 if not strict else 1.0, strict) == verdict


class _Thing:
    def outer(self, x):
        return self.inner(x) + 1

    def inner(self, x):
        return x * 2


def test_library_clock_counts_nested_calls_once_and_restores_everything(bench):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    calls = []
    optimizer.register_step_pre_hook(lambda *args: calls.append("pre"))
    pre_hooks = dict(optimizer._optimizer_step_pre_hooks)
    entries = [(_Thing, "outer", "outer part"), (_Thing, "inner", "inner part")]
    thing = _Thing()
    with bench.LibraryClock(entries, optimizer, "hooks") as clock:
        assert thing.outer(3) == 7
        optimizer.step()
        assert clock.parts["outer part"] > 0
        assert clock.parts["inner part"] == 0  # ran inside outer: counted there only
        assert clock.parts["hooks"] > 0
        assert thing.inner(1) == 2
        assert clock.parts["inner part"] > 0
    assert calls == ["pre"]
    assert "outer" in vars(_Thing) and _Thing.outer.__name__ == "outer"
    assert _Thing.inner(thing, 2) == 4
    assert dict(optimizer._optimizer_step_pre_hooks) == pre_hooks


def test_a_short_run_writes_every_section(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave the suite's setting
    out, raw = tmp_path / "performance.md", tmp_path / "raw.json"
    bench.main([
        "--models", "wrn22_2", "--steps", "2", "--warmup", "1", "--update-reps", "1",
        "--batch", "4", "--library-steps", "2", "--no-compile", "--no-memory", "--no-peer",
        "--out", str(out), "--json", str(raw),
    ])
    report = out.read_text()
    for section in ("## Targets", "## Step time: paired ratios", "## Time inside each library",
                    "## Topology update cost", "## sparsify() time", "## Failures"):
        assert section in report
    assert "| fxsparse own time / two-pass floor, ordinary step | wrn22_2 |" in report
    assert "| fxsparse / rigl-torch, eager | wrn22_2 | not measured |" in report  # --no-peer
    assert "| wrn22_2 | fxsparse |" in report  # the library-time row
    again = tmp_path / "again.md"
    bench.main(["--report-from", str(raw), "--out", str(again)])
    assert again.read_text() == report  # the raw results hold everything the report says


def test_report_from_a_file_that_is_not_a_run_says_what_it_expected(bench, tmp_path):
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"results": []}')
    with pytest.raises(SystemExit, match="expected the JSON that step_time.py --json writes"):
        bench.main(["--report-from", str(wrong)])
