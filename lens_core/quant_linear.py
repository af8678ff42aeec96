"""Quantised weight storage for Linear layers: MXFP8 (Comfy-Org ``lens_*_mxfp8`` files), fp8 e4m3fn and GGUF.

Facts: ../shared/docs/checkpoint_formats.md §2.2-2.6.

* **MXFP8** (§2.3, §2.5): ``weight`` is ``float8_e4m3fn [out, in]``; ``weight_scale`` holds one E8M0 exponent
  byte per 32 consecutive inputs of a row, stored in the cuBLAS "128×4" tiled order (§2.4).
  ``W[o, i] = e4m3(weight[o, i]) · 2^(e − 127)`` with ``e = S[o, i // 32]``; ``e = 0`` decodes to 0 (ComfyUI
  builds the scale by bit-casting ``e << 23``). The tiling is undone once at load; the layer keeps the fp8
  data + the logical ``[out, in/32]`` exponent matrix and **dequantizes on the fly in forward** (fp32
  multiply, then cast to the input dtype — ComfyUI's order). This keeps the ≈ 5.5 GB file size resident
  instead of 8.2 GB of bf16; ``dequantize_at_load=True`` in the loader gives plain bf16 Linears instead
  (measured in BENCHMARKS.md "Loading").
* **fp8 storage** for bf16/fp32 checkpoints (:class:`FP8Linear`): ``float8_e4m3fn`` weights with one fp32
  scale per output row (``amax / 448``), dequantized on the fly. The modulation Linears (``img_mod``/
  ``txt_mod``) and every norm are never converted (:func:`fp8_eligible`): quantizing modulation causes grid
  artifacts (checkpoint_formats.md §2.6 [WAVECUT]).

* **GGUF** (:class:`GGUFLinear`): the GGML block bytes of a GGUF file (``Q8_0``, ``Q4_K`` …, any type of
  :data:`lens_core.ggml.TYPES`) kept as a uint8 ``[out, row bytes]`` parameter and dequantized per call by
  :func:`lens_core.ggml.dequantize` on the input's device. It declares ComfyUI's ``comfy_cast_weights`` protocol
  (ModelPatcher may leave it on the offload device in lowvram mode and puts LoRA ``LowVramPatch`` functions in
  ``weight_function`` / ``bias_function``, applied here to the dequantized weight / bias).

All layer classes share one interface: ``in_features``, ``out_features``, ``bias`` and
``dequantized_weight(dtype, device)`` (the float weight a plain Linear would hold): a LoRA adds its delta to that
weight, or to the output per call (lens_core.lora). All of them cast their stored tensors to the input's
device/dtype in forward (``cast_to``), so they work with weights left on an offload device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ggml
from .ops import cast_to
from .quant import untile_block_scales

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
MXFP8_BLOCK = 32


# --------------------------------------------------------------------------------------------------
# cuBLAS 128×4 block-scale tiling (checkpoint_formats.md §2.4), shared with the NVFP4 expert banks
# --------------------------------------------------------------------------------------------------
def tiled_scale_shape(rows: int, cols: int) -> tuple[int, int]:
    """Stored shape ``[128·⌈rows/128⌉, 4·⌈cols/4⌉]`` of a tiled ``[rows, cols]`` block-scale matrix."""
    return 128 * math.ceil(rows / 128), 4 * math.ceil(cols / 4)


def untile_scales(stored: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Undo the cuBLAS tiling: stored ``[..., Rp, Cp]`` → logical ``[..., rows, cols]`` (same dtype).

    The offset formula lives in :func:`lens_core.quant.untile_block_scales` (shared with the NVFP4 banks)."""
    return untile_block_scales(stored, rows, cols)


