"""LensSigmas: a Lens sigma schedule (lens_core.schedules: the official one, or ComfyUI's native "simple") as a
SIGMAS, for LensSampler's sigmas input and for SamplerCustom / SamplerCustomAdvanced driving ComfyUI's native Lens
model (or any sampler that takes SIGMAS)."""
from __future__ import annotations

from .sampling import lens_latent
from ..lens_core import config as core_config
from ..lens_core.schedules import MAX_SHIFT, build_sigmas, schedule_names

VARIANTS = ("lens", "turbo", "base")
#: widget bound of one side (as LensEmptyLatent's); the area is bounded by lens_core.config.MAX_PIXELS
MAX_SIZE = 8192


class LensSigmas:
    DESCRIPTION = ("A Lens flow-match schedule as SIGMAS: 'official' (the Lens pipeline's: FLUX.2 empirical mu "
                   "for this image size and step count) or 'simple' (what native BasicScheduler 'simple' gives on "
                   "a native Lens model, to reproduce native graphs). For LensSampler's sigmas input, or native "
                   "SamplerCustom / SamplerCustomAdvanced: with the native Lens model connect it instead of "
                   "BasicScheduler and use CFGNorm with pre_cfg on (or no CFGNorm at CFG 1); ModelSamplingFlux then "
                   "has no effect and may stay or go.")
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
                                         "Base 50). The official schedule depends on the step count below 1440² "
                                         "(empirical mu)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "1 = text-to-image; < 1 returns the last round(steps·denoise) steps "
                                             "of the same schedule, at least one (img2img, as LensSampler does)."}),
            "variant": (list(VARIANTS), {"default": "lens",
                                         "tooltip": "Only used for steps = 0: whose default step count to take."}),
        }, "optional": {
            "latent": ("LATENT", {"tooltip": "Optional: take the image size from this latent (Lens 128-channel "
                                             "latent, or an empty native EmptyLatentImage) instead of width / "
                                             "height."}),
            "schedule": (schedule_names(), {
                "default": "official",
                "tooltip": "official = the Lens pipeline's schedule (reproduces the official images); simple = "
                           "native ComfyUI's BasicScheduler 'simple' on a native Lens model (ModelSamplingFlux, "
                           "shift below), to reproduce native graphs."}),
            "shift": ("FLOAT", {
                "default": 0.0, "min": 0.0, "max": MAX_SHIFT, "step": 0.001,
                "tooltip": "simple only: the ModelSamplingFlux shift (mu). 0 = auto: what the official ComfyUI Lens "
                           "template's ModelSamplingFlux (max_shift 1.15, base_shift 0.5) sets for this size "
                           "(1024²: 1.15, 1440²: 1.828); 1.829 = a native Lens model without ModelSamplingFlux."}),
        }}

    def get_sigmas(self, width, height, steps, denoise, variant, latent=None, schedule="official", shift=0.0):
        if latent is not None:
            _, _, h, w = lens_latent(latent, "LensSigmas").shape
            core_config.check_pixels(16 * h, 16 * w, "LensSigmas latent")
        else:
            fix = "use the image size (the sampler's latent size), or connect the latent the sampler uses"
            height = core_config.check_int(height, "LensSigmas height", 16, MAX_SIZE, fix)
            width = core_config.check_int(width, "LensSigmas width", 16, MAX_SIZE, fix)
            try:
                h, w = core_config.validate_size(height, width)
            except ValueError as exc:
                raise ValueError(f"LensSigmas: {exc}. Fix: set width and height to multiples of 16, or connect "
                                 f"the latent the sampler uses") from None
            core_config.check_pixels(height, width, "LensSigmas size")
        steps = core_config.check_int(steps, "LensSigmas steps", 0, core_config.MAX_STEPS,
                                      "0 = the variant's default; Lens uses 20, Turbo 4, Base 50 steps")
        steps = steps or core_config.variant_defaults(variant)[0]
        shift = core_config.check_number(shift, "LensSigmas shift", 0.0, MAX_SHIFT, "0 = auto, e.g. 1.829")
        return (build_sigmas(schedule, steps, h * w, denoise, shift=shift or None,
                             name="LensSigmas schedule"),)


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
