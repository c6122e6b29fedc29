"""Measuring on a shared, noisy machine: the statistics and clocks every benchmark here uses.

- :func:`median_ci`: the median of per-round paired ratios with a distribution-free confidence
  interval (order statistics), the headline of every benchmark;
- :class:`RoundOrder`: a new random order of the variants each round;
- :class:`OtherLoad`: how much of the CPU other processes took during a window (rounds taken
  while the machine was busy are measured again);
- :func:`verdict`: a target judged on the median and on the whole interval;
- :class:`LibraryClock`: wall time spent inside a library's own per-step code;
- :func:`quiet_repeats`: repeats a measurement until enough of them ran on a quiet machine;
- :func:`ci_text`: "median [low, high]" of a list of ratios;
- :func:`cpu_name`, :func:`timed_ms`.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

__all__ = ["median_ci", "ci_text", "RoundOrder", "OtherLoad", "quiet_repeats", "verdict", "LibraryClock", "cpu_name",
           "timed_ms", "free_port", "init_gloo"]


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The median of ``values`` and a distribution-free confidence interval for it.

    The interval is the order statistics ``x_(j) .. x_(n+1-j)`` with ``j`` the largest rank
    for which ``P(Binomial(n, 1/2) <= j - 1) <= (1 - confidence) / 2``: it covers the true
    median with at least ``confidence`` whatever the distribution. With too few values for
    that confidence the interval is the whole range.
    """
    xs = sorted(values)
    n = len(xs)
    tail = (1.0 - confidence) / 2
    j, cdf = 0, 0.0
    for k in range(n):
        cdf += math.comb(n, k) / 2**n
        if cdf > tail:
            break
        j = k + 1
    if j == 0:
        return statistics.median(xs), xs[0], xs[-1]
    return statistics.median(xs), xs[j - 1], xs[n - j]


class RoundOrder:
    """The order of the variants in each round: a new random permutation every round (seeded).

    Rotating a fixed order would change only where a round starts: every variant would always
    follow the same one, and what that one leaves behind (caches, allocator state, a compiled
    model's threads) would bias its time. A random order lets every variant follow every other.
    """

    def __init__(self, variants: list[str], seed: int) -> None:
        self.variants = list(variants)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> list[str]:
        return [self.variants[i] for i in torch.randperm(len(self.variants), generator=self.generator)]


