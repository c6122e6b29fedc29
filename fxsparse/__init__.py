"""fxsparse: RigL-style dynamic sparse training for any PyTorch model, as a torch.fx pass.

    >>> import torch, fxsparse
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> sparse = fxsparse.sparsify(net, density=0.5, init="erk")
    >>> sorted(sparse.masks)
    ['0.weight', '2.weight']
"""

from fxsparse import dcp, methods, registry, sharding
from fxsparse.api import sparsify
from fxsparse.oneshot import prune_oneshot
from fxsparse.baselines import SmallDense, lottery_ticket, small_dense
from fxsparse.accounting import FlopReport, GradualPruning, flop_report, flops
from fxsparse.graph_module import LayerChange, SparseGraphModule
from fxsparse.export import export_inference
from fxsparse.methods import Method, available_methods, register_method
from fxsparse.registry import (
    register_grow_score, register_init, register_leaf_function, register_leaf_module, register_leaf_weights,
)
from fxsparse.scheduler import RigLScheduler, TopologyScheduler
from fxsparse.serialization import load_masks, save_masks

__version__ = "0.1.0"

__all__ = [
    "sparsify",
    "prune_oneshot",
    "export_inference",
    "SparseGraphModule",
    "LayerChange",
    "flops",
    "flop_report",
    "FlopReport",
    "GradualPruning",
    "TopologyScheduler",
    "RigLScheduler",
    "Method",
    "methods",
    "registry",
    "dcp",
    "sharding",
    "available_methods",
    "small_dense",
    "SmallDense",
    "lottery_ticket",
    "register_init",
    "register_grow_score",
    "register_method",
    "register_leaf_module",
    "register_leaf_function",
    "register_leaf_weights",
    "save_masks",
    "load_masks",
]
