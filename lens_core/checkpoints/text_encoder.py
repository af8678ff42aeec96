"""GPT-OSS text-encoder loader: diffusers MXFP4 folders and the Comfy-Org NVFP4 single file."""
from __future__ import annotations

import json
import os
import re

import torch

from .. import checks as chk
from .assign import (CheckpointInfo, assign_weights, block_count, checked_config, expect_shapes, init_empty_weights,
                     tensor_dims)
from .errors import CheckpointError
from .detect import _expect, quant_layers, strip_prefix, te_family
from .source import TensorSource, _dtype_summary, _read_json, open_source


REAL_TE_CONFIG = {
    "num_hidden_layers": 24, "hidden_size": 2880, "head_dim": 64, "num_attention_heads": 64,
    "num_key_value_heads": 8, "intermediate_size": 2880, "num_local_experts": 32, "num_experts_per_tok": 4,
    "experts_per_token": 4, "attention_bias": True, "rms_norm_eps": 1e-5, "sliding_window": 128,
    "swiglu_limit": 7.0, "swiglu_alpha": 1.702, "vocab_size": 201088, "max_position_embeddings": 131072,
    "pad_token_id": 199999, "eos_token_id": 200002, "tie_word_embeddings": False, "model_type": "gpt_oss",
    "initial_context_length": 4096,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                        "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": False},
    "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)],
}
REAL_SELECTED_LAYERS = (5, 11, 17, 23)


def te_config_from_shapes(source: TensorSource) -> dict:
    """The real GPT-OSS-20B config with the sizes that shapes reveal (layers, widths, heads, experts)."""
    cfg = json.loads(json.dumps(REAL_TE_CONFIG))
    n = block_count(source, r"model\.layers\.(\d+)\.")
    vocab, hidden = tensor_dims(source, "model.embed_tokens.weight", 2, "the token embedding")
    hd = cfg["head_dim"]
    experts = tensor_dims(source, "model.layers.0.mlp.router.weight", 2, "the MoE router")[0]
    q = tensor_dims(source, "model.layers.0.self_attn.q_proj.weight", 2, "the query projection")[0]
    k = tensor_dims(source, "model.layers.0.self_attn.k_proj.weight", 2, "the key projection")[0]
    cfg.update(num_hidden_layers=n, hidden_size=hidden, vocab_size=vocab, num_local_experts=experts,
               num_attention_heads=q // hd, num_key_value_heads=k // hd,
               num_experts_per_tok=min(cfg["num_experts_per_tok"], experts),
               layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)])
    return cfg


def check_te_config(source: TensorSource, cfg) -> None:
    """The config against the tensors present, before anything is built."""
    found = block_count(source, r"model\.layers\.(\d+)\.")
    if found != cfg.num_hidden_layers:
        raise CheckpointError(f"{source.origin}: {source.config_path or 'the config'} says num_hidden_layers="
                              f"{cfg.num_hidden_layers}, the file holds {found} layers; the config does not belong "
                              f"to these weights. Fix: use this checkpoint's own config.json (or none)")
    qd, kd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    expect_shapes(source, {
        "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "model.layers.0.self_attn.q_proj.weight": (qd, cfg.hidden_size),
        "model.layers.0.self_attn.k_proj.weight": (kd, cfg.hidden_size),
        "model.layers.0.mlp.router.weight": (cfg.num_local_experts, cfg.hidden_size),
    }, f"hidden_size={cfg.hidden_size}, {cfg.num_attention_heads} heads x {cfg.head_dim}, "
       f"{cfg.num_local_experts} experts")


_NVFP4_RENAMES = ((".weight_scale_2", "_scales_2"), (".weight_scale", "_scales"), (".weight", "_blocks"),
                  (".bias", "_bias"))


def _to_hf_te_name(k: str) -> str:
    """Comfy NVFP4 names (no ``model.``; ``experts.<proj>.weight`` …) → the names of ``LensTextEncoder``
    (``model.`` prefix; ``experts.<proj>_blocks/_scales/_scales_2/_bias``, quant.PackedExperts fmt "nvfp4")."""
    if k == "tokenizer_json" or k.startswith(("model.", "lm_head.")):
        return k
    k = "model." + k
    m = re.match(r"(.*\.mlp\.experts\.(?:gate_up|down)_proj)(\.\w+)$", k)
    if m:
        for old, new in _NVFP4_RENAMES:
            if m.group(2) == old:
                return m.group(1) + new
    return k


