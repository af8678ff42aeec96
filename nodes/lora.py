"""LensLoraLoader: LENS_MODEL + a LoRA / LoHa / LoKr file from ComfyUI's ``loras`` folder + strength → LENS_MODEL.

Chainable; every trainer's Lens key format is read by lens_core.lora; the adapter is applied through the
ModelPatcher's own patches (clone + add_patches / object patches), so the base weights are never changed in
place and a strength change does not reload the model.
"""
from __future__ import annotations

from . import bridge


class LensLoraLoader:
    DESCRIPTION = ("Apply a LoRA / LoHa / LoKr to the Lens DiT (kohya/musubi, VideoX-Fun, OneTrainer, diffusers/PEFT "
                   "and SceneWorks files). Chain several to stack them.")
    CATEGORY = "Lens/loaders"
    RETURN_TYPES = ("LENS_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Lens DiT with the adapter patched in (the input model is unchanged).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("LENS_MODEL", {"tooltip": "The Lens DiT (from LensModelLoader or another LensLoraLoader)."}),
            "lora_name": (bridge.lora_choices(), {
                "tooltip": "A Lens LoRA / LoHa / LoKr .safetensors file in models/loras."}),
            "strength": ("FLOAT", {
                "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                "tooltip": "How strongly the adapter is applied; 0 = off, negative values invert it."}),
        }}

    def apply(self, model, lora_name, strength=1.0):
        path = bridge.resolve_lora(lora_name)
        return (bridge.with_lora(model, path, float(strength)),)
