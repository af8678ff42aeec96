"""LensTextEncode and the CONDITIONING <-> lens_core text-feature plumbing.

CONDITIONING is ComfyUI's native Lens layout: ``[[cond [B,S,4·D], {"pooled_output": None, "attention_mask":
[B,S], "num_layers_stacked": 4}]]`` (layer outputs concatenated along the last dim, first layer first). An
empty prompt is a zero-length cond (S = 0), as native Lens encodes it; the sampler turns it into the official
empty negative (zero features, all-False mask, the positive's shape).
"""
from __future__ import annotations

import torch

from . import bridge
from ..lens_core import checks as chk

NUM_LAYERS = 4


class LensTextEncode:
    DESCRIPTION = "Encode a prompt with the Lens GPT-OSS text encoder (harmony template, layers stacked)."
    CATEGORY = "Lens/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Conditioning in ComfyUI's native Lens layout [B,S,4·2880] with attention_mask; "
                       "interchangeable with native Lens text encoding.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("LENS_TEXT_ENCODER", {"tooltip": "From LensTextEncoderLoader or LensCheckpointLoader."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The prompt. Leave empty for the negative: an empty prompt gives the "
                                           "official 'no text' conditioning."}),
        }}

    def encode(self, text_encoder, text):
        from ..lens_core import prompt as core_prompt

        if text == "":
            width = NUM_LAYERS * max(text_encoder.hidden_size, 1)
            return ([[torch.zeros(1, 0, width), {"pooled_output": None,
                                                 "attention_mask": torch.zeros(1, 0, dtype=torch.long),
                                                 "num_layers_stacked": NUM_LAYERS}]],)
        te = text_encoder
        tokens = 512
        bridge.load(te.patcher, memory_required=bridge.text_encoder_memory(1, tokens, te.hidden_size, te.dtype))
        with torch.inference_mode():
            feats, mask = core_prompt.encode_prompts(te.module, te.tokenizer, [text], device=te.patcher.load_device)
            cond = torch.cat([f.float() for f in feats], dim=-1)
        out = [[bridge.to_intermediate(cond), {"pooled_output": None,
                                               "attention_mask": bridge.to_intermediate(mask.long()),
                                               "num_layers_stacked": len(feats)}]]
        del feats
        bridge.soft_empty_cache()
        return (out,)


def _entry(conditioning, name):
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(f"{name}: expected a CONDITIONING from LensTextEncode (a non-empty list), found "
                         f"{type(conditioning).__name__}")
    if len(conditioning) != 1:
        raise ValueError(f"{name}: LensSampler takes a single conditioning entry, found {len(conditioning)} "
                         f"(combined/area conditioning is not supported); connect LensTextEncode directly")
    entry = conditioning[0]
    if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[1] or {}, dict):
        raise ValueError(f"{name}: expected a CONDITIONING entry [tensor, dict], found {type(entry).__name__}; "
                         f"connect LensTextEncode")
    cond, extra = entry[0], entry[1]
    if not torch.is_tensor(cond) or cond.ndim != 3:
        raise ValueError(f"{name}: expected a conditioning tensor [B,S,width], found "
                         f"{getattr(cond, 'shape', type(cond).__name__)}")
    chk.finite_tensor(cond, name + " conditioning", "re-encode the prompt with LensTextEncode (the node that "
                      "produced this conditioning overflowed or was fed broken data)")
    return cond, dict(extra or {})


def conditioning_to_features(conditioning, model: bridge.LensModel, name: str):
    """(features list of 4 × [B,S,D], mask [B,S] bool) from a CONDITIONING, checked against the DiT's width."""
    cond, extra = _entry(conditioning, name)
    want = model.text_width
    if cond.shape[1] == 0:                      # empty prompt (native convention): no text at all
        layers = model.config.num_text_layers
        zeros = cond.new_zeros(cond.shape[0], 0, model.config.enc_hidden_dim)
        return [zeros] * layers, torch.zeros(cond.shape[0], 0, dtype=torch.bool)
    if cond.shape[-1] != want:
        raise ValueError(
            f"{name}: conditioning width {cond.shape[-1]} does not fit this Lens model, which expects "
            f"{model.config.num_text_layers}×{model.config.enc_hidden_dim} = {want} (4 stacked GPT-OSS layers). "
            f"It comes from a text encoder that does not belong to this model. Fix: encode the prompt with the "
            f"text encoder matching this model (LensTextEncode with its GPT-OSS encoder, or native Lens "
            f"CLIPTextEncode)")
    layers = int(extra.get("num_layers_stacked", model.config.num_text_layers))
    if layers != model.config.num_text_layers:
        raise ValueError(f"{name}: conditioning stacks {layers} text-encoder layers, this Lens model expects "
                         f"{model.config.num_text_layers}; encode the prompt with LensTextEncode")
    mask = extra.get("attention_mask")
    if mask is None:
        mask = torch.ones(cond.shape[:2], dtype=torch.bool)
    mask = mask.bool().reshape(cond.shape[0], -1)
    if mask.shape[1] != cond.shape[1]:
        raise ValueError(f"{name}: attention_mask has {mask.shape[1]} positions, the conditioning {cond.shape[1]}")
    return list(cond.chunk(layers, dim=-1)), mask


def match_batch(feats, mask, batch: int, name: str):
    """Repeat a batch-1 conditioning to the latent batch; ValueError for any other mismatch."""
    b = mask.shape[0]
    if b == batch:
        return feats, mask
    if b == 1:
        return [f.expand(batch, -1, -1) for f in feats], mask.expand(batch, -1)
    raise ValueError(f"{name}: conditioning batch {b} does not match the latent batch {batch}; encode one prompt "
                     f"(batch 1) or as many as the latent batch")