def _nvfp4_scale_reader(source, name, device):
    """Un-tile one NVFP4 bank's per-expert E4M3 block scales ``[E, Rp, Cp]`` → ``[E, out, in/16]``."""
    from ..quant import NVFP4_BLOCK, untile_block_scales

    e, rows, half = source.shape(name[: -len("_scales")] + "_blocks")
    stored = source.read(name, None, "cpu")
    if stored.dtype != torch.float8_e4m3fn:
        stored = stored.view(torch.float8_e4m3fn)
    return untile_block_scales(stored, rows, half * 2 // NVFP4_BLOCK).contiguous().to(device)


def load_text_encoder(path, dtype=torch.bfloat16, device="cpu", operations=None, config=None,
                      selected_layers=None, experts: str = "packed"):
    """A ``LensTextEncoder`` from the diffusers MXFP4 ``text_encoder/`` (folder, index or whole diffusers folder)
    or the Comfy-Org NVFP4 single file. Experts stay packed (dequantized per call) unless
    ``experts="dequantized"``. ``selected_layers`` defaults to the transformer config's
    ``selected_layer_index`` of a diffusers folder, else the real (5, 11, 17, 23)."""
    from .. import text_encoder as te_mod

    source = open_source(path, "text_encoder")
    det = _expect(source, "text_encoder")
    source = strip_prefix(source, det.prefix)
    family = te_family(source)
    quant_layers(source, "text_encoder")
    source = source.rename(_to_hf_te_name)
    if config is None:
        cfg_dict = source.config if source.config is not None else te_config_from_shapes(source)
    else:
        cfg_dict = dict(config)
    cfg = checked_config(lambda: te_mod.TextEncoderConfig.from_dict(cfg_dict), source, "text_encoder")
    check_te_config(source, cfg)
    if selected_layers is None:
        selected_layers = _selected_layers_near(path) or REAL_SELECTED_LAYERS
    try:
        selected_layers = te_mod._validate_selected(selected_layers, cfg.num_hidden_layers)
    except ValueError as exc:
        raise CheckpointError(f"{source.origin}: {exc} (this encoder has {cfg.num_hidden_layers} layers; the "
                              f"transformer config's selected_layer_index must name 4 of them)") from None
    kwargs = dict(selected_layers=tuple(selected_layers), operations=operations, device=None, dtype=dtype,
                  experts=experts)
    if family == "comfy-te-nvfp4":
        kwargs["expert_format"] = "nvfp4"
    with init_empty_weights():
        model = te_mod.LensTextEncoder(cfg, **kwargs)
    # layers after the last selected one, lm_head and the final norm are never used for features
    consumed = {k for k in source.keys() if model.is_unused_key(k)}
    special = {k: _nvfp4_scale_reader for k in source.keys()
               if family == "comfy-te-nvfp4" and k.endswith("_proj_scales") and k not in consumed}
    assign_weights(model, source, device, "text_encoder", special, consumed)
    model.eval()
    model.lens_checkpoint = CheckpointInfo(source.origin, "text_encoder", family, None, "", cfg_dict,
                                           {"dtypes": _dtype_summary(source),
                                            "selected_layers": list(selected_layers),
                                            "embedded_tokenizer": "tokenizer_json" in source})
    source.close()
    return model


def _selected_layers_near(path) -> list | None:
    """``selected_layer_index`` of the transformer config in the same diffusers folder, if any."""
    path = os.path.abspath(os.fspath(path))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    for root in (folder, os.path.dirname(folder)):
        cfg = os.path.join(root, "transformer", "config.json")
        if os.path.isfile(cfg):
            value = _read_json(cfg).get("selected_layer_index")
            if value is None:
                return None
            try:
                return list(chk.int_list(value, "selected_layer_index", 0, 255, cfg, 1, 16))
            except ValueError as exc:
                raise CheckpointError(f"{exc}. Fix: restore the transformer config.json of this model") from None
    return None
