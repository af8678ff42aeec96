"""Weights kept in their stored dtype, computed in a wider one (issue 25: fp32 numerics without 2× memory).

When the run dtype is fp32 but a checkpoint stores its float weights in bf16 (the Comfy-Org DiT files, the
GPT-OSS encoder's attention, embedding and norms), casting them to fp32 at load doubles their memory (8.2 →
16.4 GB for the DiT) and adds no information: every bf16 value is exactly representable in fp32. Instead the
loaders keep such weights in bf16 (or fp16) and each layer upcasts its own weight per call. The result is
bit-identical to running the fp32 copy of the same weights (same values, same kernels); only one layer's fp32
weight exists at a time.

Only layers whose forward casts per call may keep a narrower weight:

* plain ``nn.Linear`` layers become :class:`UpcastLinear` (``F.linear`` on the upcast weight and bias);
* parameters of modules listed in :data:`CASTING_MODULES` (norms, embeddings, sinks, expert biases: their forward
  already casts, or their output is cast right after the lookup) keep the stored dtype as they are.

Anything else (the VAE's convolutions, host ``operations`` layers such as ComfyUI's) is loaded as before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import cast_to

#: stored dtypes (safetensors / GGUF names) that upcast exactly to fp32
NARROW_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16}


class UpcastLinear(nn.Linear):
    """An ``nn.Linear`` whose weight (and bias) are stored narrower than the input: both are cast to the input's
    dtype and device per call, so the output equals that of an ``nn.Linear`` holding the upcast weight."""

    def forward(self, x):
        return F.linear(x, cast_to(self.weight, x.dtype, x.device), cast_to(self.bias, x.dtype, x.device))

    def dequantized_weight(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """The weight in ``dtype`` (the interface of the quantized layers: a LoRA on this layer is added per call
        in the compute dtype instead of being merged into, and rounded to, the narrow stored weight)."""
        return cast_to(self.weight, dtype, device)


def _casting_module_types() -> tuple:
    """Module classes whose parameters are cast to the compute dtype where they are used."""
    from .ops import RMSNorm
    from .quant import PackedExperts
    from .text_encoder import GptOssAttention, GptOssRMSNorm

    return (RMSNorm, GptOssRMSNorm, GptOssAttention, PackedExperts, nn.Embedding)


#: parameter names per casting module type that may stay narrow (None = all of the module's own parameters)
_CASTING_PARAMS = {"GptOssAttention": ("sinks",), "PackedExperts": ("gate_up_proj_bias", "down_proj_bias")}


def keep_stored_dtype(model: nn.Module, stored_dtype, compute_dtype, skip=()) -> int:
    """Before weights are assigned (``model`` built on ``meta`` in ``compute_dtype``): give every parameter that
    may stay narrow the dtype its checkpoint stores it in. ``stored_dtype(name)`` returns the stored
    safetensors/GGUF dtype name of the state-dict key ``name`` (None when absent); ``skip``: keys another reader
    handles (quantized layers). Returns the bytes saved against loading everything in ``compute_dtype``.

    Only for fp32 compute (bf16/fp16 compute already holds narrow weights)."""
    if compute_dtype != torch.float32:
        return 0
    saved = 0
    casting = _casting_module_types()
    skip = set(skip)
    for mod_name, mod in list(model.named_modules()):
        prefix = mod_name + "." if mod_name else ""
        own = list(mod._parameters.items())
        if type(mod) is nn.Linear:
            narrow = {NARROW_FLOATS.get(stored_dtype(prefix + n) or "") for n, p in own if p is not None}
            if len(narrow) != 1 or None in narrow or prefix + "weight" in skip:
                continue
            dtype = narrow.pop()
            new = UpcastLinear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta",
                               dtype=dtype)
            parent_name, _, attr = mod_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            saved += sum(p.numel() for _, p in own if p is not None) * (4 - dtype.itemsize)
        elif isinstance(mod, casting):
            allowed = _CASTING_PARAMS.get(type(mod).__name__)
            for n, p in own:
                if p is None or (allowed is not None and n not in allowed) or prefix + n in skip:
                    continue
                dtype = NARROW_FLOATS.get(stored_dtype(prefix + n) or "")
                if dtype is None or p.dtype != torch.float32 or p.device.type != "meta":
                    continue
                mod._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device="meta"),
                                                  requires_grad=False)
                saved += p.numel() * (4 - dtype.itemsize)
    return saved
