"""Devices and dtypes ComfyUI chooses per model role, the intermediate device, interrupts, cache emptying."""
from __future__ import annotations

import torch

import comfy.model_management as mm

ROLES = ("diffusion", "text_encoder", "vae")


def devices(role: str) -> tuple[torch.device, torch.device]:
    """(load_device, offload_device) ComfyUI uses for a model of this role."""
    if role == "diffusion":
        return mm.get_torch_device(), mm.unet_offload_device()
    if role == "text_encoder":
        return mm.text_encoder_device(), mm.text_encoder_offload_device()
    if role == "vae":
        return mm.vae_device(), mm.vae_offload_device()
    raise ValueError(f"unknown model role {role!r}: expected one of {ROLES}")


def compute_dtype(role: str, load_device) -> torch.dtype:
    """The dtype activations run in: ComfyUI's choice for the role (never fp16 for the DiT: it gives NaNs)."""
    if role == "diffusion":
        dt = mm.unet_dtype(load_device, supported_dtypes=[torch.bfloat16, torch.float32])
    elif role == "vae":
        dt = mm.vae_dtype(load_device, allowed_dtypes=[torch.bfloat16, torch.float32])
    else:   # GPT-OSS runs in bf16 (ComfyUI's own text-encoder default, fp16, is not used for it); fp32 on CPU
        dt = mm.unet_dtype(load_device, supported_dtypes=[torch.bfloat16, torch.float32])
    return dt if dt in (torch.bfloat16, torch.float32) else torch.float32


def intermediate_device() -> torch.device:
    return mm.intermediate_device()


def to_intermediate(t: torch.Tensor) -> torch.Tensor:
    """Node outputs live on ComfyUI's intermediate device (the CPU unless --gpu-only)."""
    return t.to(mm.intermediate_device())


def check_interrupt():
    """Raise ComfyUI's InterruptProcessingException if POST /interrupt was received."""
    mm.throw_exception_if_processing_interrupted()


def soft_empty_cache():
    mm.soft_empty_cache()
