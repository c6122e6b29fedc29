"""Coverage sweep: does ``sparsify`` keep its guarantees on every Hugging Face transformers model type?

For every model type of the installed ``transformers`` (``CONFIG_MAPPING_NAMES``; in a fixed
pseudo-random order, crc32 of the name, so that a partial sweep is a fair sample; ``--only``
names some, ``--limit N`` stops after N), in a process of its own (forked from a server that
imported torch and transformers once) with a time limit (``--timeout``) and one thread, never
downloading anything:

1. config: the type's default config made tiny, generically (:func:`tiny_config`): widths 32,
   feed-forward 64, 2 heads of 16, 1-2 layers, vocabulary 256, positions 128, 4 experts, small
   images, no key/value cache and LayerDrop off, in every nested sub-config (text/vision/audio/
   backbone...) too. When the tiny config
   cannot be built or run, a "reduced" one (layers, vocabulary and experts only) and then the
   default config are tried, if under ``--max-params``;
2. model: the first auto class with a loss that maps the type (CausalLM, MaskedLM, Seq2SeqLM,
   SpeechSeq2Seq, Sequence/Image/Audio classification), else the base ``AutoModel``; random
   weights (``from_config``);
3. inputs from the model's ``main_input_name`` and config (:func:`input_candidates`): token ids
   (+ attention mask, decoder ids for encoder-decoders, labels for the head's loss), pixel
   values, raw audio or audio features; the first candidate whose eager forward and backward run
   is used, else the type is listed as "could not make inputs" with the eager error;
4. :func:`fxsparse.checks.check_model` (``capture="auto"``: symbolic tracing, else torch.export):
   sparsify at density 0.1 ERK, exact counts, density 1.0 equals the model (eval), gradients
   masked, one ``rigl_step``; and the share of conv/linear/matmul weights sparsified.

Each outcome is appended to a JSON-lines file as it comes (``--results``; a rerun skips the types
already there, so a sweep can be resumed; ``--rerun timeout,crashed`` runs those again) and
``--out`` writes the Markdown page: totals by outcome and by failing check, every model type with
its result and the first line of its error, the commands, versions and time.

Run (the whole registry takes hours; ``--workers 2`` halves it on 2 cores):
    .venv/bin/python benchmarks/transformers_coverage.py --workers 2 --out docs/transformers_coverage.md
    .venv/bin/python benchmarks/transformers_coverage.py --only bert,gpt2,t5 --results /tmp/few.jsonl
    .venv/bin/python benchmarks/transformers_coverage.py --report-only --out docs/transformers_coverage.md

Needs ``transformers`` (``pip install fxsparse[transformers]``); ``--help`` works without it.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import datetime
import inspect
import json
import math
import multiprocessing
import os
import re
import shlex
import sys
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from sweeps import commands, export_evidence, limits_section, listed, load_records  # noqa: E402

__all__ = ["main", "check_one", "tiny_config", "input_candidates", "write_report", "STATUSES"]

INSTALL_HINT = "benchmarks/transformers_coverage.py needs transformers: pip install fxsparse[transformers]"

# outcomes, in the order the page lists them
STATUSES = ("ok", "failed", "could not make inputs", "could not build", "too large", "no model class", "timeout", "crashed")

# ---------------------------------------------------------------------------------------------
# 1. tiny configs
# ---------------------------------------------------------------------------------------------

WIDTH, FFN, HEADS, HEAD_DIM, LAYERS = 32, 64, 2, 16, 2
VOCAB, POSITIONS, EXPERTS, TOP_K = 256, 128, 4, 2
SPECIAL_FROM = 200  # token ids at or above this are remapped to the top of the tiny vocabulary

# field name -> the value it shrinks to (only ever shrinks: a smaller value is kept)
_WIDTH_KEYS = {
    "hidden_size", "d_model", "n_embd", "n_embed", "dim", "embed_dim", "embedding_size", "embedding_dim",
    "emb_dim", "projection_dim", "out_hidden_size", "text_hidden_size", "vision_hidden_size",
    "encoder_hidden_size", "decoder_hidden_size", "word_embed_proj_dim", "projector_hidden_size",
    "output_hidden_size", "text_embed_dim", "vision_embed_dim", "fusion_hidden_size", "encoder_hidden_dim",
    "decoder_embed_dim", "d_embed", "audio_hidden_size", "cross_hidden_size", "backbone_hidden_size",
    "projection_size", "project_dim", "attention_hidden_size", "output_dim", "image_text_hidden_size",
    "pooler_output_size", "hidden_size_global", "codebook_dim", "latent_dim", "output_channels", "fpn_hidden_size",
    "iou_head_hidden_dim", "mask_feature_size", "reassemble_hidden_size", "head_hidden_size", "encoder_embed_dim",
}
_FFN_KEYS = {
    "intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner", "mlp_dim",
    "hidden_dim", "moe_intermediate_size", "shared_expert_intermediate_size", "shared_experts_intermediate_size",
    "decoder_intermediate_size", "d_inner", "ffn_hidden_size", "moe_shared_expert_intermediate_size",
    "shared_intermediate_size", "intermediate_size_mlp", "dense_intermediate_size", "moe_hidden_size",
    "encoder_linear_units", "decoder_linear_units", "dim_feedforward", "encoder_feedforward_dim",
    "speech_encoder_intermediate_size", "projection_intermediate_size", "memory_fuser_intermediate_dim",
}
_HEAD_KEYS = {
    "num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads", "decoder_attention_heads",
    "attention_heads", "swa_num_attention_heads", "index_n_heads", "linear_num_value_heads",
    "linear_num_key_heads", "cross_num_attention_heads", "resampler_n_heads", "linear_num_heads",
    "decoder_cross_attention_heads", "speech_encoder_attention_heads",
}
_KV_KEYS = {"num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num", "cross_num_key_value_heads",
            "swa_num_key_value_heads"}
_HEAD_DIM_KEYS = {
    "head_dim", "d_kv", "v_head_dim", "qk_nope_head_dim", "qk_rope_head_dim", "swa_head_dim", "index_head_dim",
    "linear_key_head_dim", "linear_value_head_dim", "kv_channels", "attention_head_dim", "rotary_dim",
    "dim_head", "d_head", "cross_head_dim", "resampler_head_dim", "linear_head_dim", "global_head_dim",
}
_LAYER_KEYS = {
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
    "num_decoder_layers", "num_encoder_layers", "depth", "max_window_layers", "layers",
    "speech_encoder_layers", "conf_num_hidden_layers", "decoder_num_layers", "num_blocks",
}
_POSITION_KEYS = {"max_position_embeddings", "n_positions", "max_target_positions", "max_source_positions",
                  "n_ctx", "max_seq_len", "t2u_max_position_embeddings"}
_EXPERT_KEYS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts"}
_TOP_K_KEYS = {"num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_k", "num_experts_per_token"}
_LORA_KEYS = {"kv_lora_rank": 16, "q_lora_rank": 32, "laurel_rank": 16, "loop_gate_rank": 16, "hc_lowrank": 16}
# lists of channel widths: scaled down together by one power of two, so their ratios stay
_WIDTH_LIST_KEYS = {
    "hidden_sizes", "embed_dim", "embed_dims", "conv_dim", "tdnn_dim", "neck_hidden_sizes",
    "encoder_hidden_sizes", "stage_out_channels", "stage_in_channels", "stage_mid_channels",
    "backbone_channel_list", "in_channels", "out_channels", "decoder_in_channels", "encoder_in_channels",
    "embed_dim_per_stage", "downsample_channels", "hidden_dims", "dims", "widths", "post_process_channels",
    "convstream_hidden_sizes", "fusion_hidden_sizes", "keypoint_encoder_sizes", "base_attn_unit_dims",
    "intermediate_feature_dims", "scaled_images_feature_dims", "vision_features_channels",
}
_HEAD_LIST_KEYS = {"num_heads", "num_attention_heads", "num_attention_heads_per_stage"}
_DEPTH_LIST_KEYS = {"depths", "blocks_per_stage", "stage_num_blocks", "num_block_repeats", "depth", "block_repeats",
                    "n_attn_blocks", "stage_numb_of_layers"}
_INDEX_LIST = re.compile(r"(indexes|indices|idxs|_layer_ids|_layers|hook_ids|target_layers|_blocks)$")
_TOKEN_KEY = re.compile(r"(token_id|token_index|token_ids)$")


def tiny_config(model_type: str, mode: str = "tiny") -> Any:
    """The default config of ``model_type`` made small: ``mode`` "tiny" (every size shrunk),
    "reduced" (layers, vocabulary, positions and experts only, token ids remapped) or "default"
    (as it comes). Always ``use_cache=False`` (training) and LayerDrop off (``*layerdrop = 0``:
    random layer skipping in train mode is Python control flow on a random number, which no
    graph capture can record; ``sparsify`` names the line when it meets it), in every sub-config."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    tokens: dict[int, int] = {}  # one remap of special token ids across all sub-configs
    changes = _shrink(default, mode, tokens, top=True)
    return AutoConfig.for_model(model_type, **changes)