def timed_ms(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


class OtherLoad:
    """Share of the machine's CPU time that other processes used during a window.

    The machine is shared: when another process (a test run, say) competes for the 2 cores,
    the OpenMP threads of a step wait on each other and a step can take 10-20x longer. Such
    windows are measured again rather than averaged in (see :func:`quiet_repeats`).
    """

    def __init__(self) -> None:
        self.cpus = os.cpu_count() or 1
        self.start()

    @staticmethod
    def _busy_ticks() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        machine = user + nice + system + irq + softirq + steal
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return machine, int(own[11]) + int(own[12])  # utime + stime of every thread of ours

    def start(self) -> None:
        self._ticks = self._busy_ticks()
        self._wall = time.perf_counter()

    def share(self) -> float:
        machine, own = self._busy_ticks()
        others = (machine - self._ticks[0]) - (own - self._ticks[1])
        elapsed_ticks = (time.perf_counter() - self._wall) * os.sysconf("SC_CLK_TCK")
        return max(0.0, others) / max(elapsed_ticks * self.cpus, 1.0)


class LibraryClock:
    """Wall time spent inside a library's own per-step code, by wrapping its entry points.

    Each entry is ``(owner, attribute, part)``: while the clock is entered, ``owner.attribute``
    is replaced by a wrapper that adds its wall time to ``part``. Calls made inside another
    timed call are not counted again. Optimizer step hooks are wrapped where the optimizer
    keeps them (they are bound methods captured at registration).
    """

    def __init__(self, entries: list[tuple[Any, str, str]], optimizer: torch.optim.Optimizer,
                 hook_part: str | None) -> None:
        self.entries = entries
        self.optimizer = optimizer
        self.hook_part = hook_part
        self.parts: dict[str, float] = {part: 0.0 for _, _, part in entries}
        if hook_part:
            self.parts[hook_part] = 0.0
        self._depth = 0
        self._saved: list[tuple[Any, str, Any, bool]] = []

    def _wrap(self, fn: Any, part: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.parts[part] += (time.perf_counter() - start) * 1e3
                self._depth -= 1
        return timed

    def __enter__(self) -> LibraryClock:
        for owner, attribute, part in self.entries:
            had = attribute in vars(owner)
            original = getattr(owner, attribute)
            self._saved.append((owner, attribute, vars(owner).get(attribute), had))
            setattr(owner, attribute, self._wrap(original, part))
        if self.hook_part:
            for hooks in (self.optimizer._optimizer_step_pre_hooks,
                          self.optimizer._optimizer_step_post_hooks):
                for key, hook in list(hooks.items()):
                    self._saved.append((hooks, key, hook, True))
                    hooks[key] = self._wrap(hook, self.hook_part)
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, attribute, original, had in reversed(self._saved):
            if isinstance(owner, dict):
                owner[attribute] = original
            elif had:
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)
        self._saved.clear()

    def reset(self) -> None:
        self.parts = dict.fromkeys(self.parts, 0.0)


def verdict(median: float, high: float, target: float, strict: bool = False) -> str:
    """'met' when the whole confidence interval is within the target, 'met (median only)'
    when the median is but the interval reaches past it, else 'not met'."""
    within = (lambda x: x < target) if strict else (lambda x: x <= target)
    if within(high):
        return "met"
    return "met (median only)" if within(median) else "not met"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ci_text(values: list[float]) -> str:
    """``median [low, high]`` of ``values`` (:func:`median_ci`), three decimals, "-" when empty."""
    if not values:
        return "-"
    median, low, high = median_ci(values)
    return f"{median:.3f} [{low:.3f}, {high:.3f}]"


def quiet_repeats(fn: Any, wanted: int, desc: str, *, max_other_load: float, max_attempts: int) -> tuple[list[Any], int]:
    """Calls ``fn()`` until ``wanted`` calls ran while other processes used less than
    ``max_other_load`` of the CPU, or ``max_attempts`` times ``wanted`` calls were made.

    Returns the results of the quiet calls (all calls if fewer than ``wanted`` were quiet) and
    the number of calls discarded.
    """
    quiet: list[Any] = []
    noisy: list[Any] = []
    monitor = OtherLoad()
    with tqdm(total=wanted, desc=desc, file=sys.stderr) as bar:
        for _ in range(max_attempts * wanted):
            monitor.start()
            value = fn()
            if monitor.share() < max_other_load:
                quiet.append(value)
                bar.update()
                if len(quiet) == wanted:
                    break
            else:
                noisy.append(value)
                bar.set_postfix(discarded=len(noisy))
    if len(quiet) < wanted:
        return quiet + noisy, 0
    return quiet, len(noisy)


# glibc keeps freed memory for reuse unless told otherwise: a child process that measures its own
# peak resident memory must return what it frees
CHILD_MEMORY_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "65536"}


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``: resident now, ``VmHWM``: its peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run_variants(script: str, argv: list[str], variants: list[str], cwd: Path) -> dict[str, dict[str, Any]]:
    """Runs ``script *argv --variant v`` in a child process of its own for each variant (with
    :data:`CHILD_MEMORY_ENV`); each child prints its record as JSON on its last line."""
    import json
    import subprocess

    results = {}
    for variant in variants:
        command = [sys.executable, script, *argv, "--variant", variant]
        done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env={**os.environ, **CHILD_MEMORY_ENV})
        if done.returncode != 0:
            raise SystemExit(f"the {variant} child failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Joins the gloo group of ``world`` benchmark processes on 127.0.0.1:``port`` as ``rank``,
    one torch thread a process."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
