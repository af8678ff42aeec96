"""Glue for ComfyUI's native Lens MODEL (``comfy.model_base.Lens``, ComfyUI 0.33+) sampled the official way."""
from __future__ import annotations

import torch

import comfy.utils


def native_lens_patcher(model, where: str):
    """``model`` if it is the ModelPatcher of a native Lens model; ValueError naming what it is and the fix."""
    try:
        import comfy.model_base
    except ImportError:         # a ComfyUI stand-in without model classes
        cls = None
    else:
        cls = getattr(comfy.model_base, "Lens", None)
    inner = getattr(model, "model", None)
    if cls is None:
        raise ValueError(f"{where}: got a {type(inner).__name__ if inner is not None else type(model).__name__} "
                         f"MODEL, but this ComfyUI has no native Lens model (comfy.model_base.Lens, ComfyUI 0.33 "
                         f"or newer). Fix: load the Lens DiT with LensModelLoader, or update ComfyUI")
    if not isinstance(inner, cls) or not hasattr(model, "clone"):
        raise ValueError(f"{where}: the model input is a {type(inner if inner is not None else model).__name__} "
                         f"model, expected Lens. Fix: load a Lens DiT with LensModelLoader or the native "
                         f"UNETLoader (lens_bf16 / lens_turbo_bf16)")
    return model


def native_compute_dtype(patcher) -> torch.dtype:
    """The dtype the native model's DiT computes in (its manual-cast dtype, else its weight dtype)."""
    m = patcher.model
    if hasattr(m, "get_dtype_inference"):
        return m.get_dtype_inference()
    return getattr(m, "manual_cast_dtype", None) or m.get_dtype()


def native_text_width(patcher) -> int:
    """Width of the stacked text conditioning the native Lens DiT accepts (its txt_in input features)."""
    return int(patcher.model.diffusion_model.txt_in.in_features)


def official_native_patcher(patcher, timestep_fn, cfg_fn=None):
    """A clone of a native Lens ModelPatcher that samples like the official pipeline.

    ``timestep_fn(sigma)`` gives the timestep the DiT receives (its model_sampling's ``timestep``; the Euler
    step and x0 still use σ itself); ``cfg_fn(cond, uncond, scale)`` replaces ComfyUI's linear CFG and gets
    x − x0 = σ·v of both passes in the [B,128,h,w] layout (None keeps ComfyUI's CFG, e.g. at CFG 1). Everything
    else (LoRA and other weight patches, wrappers, transformer_options, memory management) is the patcher's own.
    """
    import comfy.model_sampling

    m = patcher.clone()
    current = m.get_model_object("model_sampling")

    class LensOfficialSampling(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
        def timestep(self, sigma):
            return timestep_fn(sigma)

    sampling = LensOfficialSampling(m.model.model_config)
    shift = getattr(current, "shift", None)
    if shift is not None:
        sampling.set_parameters(shift=shift)
    m.add_object_patch("model_sampling", sampling)
    if cfg_fn is not None:
        m.set_model_sampler_cfg_function(lambda args: cfg_fn(args["cond"], args["uncond"], args["cond_scale"]))
    return m


def sample_native(patcher, noise, sigmas, positive, negative, cfg, latent_image, seed, callback=None,
                  noise_mask=None):
    """ComfyUI's own sampling path (comfy.sample.sample_custom: conds, load_models_gpu, model wrappers, its
    inpainting with ``noise_mask``) with ComfyUI's Euler sampler on the given ``sigmas``; ``callback(step, x0, x,
    total)`` per step."""
    import comfy.sample
    import comfy.samplers

    sampler = comfy.samplers.sampler_object("euler")
    return comfy.sample.sample_custom(patcher, noise, float(cfg), sampler, sigmas, positive, negative, latent_image,
                                      noise_mask=noise_mask, callback=callback,
                                      disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=int(seed))
