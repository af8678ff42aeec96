"""LensSigmas: the official Lens sigma schedule (lens_core.sampling) as a native SIGMAS, for SamplerCustom /
SamplerCustomAdvanced driving ComfyUI's native Lens model (or any sampler that takes SIGMAS)."""
from __future__ import annotations

from .sampling import lens_latent
from ..lens_core import config as core_config

VARIANTS = ("lens", "turbo", "base")
MAX_SIZE = 16384


class LensSigmas:
    DESCRIPTION = ("The official Lens flow-match schedule (FLUX.2 empirical mu for this image size and step "
                   "count) as SIGMAS for native SamplerCustom / SamplerCustomAdvanced. With the native Lens "
                   "model: connect it instead of BasicScheduler and use CFGNorm with pre_cfg on (or no CFGNorm "
                   "at CFG 1); ModelSamplingFlux then has no effect and may stay or go.")
    CATEGORY = "Lens/sampling"
    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("steps·denoise + 1 sigmas from 1 (or the img2img start) down to 0, float32.",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 1440, "min": 16, "max": MAX_SIZE, "step": 16,
                              "tooltip": "Image width in pixels (a multiple of 16); ignored when a latent is "
                                         "connected."}),
            "height": ("INT", {"default": 1440, "min": 16, "max": MAX_SIZE, "step": 16,
                               "tooltip": "Image height in pixels (a multiple of 16); ignored when a latent is "
                                          "connected."}),
            "steps": ("INT", {"default": 20, "min": 0, "max": 1000,
                              "tooltip": "Steps of the schedule; 0 = the variant's default (Lens 20, Turbo 4, "
                                         "Base 50). The schedule depends on the step count below 1440² "
                                         "(empirical mu)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "1 = text-to-image; < 1 returns the last round(steps·denoise) steps "
                                             "of the same schedule (img2img, as LensSampler does)."}),
            "variant": (list(VARIANTS), {"default": "lens",
                                         "tooltip": "Only used for steps = 0: whose default step count to take."}),
        }, "optional": {
            "latent": ("LATENT", {"tooltip": "Optional: take the image size from this latent (Lens 128-channel "
                                             "latent, or an empty native EmptyLatentImage) instead of width / "
                                             "height."}),
        }}

    def get_sigmas(self, width, height, steps, denoise, variant, latent=None):
        from ..lens_core import sampling as core_sampling

        if latent is not None:
            _, _, h, w = lens_latent(latent, "LensSigmas").shape
        else:
            try:
                h, w = core_config.validate_size(int(height), int(width))
            except ValueError as exc:
                raise ValueError(f"LensSigmas: {exc}. Fix: set width and height to multiples of 16, or connect "
                                 f"the latent the sampler uses") from None
        steps = int(steps) or core_config.variant_defaults(variant)[0]
        return (core_sampling.denoise_sigmas(steps, h * w, float(denoise)),)


class _PipelineNoise:
    """A NOISE for SamplerCustomAdvanced: the lens_core pipeline's seeded noise in the latent's shape."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def generate_noise(self, input_latent):
        from .sampling import seeded_noise

        samples = lens_latent(input_latent, "LensNoise")
        b, _, h, w = samples.shape
        noise = seeded_noise(self.seed, b, h, w, input_latent.get("batch_index"))
        return core_config.unpack_latents(noise, h, w)


class LensNoise:
    DESCRIPTION = ("The Lens pipeline's seeded noise as a NOISE for native SamplerCustomAdvanced: the same seed "
                   "gives the same image as LensSampler and the lens_core pipeline (RandomNoise draws differently).")
    CATEGORY = "Lens/sampling"
    RETURN_TYPES = ("NOISE",)
    OUTPUT_TOOLTIPS = ("Standard-normal noise [B,128,H/16,W/16] drawn on the CPU in fp32 (device-independent).",)
    FUNCTION = "get_noise"

    @classmethod
    def INPUT_TYPES(cls):
        from .sampling import MAX_SEED

        return {"required": {
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                   "tooltip": "Seed of the initial noise (same seed = same noise as LensSampler)."}),
        }}

    def get_noise(self, noise_seed):
        return (_PipelineNoise(noise_seed),)
