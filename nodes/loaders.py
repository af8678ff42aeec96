"""Loader nodes: LensModelLoader, LensTextEncoderLoader, LensVAELoader, LensCheckpointLoader.

Files are listed from ComfyUI's standard model folders (``diffusion_models``, ``text_encoders``, ``vae``) plus
the diffusers folders found below them; lens_core.checkpoints detects the layout from the keys.
"""
from __future__ import annotations

import os

import torch

from . import bridge

WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                 "fp8_e4m3fn": getattr(torch, "float8_e4m3fn", None)}
VARIANT_CHOICES = ["auto", "lens", "turbo", "base"]
WEIGHT_DTYPE_TOOLTIP = ("Storage dtype of the DiT's float weights. 'default' = the dtype ComfyUI computes in on "
                        "this device (bf16 on GPUs that support it, else fp32), whatever the file stores; "
                        "quantized layers (GGUF and ComfyUI quantized files: INT8 ConvRot, INT4 ConvRot W4A4, "
                        "fp8 scaled, MXFP8, NVFP4 …) stay as stored. fp8_e4m3fn stores the large layers in 8 "
                        "bits (about half of bf16); computation still runs in bf16/fp32.")
TE_FOLDERS = ("text_encoders",)
TE_DIR_FOLDERS = ("diffusion_models",)
VAE_FOLDERS = ("vae",)
VAE_DIR_FOLDERS = ("diffusion_models",)


def _checkpoints():
    from ..lens_core import checkpoints
    return checkpoints


_WHERE = {"diffusion": ("Lens DiT", "models/diffusion_models", "LensModelLoader"),
          "text_encoder": ("GPT-OSS text encoder", "models/text_encoders", "LensTextEncoderLoader"),
          "vae": ("FLUX.2 VAE", "models/vae", "LensVAELoader")}


def _wrong_file(path, role, exc):
    """A ValueError naming the file, what it is, and which loader/folder it belongs to."""
    what, _folder, node = _WHERE[role]
    if "Fix:" in str(exc):          # a broken / hostile file whose error already names the fix
        return ValueError(f"{node}: {path} is not a usable {what} checkpoint: {exc}")
    others = "; ".join(f"a {w} goes in {f} and loads with {n}" for r, (w, f, n) in _WHERE.items() if r != role)
    return ValueError(f"{node}: {path} is not a usable {what} checkpoint ({exc}). Fix: pick a {what} file or a "
                      f"diffusers Lens folder in this loader ({others}).")


def load_model(path: str, weight_dtype: str = "default", variant: str = "auto"):
    """The DiT with comfy.ops layers on the offload device, as a native ComfyUI MODEL (bridge/pack_model.py).
    Weights are stored in ``weight_dtype`` ("default": ComfyUI's compute dtype for this device; fp8 stores
    eligible Linears as float8 + scale); activations run in ComfyUI's compute dtype (bf16 or fp32; never fp16,
    which gives NaNs with Lens)."""

    ck = _checkpoints()
    load_device, offload_device = bridge.devices("diffusion")
    cdt = bridge.compute_dtype("diffusion", load_device)
    src = bridge.component_path(path, "transformer")
    override = None if variant == "auto" else variant
    store = {"default": cdt, "fp8_e4m3fn": cdt}.get(weight_dtype, WEIGHT_DTYPES[weight_dtype])
    try:
        module = ck.load_transformer(src, dtype=store, device=offload_device, operations=bridge.operations(),
                                     variant=override, fp8=weight_dtype == "fp8_e4m3fn",
                                     dit_class=bridge.LensDiffusionModel)
        # the variant from the file's own evidence (metadata/config) before its path, as the loader decided it
        var = module.lens_checkpoint.variant
    except (ValueError, KeyError) as exc:
        raise _wrong_file(src, "diffusion", exc) from exc
    module.eval()
    return bridge.build_pack_model(module, var, cdt, path)


def load_text_encoder(path: str, device: str = "default", experts: str = "packed") -> bridge.LensTextEncoder:
    ck = _checkpoints()
    load_device, offload_device = bridge.devices("text_encoder")
    if device == "cpu":
        load_device = offload_device = torch.device("cpu")
    cdt = bridge.compute_dtype("text_encoder", load_device)
    src = bridge.component_path(path, "text_encoder")
    try:
        module = ck.load_text_encoder(src, dtype=cdt, device=offload_device, operations=bridge.operations(),
                                      experts=experts)
    except (ValueError, KeyError) as exc:
        raise _wrong_file(src, "text_encoder", exc) from exc
    # lens_core's locate(): a diffusers folder's tokenizer/, the side-car <stem>.tokenizer.json, the tokenizer.json
    # beside a GGUF encoder, or the one the NVFP4 file embeds
    tokenizer = ck.load_tokenizer(path)
    module.eval()
    module.compute_dtype = cdt
    patcher = bridge.make_patcher(module, "text_encoder", devices=(load_device, offload_device))
    cfg = getattr(module, "config", None)
    return bridge.LensTextEncoder(patcher=patcher, tokenizer=tokenizer, dtype=cdt, path=path,
                                  hidden_size=int(getattr(cfg, "hidden_size", 0) or 0),
                                  num_layers=len(getattr(module, "selected_layers", (0, 0, 0, 0))))


def load_vae(path: str) -> bridge.LensVAE:
    ck = _checkpoints()
    load_device, offload_device = bridge.devices("vae")
    cdt = bridge.compute_dtype("vae", load_device)
    src = bridge.component_path(path, "vae")
    try:
        module = ck.load_vae(src, dtype=cdt, device=offload_device, operations=bridge.operations())
    except (ValueError, KeyError) as exc:
        raise _wrong_file(src, "vae", exc) from exc
    module.eval()
    module.compute_dtype = cdt
    return bridge.LensVAE(patcher=bridge.make_patcher(module, "vae"), dtype=cdt, path=path)


