"""Graph passes: each a small function over a GraphModule with its invariant in its docstring."""

from fxsparse.passes.find_weights import WeightSite, canonical_names, find_weights
from fxsparse.passes.functionalize import functionalize
from fxsparse.passes.mask_weights import mask_weights

__all__ = ["WeightSite", "canonical_names", "find_weights", "functionalize", "mask_weights"]
