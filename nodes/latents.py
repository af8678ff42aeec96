"""LensEmptyLatent, LensVAEDecode, LensVAEEncode: ComfyUI LATENT {"samples": [B,128,H/16,W/16]} <-> IMAGE."""
from __future__ import annotations

import logging

import torch

from . import bridge
from ..lens_core import checks as chk
from ..lens_core import config as core_config
from ..lens_core.images import check_image_range

LATENT_CHANNELS = 128
CUSTOM = "custom"
TILED = {"auto": None, "on": True, "off": False}
UPSTREAM_FIX = ("the node that produced it overflowed or was fed broken data; re-run it in fp32/bf16 (not fp16) "
                "or replace it, then queue again")


def _aspect_choices():
    return list(core_config.ASPECT_LABELS) + [CUSTOM]


def _bucket_table() -> dict:
    """{base: {aspect: [width, height]}} of the presets, for the UI (web/lens_nodes.js shows the preset's size)."""
    return {str(base): {a: list(core_config.bucket_size(base, a))[::-1] for a in core_config.ASPECT_LABELS}
            for base in (1440, 1024)}


def check_lens_latent(samples, where: str):
    """ValueError unless ``samples`` is a Lens/FLUX.2 latent [B,128,h,w] of finite numbers."""
    if not torch.is_tensor(samples) or samples.ndim != 4 or samples.shape[1] != LATENT_CHANNELS:
        shape = tuple(samples.shape) if torch.is_tensor(samples) else type(samples).__name__
        raise ValueError(
            f"{where}: expected a Lens / FLUX.2 latent [B,{LATENT_CHANNELS},H/16,W/16], found {shape}. This LATENT "
            f"comes from another model family; make Lens latents with LensEmptyLatent, LensSampler or "
            f"LensVAEEncode (or decode this one with its own model's VAE)")
    chk.finite_tensor(samples, f"{where}: latent", UPSTREAM_FIX)


class LensEmptyLatent:
    DESCRIPTION = "An empty Lens latent at one of the nine official aspect buckets or a custom size."
    CATEGORY = "Lens/latent"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Zeros [B,128,H/16,W/16] (the FLUX.2 / native Lens latent layout).",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "aspect_ratio": (_aspect_choices(), {
                "default": "1:1",
                "tooltip": "Width:height bucket of the official Lens resolutions (the size is set by it and shown "
                           "in width/height), or 'custom' to use width/height as entered.",
                "lens_buckets": _bucket_table()}),
            "base_resolution": ([1440, 1024], {
                "default": 1440,
                "tooltip": "Bucket family of the presets: 1440 (Lens default, ≈2 MP) or 1024 (≈1 MP, faster). "
                           "Unused with 'custom'."}),
            "width": ("INT", {"default": 1440, "min": 16, "max": 8192, "step": 16,
                              "tooltip": "Image width in pixels (a multiple of 16). With a preset it shows the "
                                         "preset's width, which is what is used; editing it switches to "
                                         "'custom'."}),
            "height": ("INT", {"default": 1440, "min": 16, "max": 8192, "step": 16,
                               "tooltip": "Image height in pixels (a multiple of 16). With a preset it shows the "
                                          "preset's height, which is what is used; editing it switches to "
                                          "'custom'."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "Number of images generated together."}),
        }}

    def generate(self, aspect_ratio, base_resolution, width, height, batch_size):
        if aspect_ratio == CUSTOM:
            try:
                h, w = core_config.validate_size(int(height), int(width))
            except ValueError as exc:
                raise ValueError(f"LensEmptyLatent (custom size {width}×{height}): {exc}. Fix: use width and "
                                 f"height that are multiples of 16 (e.g. {max(16, int(width) // 16 * 16)}×"
                                 f"{max(16, int(height) // 16 * 16)}) or pick an aspect preset") from None
            h, w = core_config.check_generation_size(int(height), int(width), "LensEmptyLatent custom size")
        else:
            ph, pw = core_config.bucket_size(int(base_resolution), aspect_ratio)
            h, w = core_config.validate_size(ph, pw)
        batch_size = core_config.check_batch(batch_size, "LensEmptyLatent batch_size")
        samples = torch.zeros(batch_size, LATENT_CHANNELS, h, w, device=bridge.intermediate_device())
        return ({"samples": samples},)