def tile_scales(logical: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`untile_scales` (zero padding), used by the test fixtures to write real layouts."""
    rows, cols = logical.shape[-2:]
    rp, cp = tiled_scale_shape(rows, cols)
    lead = logical.shape[:-2]
    offsets = untile_block_scales(torch.arange(rp * cp).view(rp, cp), rows, cols).reshape(-1)
    out = torch.zeros(*lead, rp * cp, dtype=logical.dtype)
    out[..., offsets] = logical.reshape(*lead, rows * cols)
    return out.reshape(*lead, rp, cp)


# --------------------------------------------------------------------------------------------------
# MXFP8
# --------------------------------------------------------------------------------------------------
def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """E8M0 exponent bytes → fp32 ``2^(e−127)``, by bit-casting ``e << 23`` (so 0 → 0.0, as ComfyUI)."""
    return (e.to(torch.int32) << 23).view(torch.float32)


_FP8_TABLES: dict = {}


def _fp8_table(dtype, device) -> torch.Tensor:
    """The 256 float8_e4m3fn values in ``dtype`` (a lookup is ~1.5× faster than ``.to()`` on CPU)."""
    key = (dtype, str(device))
    if key not in _FP8_TABLES:
        _FP8_TABLES[key] = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(dtype).to(device)
    return _FP8_TABLES[key]


def dequantize_mxfp8(weight: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``weight`` e4m3fn ``[out, in]`` × un-tiled exponents ``scale`` uint8 ``[out, in/32]`` → ``dtype``.

    ComfyUI multiplies in fp32 and casts; an e4m3 value times 2^k is exact in fp32 and in bf16 (same exponent
    range), so for a bf16 result the product is formed directly in bf16 — bit-identical, half the traffic."""
    out, inp = weight.shape
    work = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
    codes = weight.view(torch.uint8).reshape(-1).int()
    w = _fp8_table(work, weight.device).index_select(0, codes).view(out, inp // MXFP8_BLOCK, MXFP8_BLOCK)
    w = w * e8m0_to_float(scale).to(work).unsqueeze(-1)
    return w.view(out, inp).to(dtype)


def quantize_mxfp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[out, in]`` → (e4m3fn data, logical E8M0 exponents ``[out, in/32]`` uint8).

    The quantizer ComfyUI uses (§2.5): ``e = ceil(log2(amax/448)) + 127`` (0 for all-zero blocks), data =
    ``clamp(x / 2^(e−127), ±448)`` cast to e4m3fn. Used by the fixtures and the benchmark.
    """
    out, inp = w.shape
    blocks = w.float().view(out, inp // MXFP8_BLOCK, MXFP8_BLOCK)
    amax = blocks.abs().amax(-1)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax.clamp_min(1e-38) / FP8_MAX)) + 127,
                    torch.zeros_like(amax)).clamp(0, 254)
    scale = e8m0_to_float(e.to(torch.uint8))
    data = torch.where(scale.unsqueeze(-1) > 0, blocks / scale.clamp_min(1e-38).unsqueeze(-1), 0.0)
    data = data.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return data.view(out, inp), e.to(torch.uint8)


class MXFP8Linear(nn.Module):
    """A Linear whose weight stays MXFP8 (fp8 data + E8M0 exponent per 32 inputs); dequantized per call."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        if in_features % MXFP8_BLOCK:
            raise ValueError(f"MXFP8 Linear: in_features must be a multiple of 32, found {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device,
                                               dtype=torch.float8_e4m3fn), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, in_features // MXFP8_BLOCK, device=device,
                                                     dtype=torch.uint8), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def dequantized_weight(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return dequantize_mxfp8(cast_to(self.weight, None, device), cast_to(self.weight_scale, None, device),
                                dtype)

    def forward(self, x):
        w = self.dequantized_weight(x.dtype, x.device)
        return F.linear(x, w, cast_to(self.bias, x.dtype, x.device))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, mxfp8"


# --------------------------------------------------------------------------------------------------
# fp8 e4m3fn storage for bf16 / fp32 checkpoints
# --------------------------------------------------------------------------------------------------
FP8_KEEP = ("img_mod", "txt_mod", "norm")  # name parts that always stay in the run dtype


def fp8_eligible(module_name: str) -> bool:
    """Whether the Linear ``module_name`` may be stored as fp8: block Linears (99.4 % of the DiT weights) except
    the modulation Linears and norms; the small global in/out/time layers stay in the run dtype too."""
    return module_name.startswith("transformer_blocks.") and not any(p in module_name for p in FP8_KEEP)


def quantize_fp8_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` → (e4m3fn data, fp32 per-row scale ``amax/448``; 1 for all-zero rows)."""
    wf = w.float()
    scale = wf.abs().amax(-1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (wf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


class FP8Linear(nn.Module):
    """A Linear stored as float8_e4m3fn with a per-output-row fp32 scale; dequantized per call."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device,
                                               dtype=torch.float8_e4m3fn), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, device=device, dtype=torch.float32),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def dequantized_weight(self, dtype=torch.float32, device=None) -> torch.Tensor:
        w = cast_to(self.weight, None, device).to(torch.float32)
        return (w * cast_to(self.weight_scale, None, device).unsqueeze(-1)).to(dtype)

    def forward(self, x):
        return F.linear(x, self.dequantized_weight(x.dtype, x.device), cast_to(self.bias, x.dtype, x.device))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3fn rowwise"


# --------------------------------------------------------------------------------------------------
# GGUF block storage
# --------------------------------------------------------------------------------------------------
class GGUFLinear(nn.Module):
    """A Linear whose weight stays in a GGML block type (``qtype``); dequantized per call on the input's device."""

    def __init__(self, in_features, out_features, qtype: str, bias=True, device=None, dtype=None):
        super().__init__()
        if qtype not in ggml.TYPES:
            raise ValueError(f"GGUF Linear: GGML type {qtype!r} is not supported; supported: {list(ggml.TYPES)}")
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.weight = nn.Parameter(torch.empty(out_features, ggml.row_bytes(qtype, in_features), device=device,
                                               dtype=torch.uint8), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        # ComfyUI ModelPatcher protocol (see the module docstring); per-instance lists
        self.comfy_cast_weights = True
        self.weight_function, self.bias_function = [], []

    def dequantized_weight(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return ggml.dequantize(cast_to(self.weight, None, device), self.qtype, (self.out_features, self.in_features),
                               dtype)

    def forward(self, x):
        w = self.dequantized_weight(x.dtype, x.device)
        for fn in self.weight_function:
            w = fn(w)
        b = cast_to(self.bias, x.dtype, x.device)
        if b is not None:
            for fn in self.bias_function:
                b = fn(b)
        return F.linear(x, w, b)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, gguf {self.qtype}"
