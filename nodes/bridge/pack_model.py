"""The pack's Lens DiT as a native ComfyUI ``MODEL`` (issue 24).

Built the way ComfyUI builds its own models: a ``comfy.model_base.BaseModel`` subclass (:class:`LensPackModel`)
whose ``diffusion_model`` is the pack's own ``LensTransformer`` (every file format the pack reads, packed /
quantized layers, comfy.ops casting), with

- a model config (``comfy.supported_models_base.BASE``) carrying the FLUX.2 latent format (ComfyUI's ``Flux2``,
  or the bundled equivalent on a ComfyUI without it, e.g. 0.3.64: ``progress.FLUX2_FORMAT``), the inference
  dtypes and the official time shift (FLUX.2's empirical mu; 1.8278 at 1440², the Lens default) as
  ``sampling_settings["shift"]``: ``BaseModel`` builds its flow-matching ``ModelSamplingFlux`` / ``CONST``
  sampling object for ``ModelType.FLUX`` with it, so ``percent_to_sigma``, schedulers and cache nodes see Lens'
  sigmas. ``timestep`` hands σ itself to the DiT, as for native Lens; the DiT's ComfyUI entry rounds it to the
  official model timestep (σ·1000 in the compute dtype, /1000), so ModelSamplingFlux & co. may replace the
  sampling object without losing that;
- ``diffusion_model(x, timestep, context, attention_mask, transformer_options, control)``: ComfyUI's call
  convention, run through the ``DIFFUSION_MODEL`` wrappers of ``transformer_options`` (EasyCache & co.), then
  ``LensTransformer.forward_latents``, which rounds σ to the official model timestep and honours the native
  Lens patch points (``patches_replace["dit"][("double_block", i)]``, ``patches["double_block"]``,
  ``patches["post_input"]``, ``control``);
- the official CFG (per-token norm rescale, ``lens_core.sampling.cfg_combine``) set as the MODEL's
  ``sampler_cfg_function``, so KSampler / CFGGuider guide the official way (CFGNorm or any other CFG node
  replaces it, as on any model).

ComfyUI's ModelPatcher manages it like any MODEL (load_models_gpu, lowvram partial loads, weight patches,
object patches, clones). ``LensSampler`` samples it with lens_core's own sampler (bit-identical to the
official pipeline) unless model-level patches are present, then through ComfyUI's sampling.
"""
from __future__ import annotations

import dataclasses

import torch

import comfy.conds
import comfy.model_base
import comfy.model_management as mm
import comfy.patcher_extension
import comfy.supported_models_base

from ...lens_core import sampling as core_sampling
from ...lens_core.dit import LensTransformer
from .handles import LensModel
from .lora import LORA_KEY
from .patchers import dit_memory, make_patcher
from .progress import FLUX2_FORMAT

# The official shift for every image of more than 4300 tokens is FLUX.2's line a2·S + b2; the Lens default
# 1440² (S = 8100) gives 1.8278 (ComfyUI's native Lens config rounds it to 1.829). Below 4300 tokens the official
# mu also depends on the step count: LensSigmas gives those schedules exactly.
DEFAULT_TOKENS = (1440 // 16) ** 2
OFFICIAL_SHIFT = core_sampling.empirical_mu(DEFAULT_TOKENS, 20)
TEXT_TOKENS_ESTIMATE = 512              # text positions assumed by the activation-memory estimate


def official_cfg(args):
    """ComfyUI ``sampler_cfg_function``: the official CFG (uncond + g·(cond − uncond), rescaled per latent
    position to ‖cond‖ over the channels). ComfyUI hands x − x0 = σ·v; the rescale is homogeneous, so σ
    cancels."""
    return core_sampling.cfg_combine(args["cond"], args["uncond"], args["cond_scale"], dim=1)


class LensPackConfig(comfy.supported_models_base.BASE):
    """Model config of the pack's Lens DiT (never matched against files: the pack's loaders build it)."""
    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    sampling_settings = {"shift": OFFICIAL_SHIFT}
    latent_format = FLUX2_FORMAT
    memory_usage_factor = 4.0
    supported_inference_dtypes = [torch.bfloat16, torch.float32]      # fp16 gives NaNs with Lens


class LensDiffusionModel(LensTransformer):
    """``LensTransformer`` with ComfyUI's diffusion-model call convention as ``forward`` (what
    ``BaseModel.apply_model`` calls); the pack's own token-layout forward stays available as ``velocity``.

    ``transformer_options["lens_exact"] = True`` runs the reference-exact numerics; the default is the fast path
    (ComfyUI batches cond/uncond its own way, so the official bf16 bits are out of reach there anyway; fp32
    differences ~1e-7)."""

    def forward(self, x, timestep, context=None, attention_mask=None, transformer_options=None, control=None,
                **kwargs):
        options = transformer_options if transformer_options is not None else {}
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                            options)
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timestep, context, attention_mask, options, control=control, **kwargs)

    def _forward(self, x, timestep, context, attention_mask=None, transformer_options=None, control=None, **kwargs):
        options = transformer_options or {}
        return self.forward_latents(x, timestep, context, attention_mask, transformer_options=options,
                                    control=control, exact=bool(options.get("lens_exact", False)))