# ---------------------------------------------------------------------------------------------------------


class LensModelLoader:
    DESCRIPTION = "Load the Lens / Lens-Turbo / Lens-Base diffusion transformer (MMDiT)."
    CATEGORY = "Lens/loaders"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Lens DiT as a native MODEL, managed by ComfyUI (loaded on demand, offloaded when memory "
                       "is short): LensSampler, KSampler, SamplerCustom(Advanced) and model patches such as "
                       "EasyCache take it.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (bridge.model_choices("diffusion_models"), {
                "tooltip": "A Lens DiT file in models/diffusion_models or models/unet (e.g. lens_bf16.safetensors, "
                           "or a GGUF such as lens-Q4_K.gguf, kept quantized) or a diffusers Lens folder placed "
                           "there."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "default": "default",
                "tooltip": WEIGHT_DTYPE_TOOLTIP}),
            "variant": (VARIANT_CHOICES, {
                "default": "auto",
                "tooltip": "Which Lens model this is: LensSampler's steps/cfg set to 0 (auto) use its official "
                           "settings (Lens 20/5, Turbo 4/1, Base 50/5). 'auto' reads it from the file's "
                           "metadata/config, then its name."}),
        }}

    def load(self, model_name, weight_dtype="default", variant="auto"):
        path = bridge.resolve_model(model_name, "diffusion_models")
        return (load_model(path, weight_dtype, variant),)


class LensTextEncoderLoader:
    DESCRIPTION = "Load the GPT-OSS-20B text encoder of Lens (MXFP4/NVFP4 experts kept packed by default)."
    CATEGORY = "Lens/loaders"
    RETURN_TYPES = ("LENS_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The Lens text encoder with its tokenizer, managed by ComfyUI.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (bridge.model_choices(*TE_FOLDERS, dir_folders=TE_DIR_FOLDERS), {
                "tooltip": "The GPT-OSS text encoder in models/text_encoders or models/clip (e.g. "
                           "gpt_oss_20b_nvfp4.safetensors, or a GPT-OSS GGUF with tokenizer.json beside it) or a "
                           "diffusers Lens folder (its text_encoder/ and tokenizer/ are used)."}),
            "device": (["default", "cpu"], {
                "default": "default",
                "tooltip": "'cpu' keeps the text encoder on the CPU (saves VRAM for the DiT); 'default' lets "
                           "ComfyUI choose."}),
            "experts": (["packed", "dequantized"], {
                "default": "packed",
                "tooltip": "'packed' keeps the MoE experts in MXFP4/NVFP4 (≈12.6 GB); 'dequantized' expands them "
                           "(≈40 GB, slightly faster on some GPUs)."}),
        }}

    def load(self, text_encoder_name, device="default", experts="packed"):
        path = bridge.resolve_model(text_encoder_name, *TE_FOLDERS, *TE_DIR_FOLDERS)
        return (load_text_encoder(path, device, experts),)


class LensVAELoader:
    DESCRIPTION = "Load the FLUX.2 autoencoder used by Lens (diffusers or BFL key names)."
    CATEGORY = "Lens/loaders"
    RETURN_TYPES = ("LENS_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The FLUX.2 VAE, managed by ComfyUI.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (bridge.model_choices(*VAE_FOLDERS, dir_folders=VAE_DIR_FOLDERS), {
                "tooltip": "The FLUX.2 VAE in models/vae (flux2-vae.safetensors) or a diffusers Lens folder "
                           "(its vae/ is used)."}),
        }}

    def load(self, vae_name):
        path = bridge.resolve_model(vae_name, *VAE_FOLDERS, *VAE_DIR_FOLDERS)
        return (load_vae(path),)


class LensCheckpointLoader:
    DESCRIPTION = "Load all three Lens components from one diffusers folder (microsoft/Lens layout)."
    CATEGORY = "Lens/loaders"
    RETURN_TYPES = ("MODEL", "LENS_TEXT_ENCODER", "LENS_VAE")
    RETURN_NAMES = ("model", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = ("The DiT as a native MODEL.", "The text encoder with its tokenizer.", "The FLUX.2 VAE.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": (bridge.model_choices("diffusion_models", files=False), {
                "tooltip": "A diffusers Lens folder (model_index.json, transformer/, text_encoder/, tokenizer/, "
                           "vae/) placed in models/diffusion_models."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "default": "default", "tooltip": WEIGHT_DTYPE_TOOLTIP}),
            "variant": (VARIANT_CHOICES, {
                "default": "auto", "tooltip": "Lens, Turbo or Base; 'auto' reads the config, then the folder name."}),
            "text_encoder_device": (["default", "cpu"], {
                "default": "default", "tooltip": "'cpu' keeps the text encoder on the CPU."}),
            "experts": (["packed", "dequantized"], {
                "default": "packed", "tooltip": "Keep the text encoder's MoE experts packed (MXFP4) or expand them."}),
        }}

    def load(self, folder, weight_dtype="default", variant="auto", text_encoder_device="default",
             experts="packed"):
        path = bridge.resolve_model(folder, "diffusion_models")
        if not os.path.isfile(os.path.join(path, bridge.DIFFUSERS_MARKER)):
            raise ValueError(f"{path}: expected a diffusers Lens folder with {bridge.DIFFUSERS_MARKER}, found none; "
                             f"for single files use LensModelLoader / LensTextEncoderLoader / LensVAELoader")
        return (load_model(path, weight_dtype, variant), load_text_encoder(path, text_encoder_device, experts),
                load_vae(path))
