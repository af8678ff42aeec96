"""Quantized-weight Linear storage: one class per family, all built through the ``operations`` namespace.

Families (facts: ../shared/docs/checkpoint_formats.md §2.2-2.6; the ``.comfy_quant`` formats:
:mod:`lens_core.quant_formats`):

* :class:`QuantLinear` — ComfyUI's ``.comfy_quant`` formats (fp8 scaled, MXFP8, NVFP4, int8 / ConvRot,
  ConvRot W4A4, W4A8): the file's tensors kept as stored (``weight``, ``weight_scale`` … under the file's own
  names), the maths from comfy-kitchen through the format registry. The Comfy-Org ``lens_*_mxfp8`` files are this
  family with ``fmt="mxfp8"`` (§2.3-2.5).
* :class:`GGUFLinear` — the GGML block bytes of a GGUF file (``Q8_0``, ``Q4_K`` …, :data:`lens_core.ggml.TYPES`)
  as a uint8 ``[out, row bytes]`` parameter, dequantized per call by :func:`lens_core.ggml.dequantize`.
* :class:`FP8Linear` — the pack's own fp8 storage of bf16/fp32 checkpoints (``fp8=True``): ``float8_e4m3fn``
  with one fp32 scale per output row (``amax / 448``). The modulation Linears (``img_mod``/``txt_mod``) and
  every norm are never converted (:func:`fp8_eligible`): quantizing modulation causes grid artifacts (§2.6).

They share :class:`QuantStorage`: ``in_features``, ``out_features``, ``bias``, :meth:`~QuantStorage.stored`
(the stored tensors on a device), :meth:`~QuantStorage.dequantized_weight` ``(dtype, device)`` (the float weight
a plain Linear would hold) and ``forward``. Nothing here knows a host: the stored tensors are fetched through
:meth:`~QuantStorage.fetch` (``cast_to``: weights left on an offload device are copied per call) and the
functions to apply to the dequantized weight / the bias per call come from :meth:`~QuantStorage.weight_patches`
/ :meth:`~QuantStorage.bias_patches`. A host subclasses these classes to take part in its own casting and
patching (nodes/: ComfyUI's ``comfy.ops`` casting, lowvram ``weight_function`` patches, LoRA). Without patches
a layer runs its format's own path (comfy-kitchen's quantized Linear: int8 W8A8, W4A4 …); with patches it
dequantizes, applies them and multiplies in the activation dtype (what ComfyUI's quantized Linear does with a
``weight_function``), so a per-call LoRA equals the hand merge of the dequantized weight.

The pack's own per-call LoRA (:func:`lens_core.lora.apply_lora` on a quantized layer) is such a patch: the
``lens_lora_deltas`` the layer carries are added to its dequantized weight.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from . import ggml
from . import quant_formats as qf
from .ops import cast_to
from .quant import tiled_scale_shape, untile_block_scales  # noqa: F401 (tiled_scale_shape re-exported)

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
MXFP8_BLOCK = 32


# --------------------------------------------------------------------------------------------------
# cuBLAS 128×4 block-scale tiling (checkpoint_formats.md §2.4), shared with the NVFP4 expert banks
# --------------------------------------------------------------------------------------------------
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




# --------------------------------------------------------------------------------------------------
# the storage classes
# --------------------------------------------------------------------------------------------------
def _frozen(shape, dtype, device):
    return nn.Parameter(torch.empty(tuple(shape), device=device, dtype=dtype), requires_grad=False)


class _StoredTensors:
    """What every quantized-storage module shares (:class:`QuantStorage`, :class:`QuantEmbedding`): the stored
    tensors named in ``stored_names``, fetched per call through :meth:`fetch` (a host's casting hook), and the
    per-call patches of the dequantized weight / the bias (host hooks, see the module docstring)."""

    #: names of the parameters that hold the quantized weight (besides ``bias``)
    stored_names: tuple = ("weight",)

    def _init_format(self, fmt: str, options, layout, rows: int, cols: int, device):
        """The ``.comfy_quant`` format, its options and one frozen parameter per stored tensor of ``layout``
        (``{suffix: (dtype, shape)}``; default: the format's required tensors for a ``[rows, cols]`` weight)."""
        self.format = qf.get(fmt)
        self.options = dict(self.format.default_options() if options is None else options)
        if layout is None:
            layout = self.format.layout_of(rows, cols, self.options, "?")
        self.stored_names = tuple(layout)
        for name, (dt, shape) in layout.items():
            setattr(self, name, _frozen(shape, dt, device))

    # -- host hooks -----------------------------------------------------------------------------------
    def fetch(self, name: str, device) -> torch.Tensor | None:
        """The stored tensor ``name`` on ``device`` (as stored: no dtype change)."""
        return cast_to(getattr(self, name), None, device)

    def weight_patches(self) -> tuple:
        """Functions ``w -> w'`` applied, in order, to the dequantized weight at each call (per-call LoRA)."""
        deltas = self.__dict__.get("lens_lora_deltas", ())
        return tuple(d.patch_weight for d in deltas)

    def bias_patches(self) -> tuple:
        return ()

    def stored(self, device=None) -> dict:
        """``{name: tensor}`` of the stored (quantized) tensors on ``device``."""
        return {n: self.fetch(n, device) for n in self.stored_names if getattr(self, n, None) is not None}


class QuantStorage(_StoredTensors, nn.Module):
    """Base of the quantized Linear families (see the module docstring)."""

    def _init_linear(self, in_features, out_features, bias, device, dtype):
        self.in_features, self.out_features = int(in_features), int(out_features)
        if bias:
            self.bias = _frozen((out_features,), dtype or torch.float32, device)
        else:
            self.register_parameter("bias", None)

    # -- interface ------------------------------------------------------------------------------------
    def dequantized_weight(self, dtype=torch.float32, device=None) -> torch.Tensor:
        raise NotImplementedError

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activations the dequantized weight multiplies (identity but for NVFP4's ``pre_quant_scale``): applied
        once in :meth:`forward`, before the quantized and the patched path alike (ComfyUI does the same)."""
        return x

    def quantized_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The family's own forward (no patches) on the :meth:`scale_input`-scaled input: by default the
        dequantized weight in the input dtype."""
        return F.linear(x, self.dequantized_weight(x.dtype, x.device), bias)

    def forward(self, x):
        x = self.scale_input(x)
        bias = self.fetch("bias", x.device) if self.bias is not None else None
        if bias is not None:
            bias = bias.to(x.dtype)
            for fn in self.bias_patches():
                bias = fn(bias)
        patches = self.weight_patches()
        if not patches:
            return self.quantized_linear(x, bias)
        w = self.dequantized_weight(x.dtype, x.device)
        for fn in patches:
            w = fn(w)
        return F.linear(x, w, bias)

    def storage_name(self) -> str:
        return type(self).__name__

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.storage_name()}"


class QuantLinear(QuantStorage):
    """A Linear stored in one of ComfyUI's ``.comfy_quant`` formats (:mod:`lens_core.quant_formats`).

    ``fmt`` names the format, ``options`` its validated options (``parse_marker``), ``layout`` the stored
    tensors ``{suffix: (dtype, shape)}`` (``QuantFormat.layout_of``; default: the format's required tensors).
    The parameters carry the file's names (``weight``, ``weight_scale``, ``weight_scale_2``, ``input_scale``,
    ``weight_s_rel`` …), so the layer's state dict is the file's."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, fmt: str,
                 options: dict | None = None, layout: dict | None = None):
        super().__init__()
        self._init_linear(in_features, out_features, bias, device, dtype)
        self._init_format(fmt, options, layout, self.out_features, self.in_features, device)

    @property
    def shape(self) -> tuple:
        return (self.out_features, self.in_features)

    def dequantized_weight(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return self.format.dequantize(self.stored(device), self.options, self.shape, dtype)

    def scale_input(self, x):
        names = [n for n in self.format.input_tensors if getattr(self, n, None) is not None]
        if not names:
            return x
        return self.format.scale_input(x, {n: self.fetch(n, x.device) for n in names})

    def quantized_linear(self, x, bias):
        return self.format.weight_linear(x, self.stored(x.device), self.options, self.shape, bias)

    def storage_name(self) -> str:
        return self.format.describe(self.options)


class GGUFLinear(QuantStorage):
    """A Linear whose weight stays in a GGML block type (``qtype``); dequantized per call on the input's device."""

    def __init__(self, in_features, out_features, qtype: str, bias=True, device=None, dtype=None):
        super().__init__()
        if qtype not in ggml.TYPES:
            raise ValueError(f"GGUF Linear: GGML type {qtype!r} is not supported; supported: {list(ggml.TYPES)}")
        self._init_linear(in_features, out_features, bias, device, dtype)
        self.qtype = qtype
        self.weight = _frozen((out_features, ggml.row_bytes(qtype, in_features)), torch.uint8, device)

    def dequantized_weight(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return ggml.dequantize(self.fetch("weight", device), self.qtype, (self.out_features, self.in_features),
                               dtype)

    def storage_name(self) -> str:
        return f"gguf {self.qtype}"


class FP8Linear(QuantStorage):
    """A Linear stored as float8_e4m3fn with a per-output-row fp32 scale; dequantized per call."""

    stored_names = ("weight", "weight_scale")

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        self._init_linear(in_features, out_features, bias, device, dtype)
        self.weight = _frozen((out_features, in_features), torch.float8_e4m3fn, device)
        self.weight_scale = _frozen((out_features,), torch.float32, device)

    def dequantized_weight(self, dtype=torch.float32, device=None) -> torch.Tensor:
        w = self.fetch("weight", device).to(torch.float32)
        return (w * self.fetch("weight_scale", device).unsqueeze(-1)).to(dtype)

    def storage_name(self) -> str:
        return "fp8_e4m3fn rowwise"


def quant_linear_for(out_f: int, in_f: int, fmt: str, options=None, bias=True, device=None, dtype=None,
                     weight: torch.Tensor | None = None) -> QuantLinear:
    """A :class:`QuantLinear` of format ``fmt``; with ``weight`` (float ``[out, in]``) filled with its quantization
    (comfy-kitchen's quantizer; used by tests and benchmarks)."""
    f = qf.get(fmt)
    options = f.default_options() if options is None else options
    if weight is None:
        return QuantLinear(in_f, out_f, bias, device, dtype, fmt=fmt, options=options)
    tensors, _ = f.quantize(weight, options)
    found = {k: (qf.st_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
    layout = f.layout_of(out_f, in_f, options, "?", found)
    lin = QuantLinear(in_f, out_f, bias, device, dtype, fmt=fmt, options=options, layout=layout)
    with torch.no_grad():
        for k, v in tensors.items():
            getattr(lin, k).copy_(qf.as_kept(v, getattr(lin, k).dtype))
    return lin


class QuantEmbedding(_StoredTensors, nn.Module):
    """An Embedding whose table is stored in a ``.comfy_quant`` format (the int8 ConvRot / fp8 token tables of
    ComfyUI text-encoder files): a lookup gathers the selected rows as stored and dequantizes only those
    (``int8_tensorwise``: comfy-kitchen's ``dequantize_embedding``, which also undoes the ConvRot rotation;
    fp8: the rows times the scalar scale), in ``dtype`` — ComfyUI's quantized Embedding."""

    FORMATS = ("int8_tensorwise", "float8_e4m3fn", "float8_e5m2")

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, device=None, dtype=None, *, fmt: str,
                 options: dict | None = None, layout: dict | None = None, **_ignored):
        super().__init__()
        if fmt not in self.FORMATS:
            raise qf.QuantFormatError(f"a quantized token embedding must be one of {list(self.FORMATS)}, found "
                                      f"{fmt!r}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.dtype = dtype or torch.float32
        self._init_format(fmt, options, layout, num_embeddings, embedding_dim, device)

    def dequantized_weight(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return self.format.dequantize(self.stored(device), self.options, (self.num_embeddings, self.embedding_dim),
                                      dtype)

    def forward(self, ids):
        patches = self.weight_patches()
        if patches:
            w = self.dequantized_weight(self.dtype, ids.device)
            for fn in patches:
                w = fn(w)
            return F.embedding(ids, w, self.padding_idx)
        stored = self.stored(ids.device)
        if self.format.name == "int8_tensorwise":
            params = self.format._params(stored, self.options, (self.num_embeddings, self.embedding_dim), self.dtype)
            return qf._kitchen(self.format.name).TensorWiseINT8Layout.dequantize_embedding(stored["weight"], params,
                                                                                         ids)
        x = F.embedding(ids, stored["weight"], self.padding_idx).to(self.dtype)
        return x * stored["weight_scale"].to(self.dtype)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.format.describe(self.options)}"
