"""A graph per call signature: an exported sparse module takes what the model takes.

torch.export captures one call signature: the keyword inputs the example had (``input_ids``
alone cannot be called with ``attention_mask`` or ``labels``) and the dtype the model had
(constants and casts are baked into the graph). A module made by the export front-end keeps the
graphs of each signature it has been called with, keyed by the positional count, the keyword
names (and which are None) and the parameters' floating dtype. A call with a new signature
captures the model again, from ``unwrap(share=True)`` (the user's model on the sparse module's
own tensors, no copy), on that call's inputs, and masks the new graphs like the first ones:
the same parameters, masks and masker, so the topology, optimizer and checkpoints are shared
by every signature. That first call costs a capture (about what ``sparsify`` spent capturing);
later calls switch graphs only when the signature changes.

:func:`adopt_and_mask` is also how ``sparsify`` masks its eval-mode graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from fxsparse import checkpointing
from fxsparse.capture import capture as capture_graph, pytree_specs, resolve
from fxsparse.masking import MASKER
from fxsparse.passes.find_weights import canonical_names
from fxsparse.passes.functionalize import functionalize
from fxsparse.kernels import is_masked_layer, site_groups
from fxsparse.passes.mask_weights import mask_weights

__all__ = ["signature_of", "follow_signature", "adopt_and_mask", "read_by", "install"]


def signature_of(sparse: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """What an exported graph is specific to: each positional and keyword input's kind (a tensor,
    or the value itself of a None, bool, number or string, which torch.export bakes into the
    graph) and the floating dtype of the parameters."""
    dtype = next((p.dtype for p in sparse.parameters() if p.is_floating_point()), None)
    return (tuple(_kind(a) for a in args), tuple(sorted((k, _kind(v)) for k, v in kwargs.items())), str(dtype))


def _kind(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    return type(value).__name__


def follow_signature(sparse: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Has ``sparse`` run the graphs of this call's signature, capturing them first when new.
    Returns whether the graphs changed."""
    state = sparse._fxsparse
    key = signature_of(sparse, args, kwargs)
    if key == state.signature or state.signature is None:  # None: made before signatures were kept
        return False
    if sparse.masker.sharded and key not in state.signatures:
        raise ValueError(
            f"fxsparse: the module was called with inputs it was not captured with (keywords {sorted(kwargs)}, "
            f"{len(args)} positional), which needs a new capture, but its weights are sharded (fully_shard) and a "
            "capture reads whole weights; nothing was changed. Sparsify from an example called as training calls "
            "the module (example_inputs=((), {'input_ids': ids, 'labels': ids}) for a transformers model called "
            "with labels), or call it as it was captured"
        )
    kept = checkpointing.options(sparse)
    if kept is not None:
        checkpointing.disable(sparse)
    graphs = dict(state.mode_graphs) if state.mode_graphs else {True: sparse.graph, False: sparse.graph}
    state.signatures[state.signature] = {"graphs": graphs, "specs": pytree_specs(sparse)}
    entry = state.signatures.get(key) or _capture(sparse, args, dict(kwargs))
    state.signatures[key] = entry
    state.signature = key
    state.mode_graphs = dict(entry["graphs"])
    for name, spec in entry["specs"].items():
        setattr(sparse, name, spec)
    sparse._set_state(state)  # the preserved pytree specs follow
    sparse.graph = state.mode_graphs[bool(sparse.training)]
    if kept is not None:
        checkpointing.enable(sparse, **kept)
    return True


