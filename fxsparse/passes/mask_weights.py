"""Editing pass: every read of a sparsified weight goes through one masked-weight node.

Invariant: the graph starts with ``mask_prologue(masker, names, weights, masks)``, which sets the
inactive entries of every weight to zero and hooks each weight's gradient accumulation to mask
it; then for each sparsified parameter there is exactly one node
``masker(get_attr(w), get_attr(mask), name=fqn)`` per name the parameter is read under (tied
names read the same parameter, unless a parametrization on one owner computes it), placed before
the first read under that name, and no other node reads the parameter: every former ``get_attr``
of it now reads one of those nodes. Their captured gradients are summed into one dense growth
gradient per weight (armed steps); otherwise they hand the weight through.
Run after ``functionalize``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.fx

from fxsparse.kernels import mask_kernels
from fxsparse.masking import mask_prologue

__all__ = ["mask_weights"]


def mask_weights(
    gm: torch.fx.GraphModule,
    mask_names: Mapping[str, str],
    names: Mapping[str, str],
    masker: str,
    hooked: Mapping[str, str] | None = None,
    kernels: Mapping[str, str] | None = None,
) -> None:
    """Inserts the masked-weight subgraphs in place.

    Args:
        gm: the graph module, with every use of the weights in ``mask_names`` a ``get_attr``.
        mask_names: canonical weight FQN -> qualified name of its mask buffer.
        names: every parameter name -> its canonical FQN (tied weights share one).
        masker: qualified name of the :class:`fxsparse.masking.Masker` submodule.
        hooked: weights an opaque leaf uses (FQN -> mask name): the prologue zeroes them and
            hooks their gradient on the parameter; any graph reads of them stay as they are.
        kernels: weights products read through a kernel computed from them (FQN -> mask name):
            the prologue zeroes them and masks their gradient, their reads stay as they are, and
            each kernel the graph computes is masked (:func:`fxsparse.kernels.mask_kernels`).
    """
    hooked = dict(hooked or {})
    kernels = dict(kernels or {})
    graph = gm.graph
    reads: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr" and names.get(str(node.target)) in mask_names:
            reads.setdefault(names[str(node.target)], []).append(node)
    # the prologue reads every weight and mask first and zeroes the inactive entries (masking.mask_prologue)
    first = next(n for n in graph.nodes if n.op != "placeholder")
    everything = {**{fqn: mask_names[fqn] for fqn in reads}, **hooked, **kernels}
    with graph.inserting_before(first):
        masker_node = graph.get_attr(masker)
        weights = {fqn: graph.get_attr(fqn) for fqn in everything}
        masks = {fqn: graph.get_attr(mask) for fqn, mask in everything.items()}
        graph.call_function(
            mask_prologue,
            (masker_node, tuple(everything), list(weights.values()), list(masks.values()), tuple(hooked)),
        )
    for fqn, nodes in reads.items():
        # one masked node per name the weight is read under: a tied weight that one of its
        # owners parametrizes is P(w) under that owner's name and w under the other's
        by_name: dict[str, list[torch.fx.Node]] = {}
        for node in nodes:
            by_name.setdefault(str(node.target), []).append(node)
        for name, group in by_name.items():
            with graph.inserting_before(group[0]):
                source = weights[fqn] if name == fqn else graph.get_attr(name)
                masked = graph.call_module(masker, (source, masks[fqn]), {"name": fqn})
            masked.meta["fxsparse.masked"] = fqn
            for node in group:
                node.replace_all_uses_with(masked)
                graph.erase_node(node)
    mask_kernels(gm, kernels, names, masker)
    missing = sorted(set(mask_names) - set(reads))
    if missing:
        raise AssertionError(f"fxsparse: weights {missing} have no read left in the graph to mask")
    graph.lint()