def _fields(config: Any) -> dict[str, Any]:
    """The config's constructor fields (dataclass fields of transformers 5 configs) and values."""
    names = (
        [f.name for f in dataclasses.fields(config)] if dataclasses.is_dataclass(config)
        else list(inspect.signature(type(config).__init__).parameters)[1:]
    )
    values = {}
    for name in names:
        if name.startswith("_") or name in ("self", "kwargs"):
            continue
        try:
            values[name] = getattr(config, name)
        except Exception:  # noqa: BLE001 - per-layer attributes refuse a global read
            continue
    return values


def _shrink(config: Any, mode: str, tokens: dict[int, int], top: bool = False) -> dict[str, Any]:
    """Changed fields of ``config`` (top level) or all its fields, changed (a sub-config, passed as a dict)."""
    from transformers import PretrainedConfig

    tiny = mode == "tiny"
    values = _fields(config)
    out: dict[str, Any] = {} if top else dict(values, model_type=config.model_type)

    def put(key: str, new: Any) -> None:
        if new != values.get(key):
            out[key] = new

    old_layers = next((values[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                       if isinstance(values.get(k), int)), None)
    new_layers = min(old_layers, LAYERS) if old_layers else None
    heads = next((values[k] for k in ("num_attention_heads", "n_head", "num_heads", "n_heads")
                  if isinstance(values.get(k), int) and not isinstance(values.get(k), bool)), None)
    list_scale = _list_scale(values) if tiny else 1
    for key, value in values.items():
        if isinstance(value, PretrainedConfig):
            out[key] = _shrink(value, mode, tokens)
            continue
        if isinstance(value, float) and key.endswith("layerdrop"):
            put(key, 0.0)  # LayerDrop skips layers at random in train mode: no graph captures that
            continue
        if isinstance(value, bool) or value is None or mode == "default":
            continue
        if isinstance(value, int):
            if _TOKEN_KEY.search(key):
                put(key, _token(value, tokens))
            elif key in _LAYER_KEYS and value > LAYERS and not ("depths" in values and key == "num_layers"):
                put(key, LAYERS)
            elif key == "first_k_dense_replace" or key == "num_dense_layers":
                put(key, min(value, 1))
            elif key == "vocab_size" or key.endswith("_vocab_size") or key.startswith("vocab_size"):
                put(key, min(value, VOCAB))
            elif key in _POSITION_KEYS:
                put(key, min(value, POSITIONS))
            elif key in _EXPERT_KEYS:
                put(key, min(value, EXPERTS))
            elif key in _TOP_K_KEYS:
                put(key, min(value, TOP_K))
            elif key in ("n_group", "topk_group", "n_shared_experts", "num_shared_experts"):
                put(key, min(value, 1))
            elif not tiny:
                continue
            elif key in _WIDTH_KEYS:
                put(key, min(value, WIDTH))
            elif key in _FFN_KEYS:
                put(key, min(value, FFN))
            elif key in _HEAD_KEYS:
                put(key, min(value, HEADS))
            elif key in _KV_KEYS:  # grouped-query stays grouped (1 of 2), multi-head stays multi-head
                put(key, 1 if heads and value < heads else min(value, HEADS))
            elif key in _HEAD_DIM_KEYS:
                put(key, min(value, HEAD_DIM))
            elif key in _LORA_KEYS:
                put(key, min(value, _LORA_KEYS[key]))
            elif key == "image_size":
                put(key, _image_size(value, values.get("patch_size")))
            elif key == "num_pos_feats":  # sine position features, two per width channel
                put(key, min(value, WIDTH // 2))
            elif key == "num_frames":
                put(key, min(value, 4))
            elif key == "window_size" and "depths" in values:  # windows fit the last stage of a tiny image
                put(key, min(value, 2))
        elif isinstance(value, (list, tuple)) and old_layers and new_layers and len(value) == old_layers \
                and old_layers > new_layers and key not in _WIDTH_LIST_KEYS | _DEPTH_LIST_KEYS:
            out[key] = list(value)[:new_layers]  # one entry per layer (layer_types, ...)
        elif isinstance(value, (list, tuple)) and value and all(type(v) is int for v in value):
            new = list(value)
            if key in ("out_indices", "vision_feature_layer") or _INDEX_LIST.search(key):
                if new_layers and any(v >= new_layers for v in value):
                    new = sorted({min(v, new_layers - 1 if key != "out_indices" else new_layers) for v in value})
            elif _TOKEN_KEY.search(key):
                new = [_token(v, tokens) for v in value]
            elif not tiny:
                pass
            elif key in _DEPTH_LIST_KEYS:
                new = [min(v, 1) for v in value]
            elif key in _WIDTH_LIST_KEYS:
                new = [max(v // list_scale, 8) if v >= 16 else v for v in value]
            elif key in _HEAD_LIST_KEYS and all(v % value[0] == 0 for v in value):
                new = [v // value[0] for v in value]
            elif key == "image_size":
                new = [_image_size(v, values.get("patch_size")) for v in value]
            elif key in _FFN_KEYS:
                new = [min(v, FFN) for v in value]
            elif key == "axial_pos_shape":  # reformer: the factors multiply to the sequence length
                new = [4, LENGTH // 4]
            elif key == "axial_pos_embds_dim":  # ... and these add up to the width
                new = [WIDTH // 2, WIDTH // 2]
            if new != list(value):
                out[key] = type(value)(new) if isinstance(value, tuple) else new
        elif isinstance(value, dict) and tiny and isinstance(value.get("mrope_section"), list):
            out[key] = {**value, "mrope_section": _rescale(value["mrope_section"], HEAD_DIM // 2)}
        elif isinstance(value, dict) and tiny and key == "rope_parameters" and \
                "mrope_section" in getattr(type(config), "ignore_keys_at_rope_validation", ()):
            # multimodal rotary sections default to [16, 24, 24] in the model's code: half a 128 head
            out[key] = {**value, "mrope_section": _rescale([16, 24, 24], HEAD_DIM // 2)}
    if "stage_names" in values and old_layers and new_layers != old_layers and "depths" not in values:
        for key in ("out_features", "out_indices"):  # per-layer backbones: recomputed from the new depth
            out.pop(key, None)
            if not top:
                out[key] = None
    if values.get("use_cache"):
        out["use_cache"] = False  # training: no key/value cache in the outputs, in every sub-config
    if tiny and "qk_head_dim" in values and "qk_nope_head_dim" in values and "qk_rope_head_dim" in values:
        nope = out.get("qk_nope_head_dim", values["qk_nope_head_dim"])
        out["qk_head_dim"] = nope + out.get("qk_rope_head_dim", values["qk_rope_head_dim"])
    return out


def _token(value: int, tokens: dict[int, int]) -> int:
    if value < SPECIAL_FROM:
        return value
    if value not in tokens:
        tokens[value] = VOCAB - 1 - len(tokens)
    return tokens[value]


def _image_size(value: int, patch: Any) -> int:
    patch = patch if isinstance(patch, int) and patch > 0 else 8
    return min(value, patch * max(4, math.ceil(64 / patch)))


def _list_scale(values: dict[str, Any]) -> int:
    """The power of two that brings the widest channel list to 64 or less."""
    widest = max((v for k in _WIDTH_LIST_KEYS if isinstance(values.get(k), (list, tuple))
                  for v in values[k] if type(v) is int), default=0)
    scale = 1
    while widest / scale > 64:
        scale *= 2
    return scale


def _rescale(section: list[int], total: int) -> list[int]:
    """Integer parts proportional to ``section`` summing to ``total`` (rotary sections per axis)."""
    parts = [max(1, v * total // sum(section)) for v in section]
    parts[-1] += total - sum(parts)
    return parts


# ---------------------------------------------------------------------------------------------
# 2. model classes
# ---------------------------------------------------------------------------------------------

# (mapping in transformers.models.auto.modeling_auto, auto class, which labels its loss takes)
HEADS_WITH_LOSS = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM", "tokens"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM", "tokens"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM", "tokens"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "AutoModelForSpeechSeq2Seq", "tokens"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification", "class"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification", "class"),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "AutoModelForAudioClassification", "class"),
)
BASE = ("MODEL_MAPPING_NAMES", "AutoModel", None)


def auto_classes(model_type: str) -> list[tuple[str, str | None]]:
    """(auto class, labels) to try for ``model_type``: the first head with a loss, then AutoModel;
    for a type that neither maps, the first other auto class that does (depth estimation,
    object detection, retrieval...), without labels."""
    import transformers
    from transformers.models.auto import modeling_auto

    found = [(auto, labels) for mapping, auto, labels in HEADS_WITH_LOSS
             if model_type in getattr(modeling_auto, mapping, {})][:1]
    if model_type in modeling_auto.MODEL_MAPPING_NAMES:
        found.append((BASE[1], BASE[2]))
    if not found:
        for name in sorted(n for n in dir(modeling_auto) if n.startswith("AutoModelFor")):
            names = getattr(getattr(getattr(transformers, name, None), "_model_mapping", None), "_model_mapping", {})
            if model_type in names:
                return [(name, None)]
    return found or _direct_classes(model_type)


def _direct_classes(model_type: str) -> list[tuple[str, str | None]]:
    """Model classes of the type's own package that take its config (sub-models such as
    ``blip_text_model``, which no auto class maps), as ``("direct:Name", None)``."""
    import importlib

    from transformers import PreTrainedModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config_class = CONFIG_MAPPING[model_type]
        module = importlib.import_module(config_class.__module__.replace(".configuration_", ".modeling_"))
    except Exception:  # noqa: BLE001 - no modeling module: no model class
        return []
    names = [
        name for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, PreTrainedModel) and "PreTrained" not in name
        and getattr(value, "config_class", None) is config_class
    ]
    names.sort(key=lambda n: (not n.endswith("Model"), len(n), n))
    return [(f"direct:{module.__name__}.{names[0]}", None)] if names else []


def _model_class(auto: str) -> Any:
    """The class whose ``from_config`` builds the model: an auto class, or ``direct:module.Name``."""
    import importlib

    import transformers

    if auto.startswith("direct:"):
        module, name = auto[len("direct:"):].rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        return type(name, (), {"from_config": staticmethod(lambda config: cls._from_config(config))})
    return getattr(transformers, auto)


# ---------------------------------------------------------------------------------------------
# 3. inputs
# ---------------------------------------------------------------------------------------------

BATCH, LENGTH = 2, 16


def input_candidates(model: Any, labels: str | None) -> list[tuple[str, dict[str, Any]]]:
    """Keyword inputs to try, best first, as (description, inputs): from ``main_input_name``,
    the forward's parameters and the config. Empty when there is no recipe for the main input."""
    import torch

    config = model.config
    params = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    gen = torch.Generator().manual_seed(0)
    text = _sub(config, "text_config", "decoder", "text_encoder") or config
    vision = _sub(config, "vision_config", "image_config", "backbone_config") or config
    vocab = int(getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or VOCAB)
    specials = _special_ids(config)

    def ids(length: int = LENGTH) -> torch.Tensor:
        allowed = torch.tensor([i for i in range(min(vocab, SPECIAL_FROM)) if i not in specials] or [0])
        out = allowed[torch.randint(len(allowed), (BATCH, length), generator=gen)]
        eos = getattr(text, "eos_token_id", None)
        if isinstance(eos, int) and 0 <= eos < vocab:
            out[:, -1] = eos  # as a tokenizer ends a sequence (sequence classifiers look for it)
        return out

    def pixels(frames: int | None = None) -> torch.Tensor:
        size = getattr(vision, "image_size", None) or getattr(config, "image_size", None) or 64
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        channels = getattr(vision, "num_channels", None) or 3
        shape = (BATCH, channels, h, w) if frames is None else (BATCH, frames, channels, h, w)
        return torch.randn(*shape, generator=gen)

    mains: list[tuple[str, dict[str, Any]]] = []
    if main == "input_ids":
        x = ids()
        base = {"input_ids": x}
        if "attention_mask" in params:
            base["attention_mask"] = torch.ones_like(x)
        mains.append(("ids", base))
    elif main == "pixel_values":
        mains.append(("image", {"pixel_values": pixels()}))
        frames = getattr(vision, "num_frames", None) or getattr(config, "num_frames", None)
        if frames:
            mains.append(("video", {"pixel_values": pixels(int(frames))}))
    elif main == "input_values":
        mains += [("audio", {"input_values": torch.randn(BATCH, 4000, generator=gen)}),
                  ("audio 1ch", {"input_values": torch.randn(BATCH, 1, 4000, generator=gen)})]
    elif main == "input_features":
        audio = _sub(config, "audio_config", "encoder_config") or config
        feats = next((int(v) for v in (getattr(audio, k, None) for k in ("num_mel_bins", "feature_size", "input_feat_size", "input_dim"))
                      if isinstance(v, int)), 80)
        if isinstance(getattr(audio, "input_feat_per_channel", None), int):
            feats = audio.input_feat_per_channel * getattr(audio, "input_channels", 1)
        positions = getattr(audio, "max_source_positions", None)
        frames = 2 * positions if isinstance(positions, int) else 64
        mains += [("features", {"input_features": torch.randn(BATCH, feats, frames, generator=gen)}),
                  ("features T-major", {"input_features": torch.randn(BATCH, frames, feats, generator=gen)})]
    else:
        return []
    extras: list[tuple[str, dict[str, Any]]] = [("", {})]
    if main != "pixel_values" and "pixel_values" in params:
        extras.append((" + image", {"pixel_values": pixels()}))
    if main != "input_ids" and "input_ids" in params and not getattr(config, "is_encoder_decoder", False):
        extras.append((" + ids", {"input_ids": ids()}))
    decoder = {}
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        decoder = {"decoder_input_ids": ids(8)}
    label_options: list[tuple[str, dict[str, Any]]] = []
    if labels == "tokens" and "labels" in params:
        label_options.append((" + labels", {"labels": decoder.get("decoder_input_ids", mains[0][1].get("input_ids"))}))
    elif labels == "class" and "labels" in params:
        num = int(getattr(config, "num_labels", 2) or 2)
        label_options.append((" + labels", {"labels": torch.arange(BATCH) % num}))
    label_options = [o for o in label_options if all(v is not None for v in o[1].values())] + [("", {})]
    return [
        (f"{m}{' + decoder ids' if decoder else ''}{e}{lab}", {**inputs, **decoder, **extra, **lab_inputs})
        for lab, lab_inputs in label_options for m, inputs in mains for e, extra in extras
    ]


def _sub(config: Any, *names: str) -> Any:
    for name in names:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            return sub
    return None


def _special_ids(config: Any) -> set[int]:
    """Every token id the config names (image tokens and the like must not appear at random)."""
    found: set[int] = set()
    for key, value in _fields(config).items():
        if hasattr(value, "to_dict"):
            found |= _special_ids(value)
        elif _TOKEN_KEY.search(key):
            values = value if isinstance(value, (list, tuple)) else [value]
            found |= {v for v in values if type(v) is int}
    return found


def _describe(inputs: dict[str, Any]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in inputs.items() if hasattr(v, "shape")}


# ---------------------------------------------------------------------------------------------
# 4. one model type: build, run, check (the child process's work)
# ---------------------------------------------------------------------------------------------


def check_one(model_type: str, max_params: float = 50e6, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Everything for one model type, in this process; returns the record."""
    import torch
    import transformers

    torch.set_num_threads(1)
    from fxsparse.checks import check_model

    start = time.perf_counter()
    record: dict[str, Any] = {"type": model_type, "torch": torch.__version__, "transformers": transformers.__version__}
    classes = auto_classes(model_type)
    if not classes:
        reason = "no auto class maps this config type, nor does a model class of its package take it"
        return {**record, "status": "no model class", "reason": reason, "seconds": round(time.perf_counter() - start, 1)}
    attempts: list[str] = []
    chosen = None
    build_error = run_error = None
    for mode in ("tiny", "reduced", "default"):
        try:
            config = tiny_config(model_type, mode)
        except Exception as e:  # noqa: BLE001 - the record says why
            attempts.append(f"{mode} config: {_reason(e)}")
            build_error = build_error or f"config ({mode}): {_reason(e)}"
            continue
        for auto, labels in classes:
            progress(f"building {auto} ({mode} config)")
            try:
                built = config
                if auto == "AutoModelForCausalLM" and not getattr(config, "is_encoder_decoder", False) \
                        and getattr(config, "is_decoder", None) is False:
                    built = copy.deepcopy(config)  # encoders with an LM head (BertLMHeadModel): as a decoder
                    built.is_decoder = True
                params = _count_on_meta(_model_class(auto), built)
                if params is not None and params > max_params:
                    attempts.append(f"{mode}/{auto}: {params / 1e6:.0f} M parameters > cap {max_params / 1e6:.0f} M")
                    continue
                torch.manual_seed(0)
                model = _model_class(auto).from_config(built)
            except Exception as e:  # noqa: BLE001
                attempts.append(f"{mode}/{auto}: {_reason(e)}")
                build_error = build_error or f"{auto} ({mode}): {_reason(e)}"
                continue
            candidates = input_candidates(model, labels)
            if not candidates:
                run_error = run_error or f"no input recipe for main_input_name {model.main_input_name!r}"
                attempts.append(f"{mode}/{auto}: {run_error}")
            for name, inputs in candidates:
                progress(f"eager {type(model).__name__} on {name}")
                try:
                    _eager(model, inputs)
                except Exception as e:  # noqa: BLE001
                    attempts.append(f"{mode}/{auto}/{name}: {_reason(e)}")
                    run_error = run_error or f"{type(model).__name__} on {name}: {_reason(e)}"
                    continue
                chosen = (mode, auto, model, name, inputs)
                break
            if chosen:
                break
        if chosen:
            break
    record["attempts"] = [a[:240] for a in attempts[:12]]
    if chosen is None:
        status = "could not make inputs" if run_error else "could not build" if build_error else "too large"
        reason = run_error or build_error or (attempts[0] if attempts else "every config over the cap")
        return {**record, "status": status, "reason": reason, "seconds": round(time.perf_counter() - start, 1)}
    mode, auto, model, name, inputs = chosen
    record.update(
        config=mode, auto=auto, model=type(model).__name__, inputs=_describe(inputs), input_recipe=name,
        params=sum(p.numel() for p in model.parameters()),
    )
    progress(f"check_model {type(model).__name__} ({mode} config, {name})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = check_model(model, inputs, density=0.1, capture="auto")
    notes = list(dict.fromkeys(str(w.message).splitlines()[0][:200] for w in caught if "fxsparse" in str(w.message)))
    failed = next((c for c, ok in report.passed.items() if not ok), None)
    record.update(
        status="ok" if report.ok else "failed",
        stage=failed,
        reason=report.failure,
        passed=report.passed,
        capture=report.capture,
        static_shapes=any("captured at the example inputs' shapes" in n for n in notes),
        warnings=notes[:3],
        coverage=report.coverage,
        masked_params=report.masked_params,
        skipped=[list(s) for s in report.skipped][:40],
    )
    if failed == "sparsify" and "torch.export" in (report.failure or ""):
        progress(f"plain torch.export of {type(model).__name__}")
        record["evidence"] = export_evidence(model, (), dict(inputs), ("transformers/",), report.failure or "")
    if report.ok:
        progress(f"signatures {type(model).__name__}")
        record["signatures"] = check_signatures(model, inputs)
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


OPTIONAL = ("attention_mask", "labels")  # what a data collator and Trainer add to a batch


def check_signatures(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """The sparse module made from the main inputs alone (no attention mask, no labels) run as a
    training loop runs it: at another batch size and sequence length, and with the attention mask
    and labels where the model takes them; each output compared with the unwrapped model's (eval
    mode, the same weights). ``{"status": "ok" | "failed" | "n/a", "calls": [...], "reason"}``."""
    import torch

    import fxsparse

    main = {k: v for k, v in inputs.items() if k not in OPTIONAL}
    extra = {k: v for k, v in inputs.items() if k in OPTIONAL}
    calls = [("other shape", _reshaped(main))]
    if extra:
        calls += [(f"+ {', '.join(sorted(extra))}", dict(inputs)), (f"other shape + {', '.join(sorted(extra))}", _reshaped(inputs))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sparse = fxsparse.sparsify(model, 0.1, example_inputs=main, capture="auto").eval()
            reference = sparse.unwrap().eval()
    except Exception as e:  # noqa: BLE001 - the record says why
        return {"status": "n/a", "reason": f"sparsify from the main inputs alone: {_reason(e)}"}
    done, skipped = [], []
    for name, call in calls:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = _outputs(reference(**call))
        except Exception as e:  # noqa: BLE001 - the model itself does not take this call
            skipped.append(f"{name}: the model itself fails ({_reason(e)[:80]})")
            continue
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = _outputs(sparse(**call))
            if set(got) != set(expected):
                raise AssertionError(f"outputs {sorted(got)} against the model's {sorted(expected)}")
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4)
        except Exception as e:  # noqa: BLE001
            # a dim torch.export fixed, refused before the graph runs with what to do: as the issue asks
            status = "refused" if isinstance(e, ValueError) and "cannot change" in str(e) else "failed"
            return {"status": status, "calls": done, "reason": f"{name} ({_describe(call)}): {_reason(e)}"}
        done.append(name)
    if not done:
        return {"status": "n/a", "reason": "; ".join(skipped)}
    return {"status": "ok", "calls": done, "capture": sparse.capture, **({"skipped": skipped} if skipped else {})}


def _reshaped(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` at batch ``BATCH + 1`` (the first row repeated) and, for integer tensors with
    a sequence dim of ``LENGTH``, ``LENGTH - 5`` tokens (the first ones)."""
    import torch

    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == BATCH:
            value = torch.cat([value, value[:1]])
            if not value.is_floating_point() and value.dim() > 1 and value.shape[1] == LENGTH:
                value = value[:, : LENGTH - 5]
        out[key] = value
    return out


def _outputs(result: Any) -> dict[str, Any]:
    """The tensors of a model's output (a ModelOutput, a dict, a tuple or a tensor) by name."""
    import torch

    if isinstance(result, torch.Tensor):
        return {"out": result}
    items = result.items() if hasattr(result, "items") else enumerate(result)
    return {str(k): v for k, v in items if isinstance(v, torch.Tensor)}


def _count_on_meta(auto: Any, config: Any) -> int | None:
    """Parameters counted without memory (the meta device); None when that cannot build."""
    import torch

    try:
        with torch.device("meta"):
            model = auto.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - some models cannot be built on meta: build them for real
        return None


def _eager(model: Any, inputs: dict[str, Any]) -> None:
    """The dense model runs on ``inputs`` in eval mode, and forward + backward in train mode."""
    import torch

    from fxsparse.checks import _scalar

    model.eval()
    with torch.no_grad():
        model(**inputs)
    model.train()
    try:
        _scalar(model(**inputs)).backward()
    finally:
        model.zero_grad(set_to_none=True)  # check_model compares gradients from scratch


def _reason(e: BaseException) -> str:
    """The error's first line (and the next, when the first only introduces it: "...:")."""
    text = [line.strip() for line in f"{type(e).__name__}: {e}".strip().splitlines() if line.strip()]
    if len(text) > 1 and text[0].endswith(":"):
        text = [f"{text[0]} {text[1]}"]
    return text[0][:300] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# 5. the sweep: one process per model type, resumable records, the page
# ---------------------------------------------------------------------------------------------


# the child's environment: one thread, nothing downloaded, quiet
CHILD_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
# imported once by the fork server, so that each model type's process starts without paying
# for them (~5-10 s of a 10-30 s check)
PRELOAD = ["torch", "transformers", "transformers.models.auto.modeling_auto", "fxsparse", "fxsparse.checks"]


def _context() -> Any:
    os.environ.update(CHILD_ENV)  # before the fork server starts: its children inherit it
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    warm = context.Process(target=_nothing)  # waits for the preload: outside any model's time limit
    warm.start()
    warm.join()
    return context


def _nothing() -> None:
    pass


def _child(model_type: str, max_params: float, conn: Any) -> None:
    """One model type's process: progress lines, then the record (or the error) on ``conn``."""
    try:
        conn.send(("record", check_one(model_type, max_params, progress=lambda s: conn.send(("step", s)))))
    except BaseException as e:  # noqa: BLE001 - the parent records it as crashed
        conn.send(("error", _reason(e)))
    finally:
        conn.close()


def _run_child(model_type: str, timeout: float, max_params: float, context: Any = None) -> dict[str, Any]:
    """``check_one`` in a process of its own (forked from a server that imported torch and
    transformers once), killed after ``timeout`` seconds."""
    context = context or _context()
    start = time.perf_counter()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(model_type, max_params, send), daemon=True)
    process.start()
    send.close()
    steps: list[str] = []
    record = error = None
    while record is None and error is None:
        left = start + timeout - time.perf_counter()
        if left <= 0:
            break
        if not receive.poll(min(left, 1.0)):
            if not process.is_alive():
                break
            continue
        try:
            kind, value = receive.recv()
        except EOFError:  # the process ended without a record
            break
        if kind == "step":
            steps.append(value)
        elif kind == "record":
            record = value
        else:
            error = value
    timed_out = record is None and error is None and process.is_alive()
    if timed_out or process.is_alive():
        process.join(2 if not timed_out else 0)
        if process.is_alive():
            process.kill()
    process.join()
    receive.close()
    seconds = round(time.perf_counter() - start, 1)
    last = f" (while {steps[-1]})" if steps else ""
    if timed_out:
        return {"type": model_type, "status": "timeout", "reason": f"more than {timeout:.0f} s{last}", "seconds": seconds}
    if record is None:
        return {"type": model_type, "status": "crashed", "seconds": seconds,
                "reason": f"exit {process.exitcode}{last}: {error or 'no output'}"[:400]}
    record["seconds"] = seconds  # with the process start
    return record


def write_report(records: list[dict[str, Any]], path: str | None, registry: int, wall: float | None = None) -> str:
    """The Markdown page of a sweep's records (one per model type)."""
    from fxsparse.checks import CHECKS

    by_status = collections.Counter(r["status"] for r in records)
    checked = [r for r in records if r["status"] in ("ok", "failed")]
    built = checked + [r for r in records if r["status"] == "could not make inputs"]
    passing = [r for r in checked if r["status"] == "ok"]
    by_stage = collections.Counter(r.get("stage") or "?" for r in checked if r["status"] == "failed")
    masked = sum(r.get("masked_params") or 0 for r in passing)
    weights = sum(r["masked_params"] / r["coverage"] for r in passing if r.get("coverage"))
    versions = sorted({f"torch {r['torch']}, transformers {r['transformers']}" for r in records if r.get("torch")})
    seconds = sum(r.get("seconds") or 0 for r in records)
    lines = [
        "# transformers coverage",
        "",
        f"{len(records)} of the {registry} model types of transformers ({'; '.join(versions) or 'versions not recorded'}) "
        f"swept ({datetime.date.today().isoformat()}), in a fixed pseudo-random order (crc32 of the name), so that "
        f"a partial sweep is a fair sample. Each type in its own process, one thread, random weights from a tiny "
        f"config (widths {WIDTH}, {LAYERS} layers, {HEADS} heads, vocabulary {VOCAB}, no key/value cache, LayerDrop "
        f"off: random layer skipping is control flow on a random number, which torch.export cannot record; the "
        f"default config where the tiny one cannot be built or run and is small enough), inputs from the model's "
        f"`main_input_name`, then "
        f"`fxsparse.checks.check_model(model, inputs, density=0.1, capture='auto')`.",
        "",
        "Produced by (each command resumes from the results file and runs what is missing or asked for):",
        "",
        *commands(records),
        "",
        f"Time: {seconds / 60:.1f} min summed over the model types (one at a time, process start included)"
        + (f"; the last run took {wall / 60:.1f} min of wall time." if wall is not None else "."),
        "",
        "## Totals",
        "",
        "| outcome | model types |",
        "|---|---|",
        f"| swept | {len(records)} |",
        f"| built and ran (dense, eager) | {len(checked)} |",
        f"| pass every check | {len(passing)} |",
    ]
    lines += [f"| failed at `{stage}` | {by_stage.get(stage, 0)} |" for stage in (*CHECKS, "?") if stage != "?" or by_stage.get("?")]
    lines += [
        f"| built, but could not make inputs | {by_status.get('could not make inputs', 0)} |",
        f"| could not build | {by_status.get('could not build', 0)} |",
        f"| too large (every config over the parameter cap) | {by_status.get('too large', 0)} |",
        f"| no model class (config only) | {by_status.get('no model class', 0)} |",
        f"| timeout | {by_status.get('timeout', 0)} |",
        f"| crashed | {by_status.get('crashed', 0)} |",
        "",
        f"Of the {len(checked)} model types that were built and ran, {len(passing)} pass every check "
        f"({100 * len(passing) / len(checked) if checked else float('nan'):.1f}%); "
        f"{sum(1 for r in built if r.get('config') not in (None, 'tiny'))} of them needed a larger config than the tiny one.",
        f"Captured with: {', '.join(f'{k} {v}' for k, v in collections.Counter(r.get('capture') or 'nothing (capture failed)' for r in checked).most_common())}"
        f"; {sum(1 for r in checked if r.get('static_shapes'))} only at the example's shapes (export refused dynamic shapes).",
        f"On the passing models, {100 * masked / weights if weights else float('nan'):.2f}% of conv/linear/matmul "
        f"weight parameters are sparsified (the rest are listed in `skipped`: embeddings, tied heads, weights the "
        f"capture cannot see).",
    ]
    signed = [r for r in passing if r.get("signatures")]
    if signed:
        sig = collections.Counter(r["signatures"]["status"] for r in signed)
        failing = sorted(r["type"] for r in signed if r["signatures"]["status"] == "failed")
        lines += [
            "",
            "## Other shapes and keywords",
            "",
            f"Of the {len(passing)} passing model types, {len(signed)} were also sparsified from their main inputs "
            f"alone (no attention mask, no labels) and called as a training loop calls them: at batch {BATCH + 1} "
            f"and {LENGTH - 5} tokens, then with the attention mask and labels where the model takes them (captured "
            f"again on first call: `fxsparse.recapture`), each output compared with the unwrapped model's. "
            f"{sig.get('ok', 0)} ok, {sig.get('failed', 0)} failed"
            + (f" ({', '.join(failing)})" if failing else "")
            + f", {sig.get('refused', 0)} refused with a clear error (a dim torch.export fixed: the model's code pins it)"
            + f", {sig.get('n/a', 0)} could not be sparsified from the main inputs alone"
            + (f"; not checked: {len(passing) - len(signed)} (recorded before the check existed)." if len(passing) > len(signed) else "."),
        ]
        for r in sorted(signed, key=lambda r: r["type"]):
            if r["signatures"]["status"] != "ok":
                lines.append(f"- {r['type']}: {r['signatures']['status']}: {_short(r['signatures'].get('reason'), 200)}")
    lines += [
        "",
        "## Failures by reason",
        "",
    ]
    reasons: dict[str, list[str]] = collections.defaultdict(list)
    for r in records:
        if r["status"] not in ("ok", "no model class"):
            reasons[f"{r['status']}: {_short(r.get('reason'), 160)}"].append(r["type"])
    if not reasons:
        lines.append("None.")
    for reason, names in sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        lines.append(f"- {len(names)} x `{reason}`: {shown}")
    lines += limits_section(records, "type", "failed")
    lines += [
        "",
        "## Every model type",
        "",
        "`config`: tiny, reduced (layers and vocabulary only) or default. Reason: the first line of the error.",
        "",
        "| type | model | config | result | capture | coverage | masked | s | reason | listed in `skipped` |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: r["type"]):
        result = r["status"] if r["status"] != "failed" else f"failed at {r.get('stage') or '?'}"
        coverage = f"{100 * r['coverage']:.0f}%" if r.get("coverage") is not None else ""
        lines.append(
            f"| {r['type']} | {r.get('model') or ''} | {r.get('config') or ''} | {result} | {r.get('capture') or ''} "
            f"| {coverage} | {r.get('masked_params') or ''} | {r.get('seconds', '')} | {_cell(r.get('reason'))} "
            f"| {listed(r) if r['status'] == 'ok' else ''} |"
        )
    text = "\n".join(lines) + "\n"
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text


def _short(text: str | None, n: int) -> str:
    text = (text or "").replace("`", "'")
    return text if len(text) <= n else text[: n - 3] + "..."


def _cell(text: str | None) -> str:
    return _short(text, 200).replace("|", "\\|")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated model types (default: every type)")
    parser.add_argument("--limit", type=int, default=None, help="run at most N model types (of those not yet recorded)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per model type")
    parser.add_argument("--max-params", type=float, default=50e6, help="larger configs than this are not built")
    parser.add_argument("--results", default="benchmarks/results/transformers_coverage.jsonl")
    parser.add_argument("--out", default=None, help="write the Markdown page here")
    parser.add_argument("--rerun", default="", help="comma-separated statuses to run again, e.g. 'timeout,crashed'")
    parser.add_argument("--report-only", action="store_true", help="write the page from --results, run nothing")
    parser.add_argument("--workers", type=int, default=1, help="model types checked at once (one process each)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        import transformers  # noqa: F401
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError as e:
        raise SystemExit(f"{INSTALL_HINT} ({e})") from None
    if args.child:
        record = check_one(args.child, args.max_params, progress=lambda s: print(f"# {s}", flush=True))
        print(json.dumps(record), flush=True)
        return

    registry = sorted(CONFIG_MAPPING_NAMES)
    only = [t for t in args.only.split(",") if t]
    unknown = [t for t in only if t not in CONFIG_MAPPING_NAMES]
    if unknown:
        raise SystemExit(f"unknown model types {unknown}; see transformers' CONFIG_MAPPING_NAMES")
    types = only or registry
    results = Path(args.results)
    recorded = load_records(results, "type", report_only=True)  # the page shows every type in the file
    done = load_records(results, "type", args.rerun, args.report_only)
    # a fixed pseudo-random order, so that a sweep cut short is still a fair sample
    todo = [] if args.report_only else sorted((t for t in types if t not in done), key=lambda t: zlib.crc32(t.encode()))
    todo = todo[: args.limit] if args.limit is not None else todo
    print(f"{len(types)} model types, {len(todo)} to run, {len(done)} already in {results}", flush=True)
    command = "benchmarks/transformers_coverage.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    start = time.perf_counter()
    context = _context() if todo else None
    with results.open("a") as sink, ThreadPoolExecutor(max(1, args.workers)) as pool:
        running = [pool.submit(_run_child, t, args.timeout, args.max_params, context) for t in todo]
        for i, future in enumerate(as_completed(running)):
            record = future.result()
            model_type = record["type"]
            record["command"] = command
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            done[model_type] = recorded[model_type] = record
            print(f"[{i + 1}/{len(todo)}] {model_type}: {record['status']} {record.get('stage') or ''} "
                  f"{record.get('seconds')} s {record.get('reason') or ''}"[:240], flush=True)
    wall = time.perf_counter() - start if todo else None
    text = write_report([recorded[t] for t in registry if t in recorded], args.out, len(registry), wall)
    if not args.out:
        print(text)


if __name__ == "__main__":
    main()