def _capture(sparse: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    state = sparse._fxsparse
    held = sorted(fqn for fqn in state.sites if not sparse.layout_of(fqn).recapturable)
    if held:
        raise ValueError(
            f"fxsparse: this call's inputs ({sorted(kwargs)}, {len(args)} positional, parameters in "
            f"{signature_of(sparse, args, kwargs)[2]}) differ from those the module was captured with, which needs a "
            f"new capture, and layers in the {state.sites[held[0]].layout} layout ({held[:3]}) cannot be captured "
            f"again; sparsify with example_inputs holding every keyword you call with, or layout='masked'"
        )
    model = sparse.unwrap(share=True)
    try:
        captured = capture_graph(model, (tuple(args), dict(kwargs)), "export")
    except TypeError as e:
        raise TypeError(
            f"fxsparse: the module was called with inputs it was not captured with (keywords {sorted(kwargs)}), "
            f"and capturing the model for them failed; call it as the model is called, or sparsify from such "
            f"an example. {e}"
        ) from e
    names = canonical_names(model)
    own = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    own |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    masked, hooked, kernels = site_groups(state.sites)
    done: dict[int, torch.fx.Graph] = {}
    graphs = {}
    for mode, gm in captured.graphs.items():
        if id(gm) not in done:
            functionalize(gm, set(state.sites))
            done[id(gm)] = adopt_and_mask(sparse, gm, own, masked, names, hooked, kernels, prefix="fxsparse_capture_")
        graphs[mode] = done[id(gm)]
    return {"graphs": graphs, "specs": pytree_specs(captured.train)}


def adopt_and_mask(
    sparse: Any, gm: torch.fx.GraphModule, own: set[str], masked: Mapping[str, str], names: Mapping[str, str],
    hooked: Mapping[str, str], kernels: Mapping[str, str], *, prefix: str, same_paths: bool = False,
) -> torch.fx.Graph:
    """``gm``'s graph masked like ``sparse``'s, reading ``sparse``'s attributes.

    Parameters and buffers (``own``) are the model's own in every graph (same tensors, same
    names). What else the graph reads is adopted: installed on ``sparse`` under ``prefix`` + its
    name, or, with ``same_paths`` (a symbolic trace, whose targets are the model's own paths), at
    the same path where ``sparse`` lacks it; tensors become non-persistent buffers, so that a
    copy made in one mode keeps what another graph reads."""
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module") or str(node.target) in own:
            continue
        target = str(node.target)
        value = resolve(gm, target)
        present = resolve(sparse, target)
        if present is value or (same_paths and is_masked_layer(present)):
            continue  # the same, or the layer sparsify replaced by its masked trace (fxsparse.kernels)
        if same_paths and present is None:
            name = target
        else:
            name = prefix + target.replace(".", "_")
            while resolve(sparse, name) is not None:
                name += "_"
        install(sparse, name, value)
        node.target = name
    current = sparse.graph
    sparse.graph = gm.graph  # the pass inserts get_attr nodes: let them resolve on sparse
    try:
        mask_weights(sparse, read_by(gm.graph, masked, names), names, MASKER, hooked=hooked, kernels=kernels)
    finally:
        sparse.graph = current
    return gm.graph


def read_by(graph: torch.fx.Graph, masked: Mapping[str, str], names: Mapping[str, str]) -> dict[str, str]:
    """The masked weights ``graph`` reads (a head computed in one mode only is not read in the
    other's graph)."""
    read = {names.get(str(n.target)) for n in graph.nodes if n.op == "get_attr"}
    return {fqn: mask for fqn, mask in masked.items() if fqn in read}


def install(module: nn.Module, target: str, value: Any) -> None:
    """Puts ``value`` at the dotted path ``target`` of ``module`` (containers made as needed): a
    submodule, a non-persistent buffer for a tensor that is no parameter, else an attribute."""
    *path, field = target.split(".")
    owner = module
    for part in path:
        child = getattr(owner, part, None)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if isinstance(value, nn.Module):
        owner.add_module(field, value)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(field, value)
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(field, value, persistent=False)
    else:
        setattr(owner, field, value)
        if owner is module and isinstance(module, torch.fx.GraphModule):
            # GraphModule.__deepcopy__ keeps only what its graph reads and what is listed here: an
            # attribute the other mode's graph reads (a higher-order op's index function) must survive a copy
            module.meta.setdefault("_user_preserved_attributes", {})[field] = value
