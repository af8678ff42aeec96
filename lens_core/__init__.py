"""lens_core: a self-contained PyTorch implementation of Microsoft's Lens text-to-image model.

Plain PyTorch; never imports ComfyUI. ComfyUI-specific behaviour (weight casting/offload, progress,
interrupts) enters only through arguments: an ``operations`` namespace for layer construction, device
and dtype, and per-step callbacks.
"""
__version__ = "0.1.0"
