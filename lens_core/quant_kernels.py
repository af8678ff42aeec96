"""CPU kernel for ComfyUI's ``int8_tensorwise`` layers (W8A8, INT8 ConvRot): comfy-kitchen's eager
``int8_linear`` arithmetic, bit for bit, with its elementwise work fused.

What ComfyUI computes for such a layer on the CPU (comfy-kitchen 0.2.31 eager backend), in this order:
ConvRot rotation of the input (a matmul per group of ``g`` inputs with the normalized regular Hadamard matrix,
in the activation dtype); per-row absmax scale ``max(|x|)/127`` (fp32, at least 1e-30); ``round(x / scale)``
clamped to [-128, 127] as int8 (the division in the activation dtype); ``x8 @ W8ᵀ`` in int32 (``torch._int_mm``:
oneDNN, AMX-INT8 / AVX512-VNNI where the CPU has them); ``float(acc) · (row scale · weight scale)`` rounded to
the activation dtype; ``+ bias``.

:func:`int8_linear` runs the same operations. The row quantization and the int32 → float scaling are each one
pass when ``torch.compile`` works here (inductor's C++ code, compiled once per activation dtype with dynamic
shapes, ``emulate_precision_casts`` so bf16 intermediates round as in eager); the first call of each dtype is
checked bit for bit against the eager code, and any failure (no C++ compiler, a compile error, a different bit)
switches the compiled part off for the process with one warning. ``LENS_COMPILED_KERNELS=0`` (shared with
:mod:`lens_core.quant`) keeps everything eager. tests/test_quant_formats.py checks the layer output against
comfy-kitchen's ``F.linear(x, QuantizedTensor)`` and tests/test_comfyui_quant.py against ComfyUI's own Linear.
"""
from __future__ import annotations

import os
import warnings

import torch


def _quantize_rows(x2: torch.Tensor):
    """``[M, K]`` activations → (int8 ``[M, K]``, fp32 row scales ``[M, 1]``), comfy-kitchen's rounding."""
    scale = (x2.abs().amax(dim=-1, keepdim=True).float() / 127.0).clamp(min=1e-30)
    div = scale.to(x2.dtype)
    div = torch.where(div == 0, torch.full_like(div, torch.finfo(x2.dtype).tiny), div)
    return torch.div(x2, div).round().clamp(-128.0, 127.0).to(torch.int8), scale


def _scale_rows(acc: torch.Tensor, scale: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype):
    """int32 ``[M, N]`` → ``dtype``: ``float(acc) · (row scale · column scale)``."""
    return (acc.to(torch.float32) * (scale * weight_scale)).to(dtype)


class _Fused:
    """The compiled forms of :func:`_quantize_rows` / :func:`_scale_rows` (see the module docstring)."""

    def __init__(self):
        self.enabled = None          # None: decided on first use from LENS_COMPILED_KERNELS
        self.fns = {}
        self.checked = set()

    def usable(self, x) -> bool:
        if self.enabled is None:
            self.enabled = os.environ.get("LENS_COMPILED_KERNELS", "").strip() not in ("0", "false", "no", "off")
        return bool(self.enabled) and x.device.type == "cpu" and not torch.compiler.is_compiling()

    def disable(self, why: str):
        self.enabled = False
        warnings.warn(f"lens_core: the compiled int8 (W8A8) kernel is off for this process ({why}); int8 layers use "
                      f"the eager code (same numbers, slower). Set LENS_COMPILED_KERNELS=0 to skip the attempt, or "
                      f"install a C++ compiler (torch.compile's inductor needs one).", stacklevel=4)

    def fn(self, name, eager):
        if name not in self.fns:
            self.fns[name] = torch.compile(eager, dynamic=True, options={"emulate_precision_casts": True})
        return self.fns[name]

    def run(self, name, eager, args, key):
        """``eager(*args)`` through its compiled form; checked bit for bit on the first call of ``key``."""
        try:
            got = self.fn(name, eager)(*args)
        except Exception as e:  # noqa: BLE001 — any compiler/toolchain failure means "use the eager code"
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.disable(f"{type(e).__name__}: {first}")
            return eager(*args)
        if key not in self.checked:
            ref = eager(*args)
            same = all(torch.equal(a, b) for a, b in zip(got if isinstance(got, tuple) else (got,),
                                                         ref if isinstance(ref, tuple) else (ref,)))
            if not same:
                self.disable(f"its {name} differs from the eager result for {key}")
                return ref
            self.checked.add(key)
        return got


_FUSED = _Fused()


def set_compiled_kernels(enabled: bool):
    """Turn the compiled W8A8 parts on or off for this process."""
    _FUSED.enabled = bool(enabled)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias=None,
                convrot_groupsize: int = 0) -> torch.Tensor:
    """``x @ W.T + bias`` for an int8 ``weight [N, K]`` with fp32 ``weight_scale`` (scalar or per row), W8A8 as
    ComfyUI computes it on the CPU (module docstring); ``convrot_groupsize`` > 0 rotates the input first."""
    from comfy_kitchen.backends.eager.quantization import _int8_matmul_accumulate
    from comfy_kitchen.tensor.int8_utils import _build_hadamard, _rotate_activation

    if convrot_groupsize:
        x = _rotate_activation(x, _build_hadamard(convrot_groupsize, device=x.device, dtype=x.dtype),
                               convrot_groupsize)
    x2 = x.reshape(-1, x.shape[-1])
    ws = weight_scale.to(torch.float32).reshape(1, -1)
    fused = _FUSED.usable(x2) and x2.shape[0] > 0
    key = (x2.dtype, ws.shape[1] == 1)
    if fused:
        q, scale = _FUSED.run("row quantization", _quantize_rows, (x2,), key)
    else:
        q, scale = _quantize_rows(x2)
    acc = _int8_matmul_accumulate(q, weight.t())
    if fused and _FUSED.enabled:
        out = _FUSED.run("output scaling", _scale_rows, (acc, scale, ws, x.dtype), key)
    else:
        out = _scale_rows(acc, scale, ws, x.dtype)
    if bias is not None:
        out = out.add_(bias.to(out.dtype))
    return out.reshape(*x.shape[:-1], weight.shape[0])