def _ready(vae, batch: int, height: int, width: int):
    """The VAE module set to its compute dtype and loaded by ComfyUI with room for a batch × height × width
    image's activations."""
    module = vae.module
    module.compute_dtype = vae.dtype
    bridge.load(vae.patcher, memory_required=module.activation_bytes(batch, height, width, vae.dtype))
    return module


class LensVAEDecode:
    DESCRIPTION = "Decode a Lens latent to an image with the FLUX.2 VAE."
    CATEGORY = "Lens/latent"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("IMAGE [B,H,W,3] float 0..1.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("LENS_VAE", {"tooltip": "From LensVAELoader or LensCheckpointLoader."}),
            "samples": ("LATENT", {"tooltip": "A Lens latent (from LensSampler, or any FLUX.2 / native Lens latent)."}),
            "tiled": (list(TILED), {"default": "auto",
                                    "tooltip": "Decode in overlapping tiles to save memory: 'auto' tiles only when "
                                               "the full image would not fit."}),
        }}

    def decode(self, vae, samples, tiled="auto"):
        latent = samples["samples"]
        check_lens_latent(latent, "LensVAEDecode")
        b, _, h, w = latent.shape
        module = _ready(vae, b, 16 * h, 16 * w)
        from ..lens_core import vae as core_vae
        with torch.inference_mode():
            images = module.decode(latent.to(vae.patcher.load_device), tiled=TILED[tiled])
            out = bridge.to_intermediate(core_vae.to_comfy_image(images))
        del images
        bridge.soft_empty_cache()
        return (out,)


class LensVAEEncode:
    DESCRIPTION = "Encode an image into a Lens latent with the FLUX.2 VAE (img2img, hires fix)."
    CATEGORY = "Lens/latent"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Lens latent [B,128,H/16,W/16] (the image is center-cropped to multiples of 16).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("LENS_VAE", {"tooltip": "From LensVAELoader or LensCheckpointLoader."}),
            "pixels": ("IMAGE", {"tooltip": "The image to encode."}),
            "tiled": (list(TILED), {"default": "auto",
                                    "tooltip": "Encode in overlapping tiles to save memory ('auto' decides)."}),
        }}

    def encode(self, vae, pixels, tiled="auto"):
        from ..lens_core import vae as core_vae

        if not torch.is_tensor(pixels) or pixels.ndim != 4 or pixels.shape[-1] < 3:
            raise ValueError(f"LensVAEEncode: expected an IMAGE [B,H,W,3], found "
                             f"{list(pixels.shape) if torch.is_tensor(pixels) else type(pixels).__name__}")
        chk.finite_tensor(pixels, "LensVAEEncode: pixels", UPSTREAM_FIX)
        pixels = check_image_range(pixels, "LensVAEEncode: pixels (an IMAGE)", 0.0, 1.0,
                                   "ComfyUI IMAGEs hold 0 … 1; the node that produced it gave another range (divide "
                                   "0 … 255 values by 255, or put a clamp / normalize node in between)")
        b, hh, ww = pixels.shape[0], pixels.shape[1], pixels.shape[2]
        h, w = hh // 16 * 16, ww // 16 * 16
        if h == 0 or w == 0:
            raise ValueError(f"LensVAEEncode: the image is {ww}×{hh} pixels; expected at least 16×16")
        core_config.check_pixels(h, w, "LensVAEEncode image")
        if (h, w) != (hh, ww):
            logging.info("LensVAEEncode: center-cropping %dx%d to %dx%d (multiples of 16)", ww, hh, w, h)
            top, left = (hh - h) // 2, (ww - w) // 2
            pixels = pixels[:, top:top + h, left:left + w]
        module = _ready(vae, b, h, w)
        with torch.inference_mode():
            images = core_vae.from_comfy_image(pixels).to(vae.patcher.load_device)
            latent = bridge.to_intermediate(module.encode(images, tiled=TILED[tiled]).float())
        bridge.soft_empty_cache()
        return ({"samples": latent},)
