"""LensSampler: the official Lens flow-match sampler (lens_core.sampling) driven inside ComfyUI."""
from __future__ import annotations

import torch

from . import bridge
from .conditioning import conditioning_to_features, match_batch
from .latents import LATENT_CHANNELS, check_lens_latent
from ..lens_core import config as core_config

MAX_SEED = 0xFFFFFFFFFFFFFFFF
# a comma union (validated by ComfyUI 0.3.64 and 0.33 alike): MODEL (the pack's loaders, or native Lens) or
# LENS_MODEL, the type the pack's loaders had before issue 24 (links saved with it in old workflows still validate)
MODEL_TYPES = "LENS_MODEL,MODEL"
# a fresh LensSampler shows Lens's official settings (valid for every model kind; Turbo: 4 / 1)
DEFAULT_STEPS, DEFAULT_CFG = 20, 5.0


def lens_latent(latent: dict, where: str = "LensSampler"):
    """The [B,128,h,w] samples of a LATENT, building Lens-size zeros for an empty latent of another layout
    (e.g. native EmptyLatentImage's [B,4,H/8,W/8]); ValueError for a non-empty latent of another family."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError(f"{where}: expected a LATENT (a dict with 'samples'), found {type(latent).__name__}")
    samples = latent["samples"]
    if torch.is_tensor(samples) and samples.ndim == 4 and samples.shape[1] != LATENT_CHANNELS \
            and not torch.count_nonzero(samples):
        ratio = int(latent.get("downscale_ratio_spacial", 8))
        height, width = samples.shape[2] * ratio, samples.shape[3] * ratio
        try:
            h, w = core_config.validate_size(height, width)
        except ValueError as exc:
            raise ValueError(f"{where}: the empty latent is {width}×{height} pixels: {exc}. Fix: use a size "
                             f"that is a multiple of 16, or LensEmptyLatent") from None
        core_config.check_pixels(height, width, "LensSampler latent")
        return torch.zeros(samples.shape[0], LATENT_CHANNELS, h, w)
    check_lens_latent(samples, where)
    return samples


def seeded_noise(seed: int, batch: int, h: int, w: int, batch_index=None) -> torch.Tensor:
    """Initial noise [B,h·w,128] (fp32, CPU) from lens_core.sampling.make_noise; with a ``batch_index`` (from
    LatentFromBatch & co.) sample i gets the noise the full batch would have given at index batch_index[i]."""
    from ..lens_core import sampling as core_sampling

    if not batch_index:
        return core_sampling.make_noise(seed, batch, h, w)
    full = core_sampling.make_noise(seed, max(batch_index) + 1, h, w)
    return full[list(batch_index)]


class LensSampler:
    DESCRIPTION = ("Sample a Lens latent: official flow-match Euler schedule, CFG with norm rescale. Official "
                   "steps/CFG: Lens 20/5 (the default), Turbo 4/1, Base 50/5; 0 = auto from the model's variant.")
    CATEGORY = "Lens/sampling"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised Lens latent [B,128,H/16,W/16]; batch_index / noise_mask are kept.",)
    # A LATENT with a noise_mask (Set Latent Noise Mask, VAE Encode for Inpainting) is inpainted: only the masked
    # area is generated, the rest follows the input latent at every step's noise level and ends equal to it.
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL_TYPES, {"tooltip": "From LensModelLoader / LensCheckpointLoader / LensLoraLoader (sampled "
                                               "by the pack's official sampler; with model patches such as "
                                               "EasyCache, through ComfyUI's sampling on the official schedule), or "
                                               "ComfyUI's native Lens MODEL (UNETLoader; ComfyUI 0.33+), sampled "
                                               "the official way through ComfyUI's own sampling code."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt, from LensTextEncode (or native Lens text "
                                                     "encoding)."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt; encode an empty text for the official "
                                                     "'no negative'. Unused at CFG 1."}),
            "latent_image": ("LATENT", {"tooltip": "LensEmptyLatent (or native EmptyLatentImage) for text-to-image; "
                                                   "LensVAEEncode output with denoise < 1 for img2img / hires; "
                                                   "with a noise mask (Set Latent Noise Mask) only the masked "
                                                   "area is regenerated (inpainting)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                             "tooltip": "Seed of the initial noise (same seed = same image as the lens_core "
                                        "pipeline)."}),
            "steps": ("INT", {"default": DEFAULT_STEPS, "min": 0, "max": 1000,
                              "tooltip": "Sampling steps. Official: Lens 20, Turbo 4, Base 50. 0 = auto: the "
                                         "variant LensModelLoader detected (a native MODEL needs a number). "
                                         "Not used when sigmas is connected (the sigmas are the steps)."}),
            "cfg": ("FLOAT", {"default": DEFAULT_CFG, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance. Official: Lens 5, Turbo 1, Base 5; 1 disables "
                                         "guidance (one forward per step). 0 = auto: the variant "
                                         "LensModelLoader detected (a native MODEL needs a number)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "1 = text-to-image from pure noise; < 1 keeps that much of the input "
                                             "latent's structure (img2img / hires ≈ 0.35): the last "
                                             "round(steps·denoise) steps of the schedule are run, at least one. "
                                             "Must be 1 when sigmas is connected (cut the schedule there)."}),
        }, "optional": {
            "sigmas": ("SIGMAS", {"tooltip": "Optional schedule to walk instead of the official one for steps / "
                                             "denoise: LensSigmas (official or native 'simple'), or a native "
                                             "scheduler (BasicScheduler on a Lens model …). Flow-match sigmas: "
                                             "decreasing from 1 (text-to-image) or below 1 (img2img, needs an "
                                             "image latent) to 0."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @staticmethod
    def schedule(steps, denoise, h, w, samples, sigmas=None):
        """The sigmas this run walks (the SIGMAS input, checked, or the official schedule for steps / denoise,
        steps checked here: the one check of every route) and whether it is img2img (starts below σ = 1: needs
        an image latent, not an empty one)."""
        from ..lens_core import schedules

        if sigmas is None:
            sigmas = schedules.build_sigmas("official", core_config.check_steps(steps, "LensSampler steps"), h * w,
                                            denoise)
            where = f"denoise {denoise:g} < 1"
        else:
            if denoise != 1.0:
                raise ValueError(f"LensSampler: denoise {denoise:g} with a sigmas input: the connected sigmas decide "
                                 f"where the run starts, denoise would be ignored; fix: set denoise to 1 and cut the "
                                 f"schedule instead (LensSigmas denoise)")
            sigmas = schedules.check_sigmas(sigmas, "LensSampler sigmas")
            where = f"the connected sigmas start at {float(sigmas[0]):.4g} < 1, which"
        img2img = float(sigmas[0]) < 1.0
        if img2img and not torch.count_nonzero(samples):
            raise ValueError(f"LensSampler: {where} is img2img and needs an input image latent (LensVAEEncode / "
                             f"VAEEncode), found an empty latent; fix: set denoise to 1 (a schedule from 1) for "
                             f"text-to-image, or encode an image")
        return sigmas, img2img

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg, denoise, unique_id=None,
               sigmas=None):
        from ..lens_core import sampling as core_sampling

        if bridge.is_pack_model(model):
            if bridge.pack_model_patches(model):       # EasyCache, block patches, CFG nodes, hooks, ...
                return self.sample_pack_native(model, positive, negative, latent_image, seed, steps, cfg, denoise,
                                               unique_id, sigmas)
            model = bridge.pack_view(model)
        elif not isinstance(model, bridge.LensModel):
            return self.sample_native(model, positive, negative, latent_image, seed, steps, cfg, denoise, unique_id,
                                      sigmas)
        d_steps, d_cfg = core_config.variant_defaults(model.variant)
        steps, cfg = int(steps) or d_steps, float(cfg) or d_cfg         # checked by schedule()
        samples = lens_latent(latent_image)
        batch, _, h, w = samples.shape
        core_config.check_pixels(16 * h, 16 * w, "LensSampler latent")
        sigmas, img2img = self.schedule(steps, denoise, h, w, samples, sigmas)
        pos, pos_mask = match_batch(*conditioning_to_features(positive, model, "positive"), batch, "positive")
        if pos_mask.shape[1] == 0:              # empty positive prompt: one fully masked text position
            pos = [f.new_zeros(batch, 1, f.shape[2]) for f in pos]
            pos_mask = torch.zeros(batch, 1, dtype=torch.bool)
        neg = neg_mask = None                   # None = the official empty negative (zeros, all-False mask)
        if cfg != 1.0:
            neg, neg_mask = conditioning_to_features(negative, model, "negative")
            if neg_mask.shape[1] == 0:
                neg = neg_mask = None
            else:
                neg, neg_mask = match_batch(neg, neg_mask, batch, "negative")

        noise = seeded_noise(int(seed), batch, h, w, latent_image.get("batch_index"))
        init = mask = None
        noise_mask = latent_image.get("noise_mask")
        if noise_mask is not None:          # inpainting (Set Latent Noise Mask, VAE Encode for Inpainting)
            mask = core_sampling.prepare_mask(noise_mask, batch, h, w)
            init = core_config.pack_latents(samples.float())
        if img2img:
            init = core_config.pack_latents(samples.float())

        device, dtype = model.patcher.load_device, model.dtype
        text_tokens = max(pos_mask.shape[1], 0 if neg_mask is None else neg_mask.shape[1])
        rows = batch * (1 if cfg == 1.0 else 2)
        bridge.load(model.patcher,
                    memory_required=bridge.dit_memory(model.config, rows, h * w, text_tokens, dtype),
                    minimum_memory_required=bridge.dit_memory(model.config, 1, h * w, text_tokens, dtype))

        reporter = bridge.StepReporter(
            len(sigmas) - 1, device, lambda x0: core_config.unpack_latents(x0[:1].float(), h, w),
            node_id=unique_id)
        with torch.inference_mode():
            # cfg 1: one forward per step on the positive only (the sampler's fast path); otherwise the
            # reference computation ([pos; neg] in one batch), which equals the official pipeline bit for bit
            dit = model.module                  # the token-layout forward of the pack's DiT
            out = core_sampling.sample(
                getattr(dit, "velocity", dit), noise, pos, pos_mask, neg, neg_mask, grid=(h, w), sigmas=sigmas, cfg=cfg,
                init_latents=init, callback=reporter, exact=cfg != 1.0,
                dtype=dtype, device=device, mask=mask)
            result = bridge.to_intermediate(core_config.unpack_latents(out.float(), h, w))
        bridge.soft_empty_cache()
        latent = dict(latent_image)
        latent.pop("downscale_ratio_spacial", None)
        latent["samples"] = result
        return (latent,)

    def sample_native(self, model, positive, negative, latent_image, seed, steps, cfg, denoise, unique_id=None,
                      sigmas=None):
        """A native Lens MODEL: the official schedule, model timestep and CFG rescale (lens_core) through
        ComfyUI's own sampling path; same seed = same noise as with the pack's model."""
        from ..lens_core import sampling as core_sampling

        patcher = bridge.native_lens_patcher(model, "LensSampler")
        if (not steps and sigmas is None) or not cfg:
            raise ValueError(f"LensSampler: steps = {steps} / cfg = {cfg}: 0 means 'the variant's default', but a "
                             f"native MODEL does not say whether it is Lens, Turbo or Base. Fix: set steps and cfg "
                             f"(Lens 20 / 5, Turbo 4 / 1, Base 50 / 5)")
        dtype = bridge.native_compute_dtype(patcher)
        official = bridge.official_native_patcher(
            patcher, lambda sigma: core_sampling.model_timestep(sigma, dtype),
            None if float(cfg) == 1.0 else (lambda c, u, g: core_sampling.cfg_combine(c, u, g, dim=1)))
        return self._through_comfy(official, bridge.native_text_width(patcher), positive, negative, latent_image,
                                   seed, int(steps), cfg, denoise, unique_id, sigmas)

    def sample_pack_native(self, model, positive, negative, latent_image, seed, steps, cfg, denoise, unique_id=None,
                           sigmas=None):
        """The pack's MODEL with model-level patches (EasyCache, block patches, CFG nodes, hooks): sampled by
        ComfyUI's own sampling path, which applies them, on the official sigmas (or the connected ones) with the
        pipeline's noise (the DiT itself rounds σ to the official timestep; the CFG is the MODEL's, official
        unless a node replaced it). 0 = auto steps / CFG follow the variant the loader detected."""
        info = bridge.pack_view(model)
        d_steps, d_cfg = core_config.variant_defaults(info.variant)
        return self._through_comfy(model, info.text_width, positive, negative, latent_image, seed,
                                   int(steps) or d_steps, float(cfg) or d_cfg, denoise, unique_id, sigmas)

    def _through_comfy(self, patcher, width, positive, negative, latent_image, seed, steps, cfg, denoise,
                       unique_id=None, sigmas=None):
        from ..lens_core import sampling as core_sampling

        cfg = float(cfg)
        samples = lens_latent(latent_image)
        batch, _, h, w = samples.shape
        sigmas, _ = self.schedule(steps, denoise, h, w, samples, sigmas)      # as on lens_core's route: before
        for name, cond in (("positive", positive), ("negative", negative)):  # the conditioning checks
            check_native_conditioning(cond, width, name)
        noise_mask = latent_image.get("noise_mask")
        if noise_mask is not None:          # inpainting: checked here, applied by ComfyUI's own sampler
            core_sampling.prepare_mask(noise_mask, batch, h, w)
        noise = core_config.unpack_latents(seeded_noise(int(seed), batch, h, w, latent_image.get("batch_index")), h, w)
        reporter = bridge.StepReporter(len(sigmas) - 1, patcher.load_device, lambda x0: x0[:1].float(), node_id=unique_id)
        out = bridge.sample_native(patcher, noise, sigmas, positive, negative, cfg, samples.float(), seed,
                                   callback=lambda i, x0, x, total: reporter(i, total, x, x0), noise_mask=noise_mask)
        latent = dict(latent_image)
        latent.pop("downscale_ratio_spacial", None)
        latent["samples"] = bridge.to_intermediate(out.float())
        return (latent,)


def check_native_conditioning(conditioning, width: int, name: str):
    """ValueError unless every entry of ``conditioning`` is a [B,S,width] tensor (S = 0: the empty prompt)."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(f"LensSampler: {name}: expected a CONDITIONING (a non-empty list), found "
                         f"{type(conditioning).__name__}")
    for entry in conditioning:
        cond = entry[0] if isinstance(entry, (list, tuple)) and entry else None
        if not torch.is_tensor(cond) or cond.ndim != 3 or (cond.shape[1] and cond.shape[-1] != width):
            raise ValueError(f"LensSampler: {name}: conditioning {getattr(cond, 'shape', type(cond).__name__)} does "
                             f"not fit this native Lens model, which expects [B,S,{width}]. Fix: encode the prompt "
                             f"with the Lens text encoder (CLIPLoader type lens, or LensTextEncode)")
