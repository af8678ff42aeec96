"""LensPromptEnhance: the official Lens prompt reasoner (lens_core.enhance) run on the loaded text encoder."""
from __future__ import annotations

import torch

from . import bridge

MAX_SEED = 0xFFFFFFFFFFFFFFFF


class LensPromptEnhance:
    DESCRIPTION = ("Rewrite a short prompt into the long, dense caption style Lens was trained on, with the official "
                   "Lens reasoner (GPT-OSS-20B, the text encoder's own weights, 'Reasoning: low'). Needs lm_head: "
                   "load the text encoder from the diffusers text_encoder/ folder (the Comfy-Org NVFP4 file has "
                   "none). Feed the output to LensTextEncode or any text input.")
    CATEGORY = "Lens/conditioning"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    OUTPUT_TOOLTIPS = ("The rewritten prompt (the input text when the reasoner gives no usable answer or the text "
                       "is empty).",)
    FUNCTION = "enhance"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("LENS_TEXT_ENCODER", {
                "tooltip": "From LensTextEncoderLoader / LensCheckpointLoader with the diffusers text_encoder/ "
                           "(its lm_head and final norm are loaded on the first use, ≈1.2 GB more)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The short prompt to rewrite. An empty text is passed through."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                             "tooltip": "Sampling seed: the same seed gives the same rewrite on any device."}),
        }, "optional": {
            "max_new_tokens": ("INT", {
                "default": 4096, "min": 16, "max": 16384,
                "tooltip": "Token budget (analysis + answer). 4096 is the official value; GPT-OSS at 'Reasoning: "
                           "low' usually needs a few hundred. An answer cut off by the budget keeps the input."}),
            "temperature": ("FLOAT", {
                "default": 0.7, "min": 0.0, "max": 2.0, "step": 0.05,
                "tooltip": "0.7 is the official value (with top-k 50); 0 = greedy (no randomness)."}),
        }}

    def enhance(self, text_encoder, text, seed, max_new_tokens=4096, temperature=0.7):
        from ..lens_core import enhance as core_enhance
        from ..lens_core.prompt import check_text

        text = check_text(text, "LensPromptEnhance: text")     # a string of valid UTF-8 (not None, no surrogates)
        if not text.strip():
            return (text,)
        te = text_encoder
        gen = core_enhance.generator_for(te.module)   # references the encoder's layers; owns lm_head, norm, …
        gen.load_weights(device=te.patcher.offload_device)        # first use only (≈1.2 GB at real size)
        gen_patcher = bridge.generator_patcher(gen, te.patcher)
        tokens = 1024 + int(max_new_tokens)
        bridge.load_together([te.patcher, gen_patcher],
                             memory_required=bridge.enhancer_memory(gen.config, tokens, te.dtype))
        reporter = bridge.TokenReporter(int(max_new_tokens))
        with torch.inference_mode():
            out = core_enhance.enhance(gen, te.tokenizer, text, seed=int(seed), max_new_tokens=int(max_new_tokens),
                                       temperature=float(temperature), callback=reporter,
                                       device=te.patcher.load_device, load_weights=False)
        reporter.finish()
        bridge.soft_empty_cache()
        return (out,)
