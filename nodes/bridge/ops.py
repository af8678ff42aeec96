"""The layer classes every lens_core module is built with inside ComfyUI (its ``operations`` namespace)."""
from __future__ import annotations

import torch

import comfy.ops

OPERATION_NAMES = ("Linear", "Conv2d", "GroupNorm", "LayerNorm", "Embedding", "RMSNorm")
_OPERATIONS = []


def operations():
    """Layer classes for every lens_core module built inside ComfyUI: ``comfy.ops.manual_cast`` layers (always
    cast weight/bias to the input's device and dtype), subclassed so that they always build their parameters.

    With dynamic VRAM (comfy-aimdo, since ComfyUI #11845 in Feb 2026; on by default on NVIDIA in 0.33)
    ComfyUI's own Linear and Embedding build *lazily* (``weight = None`` until ``load_state_dict``) unless the
    class brings its own ``_load_from_state_dict``; lens_core validates shapes and assigns tensor by tensor onto
    modules built on ``meta``, which needs the parameters to exist. The subclasses use torch's standard
    state-dict loading (what these layers do whenever dynamic VRAM is off), so they build eagerly (on ``meta``:
    nothing is allocated) and stay comfy.ops layers in every other respect (casting forward,
    ``comfy_cast_weights``, weight functions). The quantized storage classes the loaders ask for (``QuantLinear``,
    ``GGUFLinear``, ``FP8Linear``, ``QuantEmbedding``, ``PackedExperts``) are lens_core's families as comfy.ops
    cast-weight layers (:mod:`.quant`)."""
    if not _OPERATIONS:
        base = comfy.ops.manual_cast
        eager = {name: type(name, (getattr(base, name),), {
            "__module__": __name__, "__qualname__": f"LensOps.{name}",
            "_load_from_state_dict": torch.nn.Module._load_from_state_dict})
            for name in OPERATION_NAMES if hasattr(base, name)}
        from .quant import storage_classes   # the quantized storage families (lens_core.quant_linear …)
        eager.update(storage_classes())
        _OPERATIONS.append(type("LensOps", (base,), eager))
    return _OPERATIONS[0]