@dataclasses.dataclass
class LensModelInfo:
    """What the pack knows about its DiT beyond ComfyUI's model config."""
    config: object
    variant: str
    dtype: torch.dtype          # compute dtype
    path: str


class LensPackModel(comfy.model_base.BaseModel):
    """``comfy.model_base`` model around the pack's DiT (``diffusion_model``), with ``.lens`` = LensModelInfo."""

    def __init__(self, model_config, dit: LensDiffusionModel, info: LensModelInfo, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLUX, device=device)
        self.diffusion_model = dit
        if hasattr(mm, "archive_model_dtypes"):          # what BaseModel does for the models it builds (0.33)
            mm.archive_model_dtypes(dit)
        self.lens = info

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn", None)
        if cross_attn is not None:      # per-prompt length + mask: batched only with conds of the same length
            out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
        attention_mask = kwargs.get("attention_mask", None)
        if attention_mask is not None:
            out["attention_mask"] = comfy.conds.CONDRegular(attention_mask)
        return out

    def memory_required(self, input_shape, cond_shapes={}):
        """Activation bytes of one forward on ``input_shape`` [B, 128, h, w] (the pack's DiT estimate, as
        LensSampler uses)."""
        b, h, w = int(input_shape[0]), int(input_shape[-2]), int(input_shape[-1])
        return dit_memory(self.lens.config, b, h * w, TEXT_TOKENS_ESTIMATE, self.lens.dtype)


def build_pack_model(dit: LensDiffusionModel, variant: str, compute_dtype: torch.dtype, path: str):
    """The MODEL (a ModelPatcher of ComfyUI's choice, see patchers.patcher_class) of a loaded DiT."""
    config = LensPackConfig({"disable_unet_model_creation": True})
    weight_dtype = next((p.dtype for p in dit.parameters() if p.dtype.is_floating_point), compute_dtype)
    config.set_inference_dtype(weight_dtype, compute_dtype)
    model = LensPackModel(config, dit, LensModelInfo(dit.config, variant, compute_dtype, path))
    model.eval()
    patcher = make_patcher(model, "diffusion")
    patcher.set_model_sampler_cfg_function(official_cfg)
    return patcher


def is_pack_model(model) -> bool:
    return isinstance(getattr(model, "model", None), LensPackModel)


def pack_view(patcher) -> LensModel:
    """LensSampler's view of the pack's MODEL (``module`` = the DiT, ``loras`` = the applied files)."""
    info = patcher.model.lens
    return LensModel(patcher=patcher, config=info.config, variant=info.variant, dtype=info.dtype, path=info.path,
                     loras=tuple(patcher.model_options.get(LORA_KEY, ())))


def pack_model_patches(patcher) -> list[str]:
    """Model-level patches on ``patcher`` that only ComfyUI's own sampling applies (wrappers, callbacks,
    transformer_options patches, CFG functions other than the official one, object patches, hooks); weight
    patches and weight wrappers (LoRA) are not listed: ComfyUI applies them when it loads the model."""
    found = []
    for key, value in patcher.model_options.items():
        if key in ("transformer_options", LORA_KEY) or not value:
            continue
        if key == "sampler_cfg_function" and value is official_cfg:
            continue
        found.append(key)
    for key, value in patcher.model_options.get("transformer_options", {}).items():
        if key in ("wrappers", "callbacks", "patches", "patches_replace"):
            if _non_empty(value):
                found.append(f"transformer_options.{key}")
        elif value is not None:
            found.append(f"transformer_options.{key}")
    found += [attr for attr in ("wrappers", "callbacks") if _non_empty(getattr(patcher, attr, None))]
    found += list(patcher.object_patches)
    if getattr(patcher, "hook_patches", None) or getattr(patcher, "forced_hooks", None):
        found.append("hooks")
    return found


def _non_empty(value) -> bool:
    if isinstance(value, dict):
        return any(_non_empty(v) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return len(value) > 0
    return value is not None
