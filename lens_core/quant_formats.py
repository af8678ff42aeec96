"""ComfyUI's ``.comfy_quant`` weight formats: one registry, the layouts' maths from comfy-kitchen.

Facts: ComfyUI 0.33 ``comfy/quant_ops.py`` (``QUANT_ALGOS``), ``comfy/ops.py`` (``_load_quantized_module``,
``_quantized_weight_state_dict``, ``mixed_precision_ops``), ``QUANTIZATION.md``; comfy-kitchen 0.2.31
(``comfy_kitchen.tensor.*`` layouts, the version ComfyUI 0.33 pins).

A quantized Linear ``L`` of such a file is stored as ``L.weight`` (the storage dtype of its format), a few
scale tensors beside it and ``L.comfy_quant``: the UTF-8 bytes (uint8 tensor) of a small JSON object
``{"format": ..., options}``; options may also sit in a nested ``"params"`` object. Instead of the per-layer
tensors a file may list the layers in the header entry ``_quantization_metadata`` (``{"format_version": ...,
"layers": {L: {"format": ...}}}``). :func:`parse_marker` reads either form.

========================  ===========  =======================================================  ==============
format                    weight       other tensors (shapes for an ``[out, in]`` Linear)        activations
========================  ===========  =======================================================  ==============
``float8_e4m3fn``         F8_E4M3      ``weight_scale`` scalar; optional ``input_scale``         as stored dtype
``float8_e5m2``           F8_E5M2      ``weight_scale`` scalar; optional ``input_scale``         as stored dtype
``mxfp8``                 F8_E4M3 pad  ``weight_scale`` E8M0 (or U8) per 32 inputs, cuBLAS tiled  as stored dtype
``nvfp4``                 U8 pad, 2/B  ``weight_scale`` E4M3 per 16 inputs tiled, ``weight_scale_2``
                                       scalar; optional ``input_scale``, ``pre_quant_scale [in]`` as stored dtype
``int8_tensorwise``       I8           ``weight_scale`` scalar or ``[out, 1]``; ``convrot`` +     int8 per row
                                       ``convrot_groupsize`` (a power of 4) rotate the input      (W8A8)
``convrot_w4a4``          I8 ``[out,   ``weight_scale [out]``; ``convrot_groupsize``, quant group  int4 per row
                          in/2]``      64, ``linear_dtype``                                       (W4A4)
``asym_w4a8_int8``        I8 ``[out,   ``weight_s_rel [out, in/group_size]`` (E4M3 or F32),        int8 per row
                          in/2]``      ``weight_s_channel [out]``, optional ``weight_codebook [16]``
========================  ===========  =======================================================  ==============

"pad": ComfyUI pads MXFP8 to multiples of 32 and NVFP4 to multiples of 16 in both dimensions; the stored
weight may be the padded matrix (the logical ``[out, in]`` is its top-left corner).

Numerics are ComfyUI's on the CPU (``comfy.ops.mixed_precision_ops`` with ``QuantizedTensor`` weights): the
fp8 / MXFP8 / NVFP4 matmuls are "emulated" there (ComfyUI disables them without fp8/fp4 tensor cores), i.e.
the weight is dequantized in the activation dtype and multiplied; ``int8_tensorwise``, ``convrot_w4a4`` and
``asym_w4a8_int8`` quantize the activations (per row, after the ConvRot rotation) and multiply integers.
:meth:`QuantFormat.linear` runs exactly that: the ``QuantizedTensor`` of comfy-kitchen in ``F.linear``, so the
layer output is ComfyUI's bit for bit, and :meth:`QuantFormat.dequantize` is ``QuantizedTensor.dequantize``.

comfy-kitchen (``pip install comfy-kitchen``; ComfyUI >= 0.27 installs it) is therefore needed to load these
formats. Without it, ``mxfp8`` (the format of the Comfy-Org ``lens_*_mxfp8`` files, which the pack read before
comfy-kitchen existed) falls back to the pack's own torch code (:mod:`lens_core.quant_linear`, bit-identical to
comfy-kitchen's; tests/test_quant_formats.py), and every other format raises :class:`QuantFormatError` naming
``pip install comfy-kitchen``.

Interface used by the loaders, the converter and the tests:

* :data:`FORMATS` ``{name: QuantFormat}``; :func:`get` (unknown name → error naming the known ones).
* :func:`parse_marker` (bytes / dict → ``(QuantFormat, options)``, validated; errors name the layer);
  :func:`decode_marker` (bytes → dict, size and JSON checked).
* ``fmt.tensor_specs(out, in, options)`` → ``{suffix: TensorSpec}`` (``"weight"``, ``"weight_scale"`` …: the
  stored tensors with accepted dtypes and exact shapes, checked before a byte is read);
  ``fmt.check_values(tensors, layer)`` (NaN / inf scales).
* ``fmt.dequantize(tensors, options, shape, dtype)``, ``fmt.linear(x, tensors, options, shape, bias)`` (=
  ``fmt.weight_linear(fmt.scale_input(x, tensors), ...)``: a layer scales its input once, then takes the quantized
  or the patched path), ``fmt.dense_weight`` (the equivalent plain Linear's weight, for dequantize-at-load).
* ``fmt.quantize(weight, options)`` → ``(tensors, marker)``: what ComfyUI writes for a float weight
  (comfy-kitchen's quantizers); :func:`marker_tensor` turns the marker into the ``.comfy_quant`` bytes.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import torch
import torch.nn.functional as F

from .quant import ceil_to, tiled_scale_shape

KITCHEN_VERSION = "0.2.31"     # the version ComfyUI 0.33 pins (requirements-dev.txt pins the same)
KITCHEN_FIX = f"pip install comfy-kitchen=={KITCHEN_VERSION} (ComfyUI 0.27 and newer install it)"
MAX_MARKER_BYTES = 4096        # a real marker is ~60 bytes; anything this large is not a marker
MAX_CONVROT_GROUP = 4 ** 7     # 16384: ComfyUI / comfy-kitchen build the Hadamard matrix in memory


class QuantFormatError(ValueError):
    """A quantized layer whose marker, tensors or scales do not form a valid layer of its format (the message
    names the layer); or comfy-kitchen missing. Loaders re-raise it with the file name."""


@functools.cache
def _kitchen_tensor():
    """``comfy_kitchen.tensor`` (ComfyUI's kernel library, optional for the pack: see the module docstring), or
    None where it is not installed. Imported on first use, not when this module is imported."""
    try:
        from comfy_kitchen import tensor
    except ImportError:
        return None
    return tensor


def kitchen_available() -> bool:
    return _kitchen_tensor() is not None


def kitchen(what: str, alternative: str = ""):
    """``comfy_kitchen.tensor``, or QuantFormatError: ``what`` needs comfy-kitchen, the install command (and
    ``alternative``)."""
    ckt = _kitchen_tensor()
    if ckt is None:
        raise QuantFormatError(f"{what} needs comfy-kitchen (ComfyUI's kernel library), which is not installed in "
                               f"this Python. Fix: {KITCHEN_FIX}{alternative}")
    return ckt


def _kitchen(fmt: str):
    return kitchen(f"the ComfyUI quantized format {fmt!r}", ", or use a bf16 / GGUF / mxfp8 file")


# ---------------------------------------------------------------------------------------------------------
# stored tensors

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One stored tensor of a quantized layer: the safetensors dtypes a file may use for it, the torch dtype it
    is kept in (a bit view of the stored bytes), its exact shape (or alternatives), whether it is required and
    whether it is a scale (scales are checked for NaN / inf)."""
    dtypes: tuple
    torch_dtype: torch.dtype
    shapes: tuple              # tuple of accepted shapes (each a tuple)
    required: bool = True
    scale: bool = True

    def describe(self) -> str:
        shapes = " or ".join(str(list(s)) for s in self.shapes)
        return f"{'/'.join(self.dtypes)} {shapes}"


_FLOATS = ("F32", "BF16", "F16")
# safetensors dtype names of the stored tensors → the torch dtype kept (a bit view of 1-byte data; floats cast)
ST_TORCH = {"F32": torch.float32, "BF16": torch.float32, "F16": torch.float32, "F8_E4M3": torch.float8_e4m3fn,
            "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.uint8, "U8": torch.uint8, "I8": torch.int8}


def st_name(dtype: torch.dtype) -> str:
    """The safetensors dtype name of a torch dtype (:data:`lens_core.checkpoints.weightfile.ST_NAMES`)."""
    from .checkpoints.weightfile import ST_NAMES     # on use: the checkpoints package imports this module
    return ST_NAMES[dtype]


def as_kept(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored tensor in the dtype its layer keeps it in: 1-byte data re-viewed (the bytes are the values),
    float scales cast (exact: bf16/f16 → f32)."""
    if t.dtype == dtype:
        return t
    if t.element_size() == 1 and torch.empty((), dtype=dtype).element_size() == 1:
        return t.view(dtype)
    return t.to(dtype)


_SCALAR = ((), (1,))


def _is_pow4(n: int) -> bool:
    return n >= 4 and n & (n - 1) == 0 and (n.bit_length() - 1) % 2 == 0


# ---------------------------------------------------------------------------------------------------------
# formats

class QuantFormat:
    """One ``.comfy_quant`` format. Subclasses define the stored tensors, options and comfy-kitchen layout."""

    name = ""
    layout = ""                  # comfy_kitchen.tensor layout class name
    activation = "float"         # what ComfyUI does with activations on the CPU: "float", "int8" or "int4"
    bits = 8                     # bits per weight (for descriptions)

    def require_kitchen(self):
        """QuantFormatError (naming ``pip install comfy-kitchen``) when this format cannot run here."""
        _kitchen(self.name)

    # -- options ---------------------------------------------------------------------------------------
    def options(self, marker: dict, layer: str, in_features: int | None = None) -> dict:
        """Validated options of this format from a marker dict (top-level keys win over ``params``)."""
        return {}

    @staticmethod
    def _opt(marker: dict, key: str, default):
        params = marker.get("params")
        params = params if isinstance(params, dict) else {}
        return marker.get(key, params.get(key, default))

    @staticmethod
    def _int_opt(marker, key, default, layer, lo, hi):
        v = QuantFormat._opt(marker, key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise QuantFormatError(f"layer {layer!r}: comfy_quant option {key!r} must be an integer in [{lo}, "
                                   f"{hi}], found {v!r:.60}")
        return v

    def _convrot_groupsize(self, marker, layer, in_features):
        g = self._int_opt(marker, "convrot_groupsize", 256, layer, 4, MAX_CONVROT_GROUP)
        if not _is_pow4(g):
            raise QuantFormatError(f"layer {layer!r}: convrot_groupsize must be a power of 4 (4, 16, 64, 256, ...), "
                                   f"found {g}")
        if in_features is not None and in_features % g:
            raise QuantFormatError(f"layer {layer!r}: convrot_groupsize {g} does not divide the layer's "
                                   f"{in_features} input features; the file is corrupt or not for this model")
        return g

    # -- tensors ---------------------------------------------------------------------------------------
    def tensor_specs(self, out_f: int, in_f: int, options: dict) -> dict:
        raise NotImplementedError

    def check_shape(self, out_f: int, in_f: int, options: dict, layer: str):
        """Raise QuantFormatError when an ``[out_f, in_f]`` Linear cannot be stored in this format."""

    def supports(self, out_f: int, in_f: int, options: dict) -> bool:
        """Whether an ``[out_f, in_f]`` Linear can be stored in this format with ``options`` (group sizes
        dividing the inputs …): what a converter checks to keep a layer in bf16 instead."""
        try:
            self.options(self.marker(options), "?", in_f)
            self.check_shape(out_f, in_f, options, "?")
        except QuantFormatError:
            return False
        return True

    def layout_of(self, out_f: int, in_f: int, options: dict, layer: str, found: dict | None = None) -> dict:
        """``{suffix: (torch dtype, shape)}`` of the parameters an ``[out_f, in_f]`` layer keeps.

        ``found`` (``{suffix: (safetensors dtype name, shape)}`` of the tensors a file holds for the layer) is
        checked against :meth:`tensor_specs` before any byte is read: every required tensor present, no unknown
        one, each with an accepted dtype and exactly an accepted shape; the layout then follows the file (a
        padded weight, an optional input_scale …). Without ``found``: the required tensors, first choices."""
        self.check_shape(out_f, in_f, options, layer)
        specs = self.tensor_specs(out_f, in_f, options)
        if found is None:
            return {k: (s.torch_dtype or ST_TORCH[s.dtypes[0]], s.shapes[0]) for k, s in specs.items() if s.required}
        unknown = sorted(set(found) - set(specs))
        if unknown:
            raise QuantFormatError(f"layer {layer!r}: {self.name} layers have no tensor(s) {unknown}; expected "
                                   f"{sorted(specs)}")
        out = {}
        for suffix, spec in specs.items():
            if suffix not in found:
                if spec.required:
                    raise QuantFormatError(f"layer {layer!r}: marked {self.name} but its {suffix} tensor is "
                                           f"missing (expected {spec.describe()}); the file is incomplete")
                continue
            st, shape = found[suffix]
            shape = tuple(shape)
            if st not in spec.dtypes or shape not in spec.shapes:
                raise QuantFormatError(f"layer {layer!r}: {suffix} is {st} {list(shape)}, a {self.name} layer of "
                                       f"shape [{out_f}, {in_f}] needs {spec.describe()}; the scales do not fit "
                                       f"the weight (corrupt file, or a file for another model)")
            out[suffix] = (spec.torch_dtype or ST_TORCH[st], shape)
        return out

    def check_values(self, tensors: dict, layer: str):
        """NaN / inf in any scale (read from the file) → QuantFormatError naming the layer and tensor."""
        for suffix, t in tensors.items():
            if suffix == "weight" or t is None or t.numel() == 0:
                continue
            if t.dtype == getattr(torch, "float8_e8m0fnu", None):
                bad = t.view(torch.uint8) == 255
            elif t.dtype == torch.uint8:     # E8M0 bytes kept as uint8 (other byte formats view theirs first)
                bad = t == 255
            elif t.dtype.is_floating_point:
                bad = ~torch.isfinite(t.float())
            else:
                continue
            if bool(bad.any()):
                raise QuantFormatError(f"layer {layer!r}: its {suffix} holds {int(bad.sum())} NaN/inf value(s); "
                                       f"the file is corrupt. Fix: download it again (or convert the source "
                                       f"again)")

    # -- maths (comfy-kitchen) ------------------------------------------------------------------------------
    def _params(self, tensors: dict, options: dict, shape: tuple, dtype):
        raise NotImplementedError

    def quantized_tensor(self, tensors: dict, options: dict, shape: tuple, dtype):
        """comfy-kitchen's ``QuantizedTensor`` of this layer (logical ``shape``, dequantizing to ``dtype``)."""
        ckt = _kitchen(self.name)
        return ckt.QuantizedTensor(tensors["weight"], self.layout, self._params(tensors, options, tuple(shape),
                                                                                dtype))

    def dequantize(self, tensors: dict, options: dict, shape: tuple, dtype=torch.float32) -> torch.Tensor:
        """The float ``[out, in]`` weight in ``dtype``: comfy-kitchen's ``QuantizedTensor.dequantize()``."""
        return self.quantized_tensor(tensors, options, shape, dtype).dequantize()

    def dense_weight(self, tensors: dict, options: dict, shape: tuple, dtype=torch.float32) -> torch.Tensor:
        """The ``[out, in]`` weight of the plain Linear equivalent to the whole layer: :meth:`dequantize`, with the
        input scaling of :meth:`scale_input` folded in (NVFP4: ``W * pre_quant_scale[None, :]``, formed in fp32)."""
        return self.dequantize(tensors, options, shape, dtype)

    def scale_input(self, x: torch.Tensor, tensors: dict) -> torch.Tensor:
        """The activations the (dequantized) weight multiplies: ``x`` itself; NVFP4 with a ``pre_quant_scale``:
        ``x * pre_quant_scale`` (ModelOpt AWQ smoothing). ComfyUI scales the input before every path of its
        Linear (quantized, with weight functions, merged), so a layer applies this once, before choosing a path.
        Only the tensors named in :attr:`input_tensors` are read."""
        return x

    #: stored tensors :meth:`scale_input` reads (a layer fetches only these for it)
    input_tensors: tuple = ()

    def linear(self, x: torch.Tensor, tensors: dict, options: dict, shape: tuple, bias=None) -> torch.Tensor:
        """``x @ W.T + bias`` as ComfyUI's quantized Linear computes it on the CPU (see the module docstring):
        :meth:`scale_input`, then :meth:`weight_linear`."""
        return self.weight_linear(self.scale_input(x, tensors), tensors, options, shape, bias)

    def weight_linear(self, x: torch.Tensor, tensors: dict, options: dict, shape: tuple, bias=None) -> torch.Tensor:
        """The layer's product on an input :meth:`scale_input` already scaled."""
        if bias is not None:
            bias = bias.to(x.dtype)
        if self.activation == "float":
            return F.linear(x, self.dequantize(tensors, options, shape, x.dtype), bias)
        return F.linear(x, self.quantized_tensor(tensors, options, shape, x.dtype), bias)

    # -- writing ---------------------------------------------------------------------------------------
    def marker(self, options: dict) -> dict:
        """The ``comfy_quant`` dict ComfyUI writes for this format and options."""
        return {"format": self.name}

    def quantize(self, weight: torch.Tensor, options: dict | None = None) -> tuple[dict, dict]:
        """(stored tensors by suffix, marker) of a float ``[out, in]`` weight, with comfy-kitchen's quantizer
        (the suffixes are the file's: ``weight``, ``weight_scale`` …)."""
        options = dict(self.default_options() if options is None else options)
        qt = self._quantize(weight, options)
        return {k: v.contiguous() for k, v in qt.state_dict("weight").items()}, self.marker(options)

    def default_options(self) -> dict:
        return {}

    def _from_float(self, ckt, weight, **kwargs):
        """comfy-kitchen's own quantizer of this layout (its class, not the name registry: inside ComfyUI the
        names map to ComfyUI's subclasses, whose quantize takes other options; dequantize is the same)."""
        qdata, params = getattr(ckt, self.layout).quantize(weight, **kwargs)
        return ckt.QuantizedTensor(qdata, self.layout, params)

    def _quantize(self, weight, options):
        ckt = _kitchen(self.name)
        return self._from_float(ckt, weight)

    def describe(self, options: dict) -> str:
        return self.name


class _Float8(QuantFormat):
    layout = "TensorCoreFP8Layout"

    def __init__(self, name, st, dtype):
        self.name, self.st, self.storage = name, st, dtype

    def tensor_specs(self, out_f, in_f, options):
        return {"weight": TensorSpec((self.st,), self.storage, ((out_f, in_f),), scale=False),
                "weight_scale": TensorSpec(_FLOATS, torch.float32, _SCALAR),
                "input_scale": TensorSpec(_FLOATS, torch.float32, _SCALAR, required=False)}

    def _params(self, tensors, options, shape, dtype):
        return _kitchen(self.name).TensorCoreFP8Layout.Params(
            scale=tensors["weight_scale"].float().reshape(()), orig_dtype=dtype, orig_shape=shape)

    def _quantize(self, weight, options):
        ckt = _kitchen(self.name)
        return self._from_float(ckt, weight, dtype=self.storage)


class _MXFP8(QuantFormat):
    name, layout = "mxfp8", "TensorCoreMXFP8Layout"

    def require_kitchen(self):
        pass    # the pack's own torch MXFP8 code runs without comfy-kitchen

    def tensor_specs(self, out_f, in_f, options):
        rows, cols = ceil_to(out_f, 32), ceil_to(in_f, 32)
        weight_shapes = ((out_f, in_f),) if (rows, cols) == (out_f, in_f) else ((out_f, in_f), (rows, cols))
        scale_shapes = tuple(dict.fromkeys(tiled_scale_shape(r, c // 32) for r, c in weight_shapes if c % 32 == 0))
        return {"weight": TensorSpec(("F8_E4M3",), torch.float8_e4m3fn, weight_shapes, scale=False),
                "weight_scale": TensorSpec(("F8_E8M0", "U8"), torch.uint8, scale_shapes),
                "input_scale": TensorSpec(_FLOATS, torch.float32, _SCALAR, required=False)}

    def check_shape(self, out_f, in_f, options, layer):
        pass    # ComfyUI pads to multiples of 32

    def _params(self, tensors, options, shape, dtype):
        scale = tensors["weight_scale"]
        return _kitchen(self.name).TensorCoreMXFP8Layout.Params(
            scale=scale.view(torch.float8_e8m0fnu), orig_dtype=dtype, orig_shape=shape)

    def dequantize(self, tensors, options, shape, dtype=torch.float32):
        if not kitchen_available():     # the pack's own torch MXFP8 code (bit-identical; tests/test_quant_formats.py)
            from . import quant_linear as ql
            w = tensors["weight"]
            scales = ql.untile_scales(tensors["weight_scale"].view(torch.uint8), w.shape[0], w.shape[1] // 32)
            return ql.dequantize_mxfp8(w, scales, dtype)[: shape[0], : shape[1]]
        return super().dequantize(tensors, options, shape, dtype)


class _NVFP4(QuantFormat):
    name, layout, bits = "nvfp4", "TensorCoreNVFP4Layout", 4

    def tensor_specs(self, out_f, in_f, options):
        rows, cols = ceil_to(out_f, 16), ceil_to(in_f, 16)
        return {"weight": TensorSpec(("U8", "I8"), torch.uint8, ((rows, cols // 2),), scale=False),
                "weight_scale": TensorSpec(("F8_E4M3", "U8"), torch.float8_e4m3fn,
                                           (tiled_scale_shape(rows, cols // 16),)),
                "weight_scale_2": TensorSpec(_FLOATS, torch.float32, _SCALAR),
                "input_scale": TensorSpec(_FLOATS, torch.float32, _SCALAR, required=False),
                "pre_quant_scale": TensorSpec(_FLOATS, torch.float32, ((in_f,),), required=False)}

    def _params(self, tensors, options, shape, dtype):
        return _kitchen(self.name).TensorCoreNVFP4Layout.Params(
            scale=tensors["weight_scale_2"].float().reshape(()), orig_dtype=dtype, orig_shape=shape,
            block_scale=tensors["weight_scale"].view(torch.float8_e4m3fn))

    input_tensors = ("pre_quant_scale",)

    def scale_input(self, x, tensors):
        pre = tensors.get("pre_quant_scale")
        if pre is None:
            return x
        return x * pre.to(x.dtype)      # ModelOpt AWQ smoothing: ComfyUI 0.33 ops.py mixed_precision_ops.forward

    def dense_weight(self, tensors, options, shape, dtype=torch.float32):
        pre = tensors.get("pre_quant_scale")
        if pre is None:
            return self.dequantize(tensors, options, shape, dtype)
        w = self.dequantize(tensors, options, shape, torch.float32)
        return (w * pre.float()[None, :]).to(dtype)


class _Int8(QuantFormat):
    name, layout, activation = "int8_tensorwise", "TensorWiseINT8Layout", "int8"

    def options(self, marker, layer, in_features=None):
        convrot = self._opt(marker, "convrot", False)
        if not isinstance(convrot, bool):
            raise QuantFormatError(f"layer {layer!r}: comfy_quant option 'convrot' must be true or false, found "
                                   f"{convrot!r:.60}")
        if not convrot:
            return {"convrot": False}
        return {"convrot": True, "convrot_groupsize": self._convrot_groupsize(marker, layer, in_features)}

    def tensor_specs(self, out_f, in_f, options):
        return {"weight": TensorSpec(("I8", "U8"), torch.int8, ((out_f, in_f),), scale=False),
                "weight_scale": TensorSpec(_FLOATS, torch.float32, _SCALAR + ((out_f, 1),))}

    def _params(self, tensors, options, shape, dtype):
        return _kitchen(self.name).TensorWiseINT8Layout.Params(
            scale=tensors["weight_scale"].float(), orig_dtype=dtype, orig_shape=shape,
            convrot=options.get("convrot", False), convrot_groupsize=options.get("convrot_groupsize", 256))

    def weight_linear(self, x, tensors, options, shape, bias=None):
        if x.device.type != "cpu" or not kitchen_available():
            return super().weight_linear(x, tensors, options, shape, bias)
        from .quant_kernels import int8_linear      # comfy-kitchen's int8_linear, bit for bit, fused
        return int8_linear(x, tensors["weight"], tensors["weight_scale"], bias,
                           options.get("convrot_groupsize", 256) if options.get("convrot") else 0)

    def marker(self, options):
        m = {"format": self.name}
        if options.get("convrot"):
            m.update(convrot=True, convrot_groupsize=options["convrot_groupsize"])
        return m

    def default_options(self):
        return {"convrot": True, "convrot_groupsize": 256}

    def _quantize(self, weight, options):
        ckt = _kitchen(self.name)
        if options.get("convrot"):
            return self._from_float(ckt, weight, per_channel=True, convrot=True,
                                                  convrot_groupsize=options["convrot_groupsize"])
        return self._from_float(ckt, weight, per_channel=True)

    def describe(self, options):
        return f"int8 ConvRot g{options['convrot_groupsize']}" if options.get("convrot") else "int8"


class _W4A4(QuantFormat):
    name, layout, activation, bits = "convrot_w4a4", "TensorCoreConvRotW4A4Layout", "int4", 4
    QUANT_GROUP = 64

    def options(self, marker, layer, in_features=None):
        lin = self._opt(marker, "linear_dtype", "int4")
        if lin not in ("int4", "int8"):
            raise QuantFormatError(f"layer {layer!r}: comfy_quant option 'linear_dtype' must be 'int4' or 'int8', "
                                   f"found {lin!r:.60}")
        return {"convrot_groupsize": self._convrot_groupsize(marker, layer, in_features), "linear_dtype": lin}

    def check_shape(self, out_f, in_f, options, layer):
        if in_f % self.QUANT_GROUP:
            raise QuantFormatError(f"layer {layer!r}: convrot_w4a4 needs input features divisible by "
                                   f"{self.QUANT_GROUP}, the layer has {in_f}")

    def tensor_specs(self, out_f, in_f, options):
        return {"weight": TensorSpec(("I8", "U8"), torch.int8, ((out_f, in_f // 2),), scale=False),
                "weight_scale": TensorSpec(_FLOATS, torch.float32, ((out_f,),))}

    def _params(self, tensors, options, shape, dtype):
        return _kitchen(self.name).TensorCoreConvRotW4A4Layout.Params(
            scale=tensors["weight_scale"].float(), orig_dtype=dtype, orig_shape=shape,
            convrot_groupsize=options["convrot_groupsize"], quant_group_size=self.QUANT_GROUP,
            linear_dtype=options.get("linear_dtype", "int4"))

    def marker(self, options):
        m = {"format": self.name, "convrot_groupsize": options["convrot_groupsize"]}
        if options.get("linear_dtype", "int4") != "int4":
            m["linear_dtype"] = options["linear_dtype"]
        return m

    def default_options(self):
        return {"convrot_groupsize": 256, "linear_dtype": "int4"}

    def _quantize(self, weight, options):
        ckt = _kitchen(self.name)
        return self._from_float(ckt, weight, convrot_groupsize=options["convrot_groupsize"],
                                              linear_dtype=options.get("linear_dtype", "int4"))

    def describe(self, options):
        return f"int4 ConvRot W4A4 g{options['convrot_groupsize']}"


class _W4A8(QuantFormat):
    name, layout, activation, bits = "asym_w4a8_int8", "AsymW4A8Int8Layout", "int8", 4

    def options(self, marker, layer, in_features=None):
        gs = self._int_opt(marker, "group_size", 16, layer, 4, 1 << 16)
        if 16 % gs and gs % 16:
            raise QuantFormatError(f"layer {layer!r}: asym_w4a8_int8 group_size must divide 16 or be a multiple of "
                                   f"16, found {gs}")
        if in_features is not None and (in_features % gs or in_features % 16):
            raise QuantFormatError(f"layer {layer!r}: group_size {gs} does not divide the layer's {in_features} "
                                   f"input features (which must also be a multiple of 16)")
        return {"group_size": gs, "convrot_groupsize": self._convrot_groupsize(marker, layer, in_features)}

    def tensor_specs(self, out_f, in_f, options):
        groups = in_f // options["group_size"]
        return {"weight": TensorSpec(("I8", "U8"), torch.int8, ((out_f, in_f // 2),), scale=False),
                "weight_s_rel": TensorSpec(("F8_E4M3", "U8", "F32"), None, ((out_f, groups),)),
                "weight_s_channel": TensorSpec(_FLOATS, torch.float32, ((out_f,),)),
                "weight_codebook": TensorSpec(_FLOATS, torch.float32, ((16,),), required=False)}

    def check_values(self, tensors, layer):
        s_rel = tensors.get("weight_s_rel")
        if s_rel is not None and s_rel.dtype == torch.uint8:    # E4M3 bytes stored as U8 (0x7F / 0xFF are NaN)
            tensors = dict(tensors, weight_s_rel=s_rel.view(torch.float8_e4m3fn))
        super().check_values(tensors, layer)

    def _params(self, tensors, options, shape, dtype):
        s_rel = tensors["weight_s_rel"]
        if s_rel.dtype == torch.uint8:
            s_rel = s_rel.view(torch.float8_e4m3fn)
        cb = tensors.get("weight_codebook")
        return _kitchen(self.name).AsymW4A8Int8Layout.Params(
            scale=s_rel, orig_dtype=dtype, orig_shape=shape, s_channel=tensors["weight_s_channel"].float(),
            codebook=None if cb is None else cb.float(), group_size=options["group_size"],
            convrot_groupsize=options["convrot_groupsize"])

    def weight_linear(self, x, tensors, options, shape, bias=None):
        if x.device.type != "cpu" or not kitchen_available():
            return super().weight_linear(x, tensors, options, shape, bias)
        # comfy-kitchen's eager w4a8_int8_linear: the int4 codes decoded to its int8 grid, then its int8_linear
        # with the channel scales and the rotation (lens_core.quant_kernels: the same arithmetic, fused)
        from comfy_kitchen.backends.eager.w4a8_int8 import _dequant_int4_grouped_to_int8

        from .quant_kernels import int8_linear
        params = self._params(tensors, options, shape, x.dtype)
        grid = _dequant_int4_grouped_to_int8(tensors["weight"], params.scale, params.codebook, params.group_size)
        return int8_linear(x, grid, params.s_channel, bias, params.convrot_groupsize)

    def marker(self, options):
        return {"format": self.name, "group_size": options["group_size"],
                "convrot_groupsize": options["convrot_groupsize"]}

    def default_options(self):
        return {"group_size": 16, "convrot_groupsize": 256}

    def _quantize(self, weight, options):
        ckt = _kitchen(self.name)
        return self._from_float(ckt, weight, group_size=options["group_size"],
                                              convrot_groupsize=options["convrot_groupsize"])

    def describe(self, options):
        return f"int4 W4A8 g{options['group_size']}"


FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    _Float8("float8_e4m3fn", "F8_E4M3", torch.float8_e4m3fn), _Float8("float8_e5m2", "F8_E5M2", torch.float8_e5m2),
    _MXFP8(), _NVFP4(), _Int8(), _W4A4(), _W4A8())}


def get(name, layer: str = "?") -> QuantFormat:
    if not isinstance(name, str) or name not in FORMATS:
        raise QuantFormatError(f"layer {layer!r}: unknown quantization marker format {name!r:.80} (comfy_quant); "
                               f"known formats: {list(FORMATS)}. Fix: use a file in one of these formats, or "
                               f"update lens-nodes if ComfyUI added this one")
    return FORMATS[name]


def decode_marker(raw, layer: str) -> dict:
    """The marker dict of one layer: ``raw`` is the ``comfy_quant`` bytes (bytes or a uint8 tensor; small UTF-8
    JSON) or an already decoded dict (header ``_quantization_metadata`` form). Its contents are checked by
    :func:`parse_marker`."""
    if isinstance(raw, torch.Tensor):
        if raw.dtype not in (torch.uint8, torch.int8) or raw.dim() != 1:
            raise QuantFormatError(f"layer {layer!r}: comfy_quant must be a 1-D uint8 tensor, found {raw.dtype} "
                                   f"{list(raw.shape)}")
        raw = raw.view(torch.uint8).numpy().tobytes()
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > MAX_MARKER_BYTES:
            raise QuantFormatError(f"layer {layer!r}: comfy_quant is {len(raw)} bytes, expected a small JSON object "
                                   f"(at most {MAX_MARKER_BYTES} bytes); the file is corrupt or crafted")
        try:
            raw = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise QuantFormatError(f"layer {layer!r}: comfy_quant is not UTF-8 JSON (found {bytes(raw)[:40]!r}); the "
                                   f"file is corrupt") from None
    if not isinstance(raw, dict):
        raise QuantFormatError(f"layer {layer!r}: comfy_quant must be a JSON object with a 'format', found "
                               f"{type(raw).__name__}")
    return raw


def parse_marker(raw, layer: str, in_features: int | None = None) -> tuple[QuantFormat, dict]:
    """(format, validated options) of one layer's marker (``raw``: as :func:`decode_marker` takes it)."""
    raw = decode_marker(raw, layer)
    fmt = get(raw.get("format"), layer)
    return fmt, fmt.options(raw, layer, in_features)


def marker_tensor(marker: dict) -> torch.Tensor:
    """The ``.comfy_quant`` uint8 tensor of a marker dict (UTF-8 JSON, as ComfyUI writes it)."""
    return torch.tensor(list(json.dumps(marker).encode("utf-8")), dtype=torch.uint8)
