"""The quantized-storage classes of the ComfyUI ``operations`` namespace: lens_core's storage families
(``QuantLinear`` for the ``.comfy_quant`` formats, ``GGUFLinear``, ``FP8Linear``, ``QuantEmbedding``,
``PackedExperts``) as ``comfy.ops`` cast-weight layers — the one route every quantized layer takes here.

What each subclass adds to its lens_core family (the maths stay in lens_core):

- ``comfy_cast_weights`` and per-instance ``weight_function`` / ``bias_function`` lists: the ModelPatcher may
  leave the layer on the offload device in lowvram mode (its stored tensors are copied to the input's device per
  call) and puts its lowvram LoRA patches (``LowVramPatch``) and weight wrappers there;
- those functions applied to the *dequantized* weight / the bias at each call (lens_core's ``weight_patches``
  hook): with a function the layer multiplies the patched dequantized weight in the activation dtype, as
  ComfyUI's own quantized Linear does, so a LoRA equals the hand merge on every format;
- ``convert_weight`` / ``set_weight`` (ComfyUI's protocol for weights that are not plain tensors, read by
  ``ModelPatcher.patch_weight_to_device``): a patch merged at load (any node calling ``add_patches`` on these
  keys) is computed on the dequantized weight and kept as a dense ``weight`` until ComfyUI unpatches the model
  (its backup restores the stored tensor);
- the patcher's reading of ``weight`` / ``bias`` (offload accounting): banks have none (registered as None).

The pack's own LoRA node gives quantized layers their adapters as weight wrappers
(``ModelPatcher.add_weight_wrapper``), applied per call in every load mode and memory-light (the layer stays
quantized); see :func:`per_call_patch`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.ops

from ...lens_core import quant as lens_quant
from ...lens_core import quant_linear as ql

STORAGE_NAMES = ("QuantLinear", "GGUFLinear", "FP8Linear", "QuantEmbedding", "PackedExperts")


class _CastStorage(comfy.ops.CastWeightBiasOp):
    """Mixin of the ComfyUI storage classes (see the module docstring)."""
    comfy_cast_weights = True

    def _comfy_init(self):
        self.weight_function, self.bias_function = [], []
        w = getattr(self, "weight", None)
        self._stored_weight_dtype = w.dtype if isinstance(w, torch.Tensor) else None

    def fetch(self, name, device):
        t = getattr(self, name)
        if t is None or device is None or t.device == torch.device(device):
            return t
        return mm.cast_to_device(t, device, None)

    def weight_patches(self) -> tuple:
        return tuple(self.weight_function) + super().weight_patches()

    def bias_patches(self) -> tuple:
        return tuple(self.bias_function) + super().bias_patches()

    def _merged(self):
        """The dense weight a merged patch left (``set_weight``), or None while the stored tensor is in place."""
        w = self.weight
        return w if self._stored_weight_dtype is not None and w.dtype != self._stored_weight_dtype else None

    def convert_weight(self, weight, inplace=False, **kwargs):
        """The dequantized weight (ModelPatcher merges patches onto it); ``weight`` is the stored tensor as the
        patcher copied it, used for its device and (float) dtype only. As ComfyUI's own ``convert_weight`` it is
        the format's dequantized weight: an NVFP4 ``pre_quant_scale`` stays on the input (the merged forward scales
        it, as ComfyUI's Linear does), so a merged patch equals ComfyUI's."""
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        return self.dequantized_weight(dtype, weight.device)

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        if return_weight:
            return weight
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


def _linear_forward(self, x):
    merged = self._merged()
    if merged is None:
        return ql.QuantStorage.forward(self, x)
    x = self.scale_input(x)     # ComfyUI scales the input (NVFP4 pre_quant_scale) on the merged path too
    bias = self.fetch("bias", x.device)
    w = mm.cast_to_device(merged, x.device, x.dtype)
    for fn in self.weight_function:
        w = fn(w)
    if bias is not None:
        bias = bias.to(x.dtype)
        for fn in self.bias_function:
            bias = fn(bias)
    return F.linear(x, w, bias)


def _make(name, base, extra=None):
    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        self._comfy_init()

    body = {"__init__": __init__, "__module__": __name__, "__qualname__": f"LensOps.{name}"}
    body.update(extra or {})
    return type(name, (_CastStorage, base), body)


class _BankMixin(comfy.ops.CastWeightBiasOp):
    """The packed expert bank: a cast-weight module with no single weight or bias tensor."""
    comfy_cast_weights = True


def _bank_init(self, *args, **kwargs):
    lens_quant.PackedExperts.__init__(self, *args, **kwargs)
    # what every patcher from 0.3.64 to 0.33 reads of a cast-weight module: it may stay on the offload device
    # (the bank casts its tensors to the input's device per call); ``weight`` / ``bias`` are read for offload
    # accounting: a bank has neither (None, the way a missing bias is declared); no patch can target it
    self.weight_function, self.bias_function = [], []
    self.register_parameter("weight", None)
    self.register_parameter("bias", None)


_CLASSES: dict = {}


def storage_classes() -> dict:
    """``{name: class}`` of the ComfyUI storage classes (built once)."""
    if not _CLASSES:
        _CLASSES.update(
            QuantLinear=_make("QuantLinear", ql.QuantLinear, {"forward": _linear_forward}),
            GGUFLinear=_make("GGUFLinear", ql.GGUFLinear, {"forward": _linear_forward}),
            FP8Linear=_make("FP8Linear", ql.FP8Linear, {"forward": _linear_forward}),
            QuantEmbedding=_make("QuantEmbedding", ql.QuantEmbedding),
            PackedExperts=type("PackedExperts", (_BankMixin, lens_quant.PackedExperts),
                               {"__init__": _bank_init, "__module__": __name__,
                                "__qualname__": "LensOps.PackedExperts"}),
        )
    return dict(_CLASSES)


def is_quantized_storage(module) -> bool:
    """Whether ``module`` keeps a quantized weight (a lens_core storage family): dynamic VRAM cannot stream it."""
    return isinstance(module, (ql.QuantStorage, ql.QuantEmbedding, lens_quant.PackedExperts))


class PerCallPatch:
    """A weight wrapper (``ModelPatcher.add_weight_wrapper``) applying ComfyUI weight adapters to a quantized
    layer's dequantized weight at each call: ``comfy.lora.calculate_weight`` in fp32, rounded once to the
    weight's dtype (the hand merge)."""

    def __init__(self, key: str, adapter, strength: float):
        self.key = key
        self.patches = [(float(strength), adapter, 1.0, None, None)]

    def __call__(self, weight):
        import comfy.lora
        out = comfy.lora.calculate_weight(self.patches, weight.to(torch.float32, copy=True), self.key,
                                          intermediate_dtype=torch.float32)
        return out.to(weight.dtype)


def per_call_patch(key: str, adapter, strength: float) -> PerCallPatch:
    return PerCallPatch(key, adapter, strength)
