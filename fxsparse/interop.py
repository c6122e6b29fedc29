"""What the ecosystem calls on a model, spoken by a sparse module: back to the user's model
(``unwrap``), ``save_pretrained``, ``generate``, and activation checkpointing under the names
transformers' ``Trainer`` and ``PreTrainedModel`` use (``gradient_checkpointing_enable``,
``activation_checkpointing_enable``, ``is_gradient_checkpointing``).

:class:`ModelInterop` is a base of :class:`fxsparse.SparseGraphModule`; each method delegates to
the module that does the work (:mod:`fxsparse.unwrap`, :mod:`fxsparse.serialization`,
:mod:`fxsparse.checkpointing`). See docs/after_training.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from fxsparse import blocks as _blocks
from fxsparse import checkpointing, serialization
from fxsparse.unwrap import unwrap

__all__ = ["ModelInterop"]


class ModelInterop:
    """The ecosystem's model protocol on a sparse module (a mixin of SparseGraphModule)."""

    def unwrap(self, *, share: bool = False) -> nn.Module:
        """The model ``sparsify`` was given (its class, config and attributes) holding this
        module's weights, inactive entries exactly zero (compact layers materialized), and its
        buffers; ``model.fxsparse_masks`` holds the masks. It computes what this module computes
        in eval mode. ``share=True``: the same tensors, no copy (training this module changes it;
        call again after a topology update). See docs/after_training.md."""
        return unwrap(self, share=share)

    def save_pretrained(self, directory: str | Any, **kwargs: Any) -> Any:
        """Writes the unwrapped model into ``directory`` as its library saves it (transformers:
        its ``save_pretrained(directory, **kwargs)``; others: ``model.safetensors``) and the masks
        beside it (``fxsparse_masks.safetensors``, :func:`fxsparse.load_masks`)."""
        return serialization.save_pretrained(self, directory, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` of the unwrapped model (transformers), on this module's own tensors: the
        KV cache and every decoding option of the model, with the trained sparse weights."""
        model = self.unwrap(share=True)
        if not callable(getattr(model, "generate", None)):
            raise AttributeError(f"{type(model).__name__}, the model this module was made from, has no generate()")
        return model.generate(*args, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Mapping[str, Any] | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recomputes the activations of the model's blocks in the backward instead of keeping
        them (what ``Trainer(gradient_checkpointing=True)`` calls; same losses and gradients).
        The kwargs go to ``torch.utils.checkpoint.checkpoint``. See :mod:`fxsparse.checkpointing`."""
        checkpointing.enable(self, activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
                                      **kwargs: Any) -> None:
        """transformers' older name of :meth:`activation_checkpointing_enable`."""
        checkpointing.enable(self, gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        checkpointing.disable(self)

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(checkpointing.checkpointed_blocks(self))

    def keep_blocks(self, blocks: Any = None) -> list[str]:
        """Makes the model's repeated blocks (or the module paths ``blocks``) modules whose own
        forward runs, as they are in the model: what ``fully_shard`` on each block (FSDP2) and
        other per-block wrappers need. Returns the blocks' paths. See :mod:`fxsparse.blocks`."""
        return _blocks.keep(self, blocks)

    def release_blocks(self) -> None:
        """Undoes :meth:`keep_blocks`: the graphs as captured again."""
        _blocks.release(self)

    @property
    def kept_blocks(self) -> list[str]:
        """The paths of the blocks :meth:`keep_blocks` made modules whose forward runs."""
        return _blocks.kept_blocks(self)
