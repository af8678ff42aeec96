"""ModelPatcher choice (classic or dynamic VRAM), loading through ComfyUI's model management, and the
activation-memory estimates handed to ``load_models_gpu``. The loaded-model list itself is never edited here.
"""
from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.model_patcher

from .devices import devices as role_devices

# Dynamic VRAM (comfy-aimdo, ComfyUI 0.33's default on NVIDIA: ``comfy.model_patcher.CoreModelPatcher`` is then
# ``ModelPatcherDynamic``) streams exactly the ``weight``/``bias`` of comfy.ops layers (larger than 16 KiB) through
# its VBAR; every other parameter (packed expert banks, fp8/MXFP8 storage, scales, small layers) is copied whole to
# the GPU at every load. A model whose bulk is such parameters gets the classic patcher instead (what ComfyUI
# itself does for text encoders with ``disable_offload``): lowvram partial loading, evicted like any model.
DYNAMIC_MAX_FORCED_SHARE = 0.10


def dynamic_vram_plan(module: torch.nn.Module) -> dict:
    """Bytes of ``module``'s parameters that ComfyUI's dynamic patcher would stream (weight/bias of comfy.ops
    layers) vs force-load whole (everything else), by structure (size thresholds aside)."""
    from .quant import is_quantized_storage

    streamed = forced = 0
    for m in module.modules():
        own = dict(m.named_parameters(recurse=False))
        leaf = len(own) == sum(1 for _ in m.parameters())
        quantized = is_quantized_storage(m)       # stored tensors dynamic VRAM cannot stream
        for name, p in own.items():
            n = p.numel() * p.element_size()
            if leaf and not quantized and hasattr(m, "comfy_cast_weights") and name in ("weight", "bias"):
                streamed += n
            else:
                forced += n
    total = streamed + forced
    return {"streamed": streamed, "forced": forced,
            "dynamic": total > 0 and forced <= DYNAMIC_MAX_FORCED_SHARE * total}


def patcher_class(module: torch.nn.Module):
    """The ModelPatcher class ComfyUI would give a model like ``module``: ``CoreModelPatcher`` (dynamic VRAM
    when ComfyUI enabled it; ComfyUI before Feb 2026 has only ``ModelPatcher``), or the classic ``ModelPatcher`` for a
    model whose weights dynamic VRAM could not stream (see :data:`DYNAMIC_MAX_FORCED_SHARE`)."""
    classic = comfy.model_patcher.ModelPatcher
    core = getattr(comfy.model_patcher, "CoreModelPatcher", classic)
    if core is classic or not dynamic_vram_plan(module)["dynamic"]:
        return classic
    return core


def make_patcher(module: torch.nn.Module, role: str, size: int = 0, devices=None):
    """A ModelPatcher of :func:`patcher_class` with the role's (or the given) load/offload devices."""
    load_device, offload_device = devices or role_devices(role)
    return patcher_class(module)(module, load_device=load_device, offload_device=offload_device, size=size)


def load(patcher, memory_required: int = 0, minimum_memory_required: int | None = None):
    """Make ComfyUI load ``patcher`` (evicting other models if needed) right before a forward."""
    mm.load_models_gpu([patcher], memory_required=int(memory_required),
                       minimum_memory_required=None if minimum_memory_required is None
                       else int(minimum_memory_required))


# ---------------------------------------------------------------------------------------------------------
# activation-memory estimates handed to load_models_gpu (bytes; deliberately generous). The VAE's own estimate
# is lens_core.vae's ``activation_bytes``.


def dit_memory(config, batch: int, image_tokens: int, text_tokens: int, dtype: torch.dtype) -> int:
    tokens = batch * (image_tokens + text_tokens)
    width = config.width
    per_token = width * 12 + config.mlp_hidden * 3          # qkv/attn/out + gated MLP temporaries
    attn = batch * config.num_attention_heads * (image_tokens + text_tokens) ** 2
    return int((tokens * per_token + attn) * torch.finfo(dtype).bits // 8 * 1.5)


def text_encoder_memory(batch: int, tokens: int, hidden: int, dtype: torch.dtype) -> int:
    return int(batch * tokens * max(hidden, 1) * 64 * torch.finfo(dtype).bits // 8)


def enhancer_memory(config, tokens: int, dtype: torch.dtype) -> int:
    """KV cache of a generation of ``tokens`` positions + the prompt pass's activations + one step's logits."""
    from ...lens_core.text_encoder import KVCache

    bits = torch.finfo(dtype).bits
    kv = KVCache.bytes_for(config, 1, tokens, dtype)
    prompt = min(tokens, 1024) * (config.hidden_size * 64 + config.num_attention_heads * tokens) * bits // 8
    return int(kv + prompt + config.vocab_size * 4 * 4)
