"""Random draws a captured graph cannot keep: those from numpy's and Python's global generators.

A graph records torch operations. ``torch.rand``/``dropout``/``bernoulli_`` become graph nodes
that draw again on every call, from torch's generator; but a model that draws with
``numpy.random`` or Python's ``random`` while it is captured (transformers' speech models draw
their SpecAugment time masks with ``np.random.rand``, BigBird its random attention blocks with
``np.random.permutation``) hands the graph the *result* of that one draw, a constant. The
captured module then repeats the same draw on every step, silently: in eager the model masks
other time steps each call, the sparse module always the same ones.

:class:`OutsideDraws` watches those generators while a front-end captures a model (by swapping
the drawing functions of ``numpy.random``'s and ``random``'s module namespaces for counting
ones, restored on exit), and :func:`warn_frozen` says what was frozen and where. numpy is never
imported here: a model that draws from it has imported it already.
"""

from __future__ import annotations

import functools
import os
import random
import sys
import warnings
from typing import Any

__all__ = ["OutsideDraws", "seed_everything", "warn_frozen"]

# what reads or sets a generator's state rather than drawing from it
_NOT_DRAWS = frozenset({"seed", "getstate", "setstate", "get_state", "set_state", "RandomState",
                        "Generator", "BitGenerator", "SeedSequence"})


def _python_draws() -> list[tuple[Any, str]]:
    """The drawing functions of Python's ``random`` module (bound methods of its hidden
    instance)."""
    inst = getattr(random, "_inst", None)
    return [(random, n) for n in random.__all__
            if n not in _NOT_DRAWS and getattr(getattr(random, n, None), "__self__", None) is inst]


def _numpy_draws() -> list[tuple[Any, str]]:
    """The drawing functions of ``numpy.random``'s namespace (the legacy global ``RandomState``'s
    methods, and ``default_rng``), when numpy is imported."""
    np_random = sys.modules.get("numpy.random")
    if np_random is None:
        return []
    state = getattr(getattr(np_random, "mtrand", None), "_rand", None)
    names = [n for n in dir(state) if not n.startswith("_") and n not in _NOT_DRAWS
             and callable(getattr(np_random, n, None))]
    return [(np_random, n) for n in names] + [(np_random, "default_rng")]


def _caller() -> str:
    """``file:line`` of the first frame outside this module, numpy and ``random``: the model code
    that drew."""
    frame = sys._getframe(2)
    skip = (__file__, random.__file__, os.sep + "numpy" + os.sep)
    while frame is not None and any(s in frame.f_code.co_filename for s in skip):
        frame = frame.f_back
    if frame is None:
        return "?"
    parts = frame.f_code.co_filename.split(os.sep)
    return f"{os.sep.join(parts[-4:])}:{frame.f_lineno}"


class OutsideDraws:
    """Counts the draws from numpy's and Python's global generators while it is entered.

    ``sites`` maps ``"numpy.random.rand at transformers/models/sew_d/modeling_sew_d.py:123"`` to
    the number of draws there. A ``default_rng(seed)`` with a seed is not a draw (its numbers are
    the same on every call, as a graph's constant is).
    """

    def __init__(self) -> None:
        self.sites: dict[str, int] = {}
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> OutsideDraws:
        for module, name in _python_draws() + _numpy_draws():
            original = getattr(module, name)
            self._saved.append((module, name, original))
            setattr(module, name, self._counting(f"{module.__name__}.{name}", original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()

    def _counting(self, qualname: str, original: Any) -> Any:
        @functools.wraps(original)
        def draw(*args: Any, **kwargs: Any) -> Any:
            seeded = qualname.endswith("default_rng") and (args and args[0] is not None or kwargs.get("seed") is not None)
            if not seeded:
                site = f"{qualname} at {_caller()}"
                self.sites[site] = self.sites.get(site, 0) + 1
            return original(*args, **kwargs)

        return draw


def warn_frozen(sites: dict[str, int], model_name: str, how: str) -> None:
    """Warns that the graph captured by ``how`` from ``model_name`` holds the draws at ``sites``
    as constants (nothing when there are none)."""
    if not sites:
        return
    where = "; ".join(sorted(sites)[:3]) + (f"; and {len(sites) - 3} more" if len(sites) > 3 else "")
    warnings.warn(
        f"fxsparse: {model_name} drew random numbers outside torch while it was captured "
        f"({where}); a graph captured by {how} records torch operations only, so it holds that draw as a "
        f"constant and the sparse module repeats it on every call (a SpecAugment mask or random "
        f"attention pattern fixed for the whole training). Fix: draw with torch in the model "
        f"(torch.rand, torch.randperm), or switch that feature off in the model (transformers' "
        f"speech models: config.mask_time_prob=0 and mask_feature_prob=0) and apply it to the "
        f"inputs instead",
        stacklevel=4,
    )


def seed_everything(seed: int) -> None:
    """Seeds torch's, Python's and (when imported) numpy's global generators: the state a model
    may draw from."""
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed(seed)
