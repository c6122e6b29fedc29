"""Sharded checkpoints of sparse training with ``torch.distributed.checkpoint`` (DCP), tensors only.

Under FSDP each rank writes its shards of the weights, the masks (sharded like their weights,
:mod:`fxsparse.sharding`) and the optimizer state; a checkpoint loads at any number of ranks,
into a sharded module or a plain ``sparsify``d one (DCP reshards by FQN), and a resume from it
is exact. DCP stores values that are not tensors by pickling them and loads them with an
unrestricted ``torch.load``: a checkpoint holding the optimizer's ``param_groups`` or a
scheduler's state that way can run code when it is loaded. So :func:`save` writes tensors only:
everything else (learning rates, betas, the scheduler's counters and history) travels as JSON in
a ``uint8`` tensor, and :func:`load` reads it back with ``json``::

    fxsparse.dcp.save("ckpt/step-1000", sparse, optimizer, scheduler)   # every rank
    fxsparse.dcp.load("ckpt/step-1000", sparse, optimizer, scheduler)   # any world size, sharded or not
"""

from __future__ import annotations

import json
from typing import Any

import torch

__all__ = ["save", "load", "state", "encode", "decode"]

_JSON = "__fxsparse_json__"  # the key of a subtree's JSON skeleton
_TENSOR = "__fxsparse_tensor__"  # a placeholder in a skeleton: {_TENSOR: key}


def encode(tree: Any, prefix: str) -> dict[str, torch.Tensor]:
    """``tree`` (nested dicts and lists of tensors and JSON values) as tensors only: each tensor
    under ``prefix.<path>``, the rest as JSON in a ``uint8`` tensor under ``prefix.__fxsparse_json__``."""
    tensors: dict[str, torch.Tensor] = {}

    def strip(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[f"{prefix}.{path}"] = node
            return {_TENSOR: f"{prefix}.{path}"}
        if isinstance(node, dict):
            if not all(isinstance(k, (str, int)) for k in node):
                raise TypeError(f"fxsparse.dcp: expected str or int keys at {prefix}.{path}, got {list(node)[:3]}")
            return {"__keys__": [[type(k).__name__, k] for k in node], "__values__": [strip(v, f"{path}.{k}") for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            return [strip(v, f"{path}.{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"fxsparse.dcp: {prefix}.{path} holds a {type(node).__name__}, which a tensors-only checkpoint cannot store")

    skeleton = json.dumps(strip(tree, "")).encode()
    tensors[f"{prefix}.{_JSON}"] = torch.frombuffer(bytearray(skeleton), dtype=torch.uint8)
    return tensors


def decode(tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """The tree :func:`encode` stored under ``prefix``."""

    def build(node: Any) -> Any:
        if isinstance(node, dict) and _TENSOR in node:
            return tensors[node[_TENSOR]]
        if isinstance(node, dict):
            keys = [int(k) if kind == "int" else k for kind, k in node["__keys__"]]
            return {k: build(v) for k, v in zip(keys, node["__values__"])}
        if isinstance(node, list):
            return [build(v) for v in node]
        return node

    return build(json.loads(bytes(tensors[f"{prefix}.{_JSON}"].tolist()).decode()))


def state(sparse: Any, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> dict[str, torch.Tensor]:
    """The tensors-only state DCP saves: the module's state dict (under FSDP, DTensors: this
    rank's shards), the optimizer's (``get_optimizer_state_dict``: by parameter FQN) and the
    scheduler's."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sparse.rezero()  # exact zeros at inactive positions, whatever edited the weights
    out = {f"model.{k}": v for k, v in get_model_state_dict(sparse).items()}
    if optimizer is not None:
        out.update(encode(get_optimizer_state_dict(sparse, optimizer), "optimizer"))
    if scheduler is not None:
        out.update(encode(scheduler.state_dict(), "scheduler"))
    return out


def save(path: Any, sparse: Any, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> None:
    """Writes ``sparse`` (weights, masks, buffers), ``optimizer`` and ``scheduler`` to the DCP
    checkpoint directory ``path``. A collective under torch.distributed: every rank calls it."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state(sparse, optimizer, scheduler), checkpoint_id=str(path))


def load(path: Any, sparse: Any, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> None:
    """Loads what :func:`save` wrote into ``sparse`` (sharded or not, at any world size; the
    masks are checked as ``load_state_dict`` checks them), ``optimizer`` and ``scheduler``. No
    value is unpickled. A collective under torch.distributed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    wanted = state(sparse, optimizer, scheduler)
    missing = [k for k in wanted if k not in metadata and not k.endswith(_JSON)]
    if missing:
        raise ValueError(f"fxsparse.dcp: the checkpoint {path} has no {missing[0]!r} (and {len(missing) - 1} more); "
                         "was it written by fxsparse.dcp.save with the same model, optimizer and scheduler?")
    for key in [k for k in wanted if k.endswith(_JSON)]:  # JSON blobs: allocated at their stored size
        if key not in metadata:
            raise ValueError(f"fxsparse.dcp: the checkpoint {path} holds no {key.split('.')[0]} state")
        wanted[key] = torch.empty(metadata[key].size, dtype=torch.uint8)
    dcp.load(wanted, checkpoint_id=str(path))
    # tensors the fresh state does not hold yet (SNFS's momentum before its first step): whole
    later = {key: torch.empty(metadata[key].size, dtype=metadata[key].properties.dtype)
             for prefix in ("optimizer", "scheduler") if f"{prefix}.{_JSON}" in wanted
             for key in _tensor_keys(wanted, prefix) if key not in wanted}
    if later:
        dcp.load(later, checkpoint_id=str(path))
        wanted.update(later)
    set_model_state_dict(sparse, {k[len("model."):]: v for k, v in wanted.items() if k.startswith("model.")})
    if optimizer is not None:
        set_optimizer_state_dict(sparse, optimizer, decode(wanted, "optimizer"))
    if scheduler is not None:
        scheduler.load_state_dict(_shard_like_weights(sparse, decode(wanted, "scheduler")))


def _tensor_keys(tensors: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """The tensor keys the JSON skeleton under ``prefix`` refers to."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict) and _TENSOR in node:
            found.append(node[_TENSOR])
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(bytes(tensors[f"{prefix}.{_JSON}"].tolist()).decode()))
    return found


def _shard_like_weights(sparse: Any, scheduler_state: dict[str, Any]) -> dict[str, Any]:
    """The scheduler's per-weight tensors (SNFS's momentum), loaded whole, as the weights are
    sharded on this module."""
    from fxsparse import sharding

    momentum = scheduler_state.get("momentum")
    if isinstance(momentum, dict):
        for fqn, value in list(momentum.items()):
            weight = sparse.get_parameter(fqn) if fqn in sparse._fxsparse.sites else None
            if weight is not None and sharding.is_sharded(weight) and not sharding.is_sharded(value):
                momentum[fqn] = sharding.shard_like(value, weight)
    return scheduler_state
