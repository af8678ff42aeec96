"""The prompt enhancer in ComfyUI: its TextGenerator (lens_core.generator) gets a ModelPatcher of its own, loaded
together with the text encoder's, so ComfyUI moves and counts the generator's weights (later layers, final norm,
lm_head) while the encoder's patcher and module stay exactly as loaded."""
from __future__ import annotations

import comfy.model_management as mm

from .patchers import make_patcher


def generator_patcher(generator, encoder_patcher):
    """The ModelPatcher of ``generator`` (made once, with the encoder patcher's load/offload devices, and kept
    with the generator: one per encoder module)."""
    patcher = generator.__dict__.get("_comfy_patcher")
    if patcher is None:
        patcher = make_patcher(generator, "text_encoder",
                               devices=(encoder_patcher.load_device, encoder_patcher.offload_device))
        generator.__dict__["_comfy_patcher"] = patcher
    return patcher


def load_together(patchers, memory_required: int = 0):
    """One ``load_models_gpu`` call for several patchers (ComfyUI then makes room for all of them at once,
    partially loading where memory is short, instead of evicting the first to load the second)."""
    mm.load_models_gpu(list(patchers), memory_required=int(memory_required))
