"""Layer construction and weight casting shared by every lens_core model.

Every Linear/Conv/Norm/Embedding in lens_core is built through an ``operations`` namespace so that a host
(ComfyUI) can pass its own layer classes (``comfy.ops.manual_cast`` and friends), which keep weights on an
offload device and cast them to the input's device/dtype inside ``forward``. ``None`` means plain torch.nn.

Raw parameters that are used directly in maths (attention sinks, packed expert banks, modulation tables…)
go through :func:`cast_to` so they follow the input's device and dtype the same way.
"""
from __future__ import annotations

import types

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm with an optional learned scale; the variance is always computed in float32."""

    def __init__(self, dim, eps=1e-6, elementwise_affine=True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype)) if elementwise_affine else None

    def forward(self, x):
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            return xf.to(dtype) * cast_to(self.weight, dtype, x.device)
        return xf.to(dtype)


TORCH_OPERATIONS = types.SimpleNamespace(
    Linear=nn.Linear,
    Conv2d=nn.Conv2d,
    GroupNorm=nn.GroupNorm,
    LayerNorm=nn.LayerNorm,
    Embedding=nn.Embedding,
    RMSNorm=RMSNorm,
)

#: the quantized-storage classes of the namespace (lens_core.quant_linear / lens_core.quant), one per family;
#: a host supplies subclasses under the same names
STORAGE_OPERATIONS = ("QuantLinear", "GGUFLinear", "FP8Linear", "QuantEmbedding", "PackedExperts")


def _defaults() -> dict:
    from . import quant, quant_linear
    found = dict(vars(TORCH_OPERATIONS))
    found.update(QuantLinear=quant_linear.QuantLinear, GGUFLinear=quant_linear.GGUFLinear,
                 FP8Linear=quant_linear.FP8Linear, QuantEmbedding=quant_linear.QuantEmbedding,
                 PackedExperts=quant.PackedExperts)
    return found


def resolve_operations(operations=None):
    """The namespace to build layers with: ``operations`` where it defines a class, lens_core's otherwise
    (torch.nn layers and the quantized storage families of :data:`STORAGE_OPERATIONS`)."""
    if getattr(operations, "_lens_resolved", False):
        return operations
    merged = {k: getattr(operations, k, v) if operations is not None else v for k, v in _defaults().items()}
    return types.SimpleNamespace(_lens_resolved=True, **merged)


def build_planned(make, operations=None, plan=None):
    """``make(ops)`` (a model constructor building its layers through ``ops``), with the layers named in the
    storage plan built by other classes of the same namespace: the loaders ask ``operations`` for the storage each
    quantized layer needs *while* the model is built (on ``meta``), so a host's own storage classes are used.

    ``plan``: ``fn(probe) -> {module name: (operation name, kwargs)}``, where ``probe`` is the model built once
    with plain layers (on ``meta``: it tells the names and shapes of the layers). The planned module is built by
    ``getattr(ops, operation name)(*the layer's own constructor arguments, **kwargs)``. Construction order is
    deterministic, so the n-th ``Linear`` / ``Embedding`` constructed is the n-th of the probe.
    """
    ops = resolve_operations(operations)
    if plan is None:
        return make(ops)
    order = []

    def recording(kind):
        base = getattr(ops, kind)

        class Recording(base):
            def __init__(self, *args, **kwargs):
                order.append((kind, self))
                super().__init__(*args, **kwargs)
        Recording.__name__ = base.__name__
        return Recording

    probe = make(types.SimpleNamespace(**dict(vars(ops), Linear=recording("Linear"),
                                              Embedding=recording("Embedding"))))
    names = {id(m): n for n, m in probe.named_modules()}
    layers = plan(probe)
    seq = [(kind, names.get(id(m))) for kind, m in order]
    del probe, order
    unknown = sorted(set(layers) - {n for _, n in seq})
    if unknown:
        raise ValueError(f"storage plan: {unknown[:4]} are not Linear/Embedding layers of this model")
    it = iter(seq)
    building = [True]       # the model may keep the namespace and build more layers later: plain ones then

    def planned(kind):
        base = getattr(ops, kind)

        def build(*args, **kwargs):
            if not building[0]:
                return base(*args, **kwargs)
            k, name = next(it, (kind, None))
            if k != kind:
                raise RuntimeError(f"storage plan: layer construction order changed ({k} != {kind})")
            if name in layers:
                op, extra = layers[name]
                return getattr(ops, op)(*args, **kwargs, **extra)
            return base(*args, **kwargs)
        return build

    model = make(types.SimpleNamespace(**dict(vars(ops), Linear=planned("Linear"), Embedding=planned("Embedding"))))
    building[0] = False
    if next(it, None) is not None:
        raise RuntimeError("storage plan: the model built fewer layers the second time")
    return model


def cast_to(t: torch.Tensor | None, dtype=None, device=None, non_blocking=False):
    """``t`` on ``device`` in ``dtype`` (either may be None = keep); a no-op when already there."""
    if t is None:
        return None
    if (dtype is None or t.dtype == dtype) and (device is None or t.device == torch.device(device)):
        return t
    return t.to(device=device, dtype=dtype, non_blocking=non_blocking)


# ---------------------------------------------------------------------------------------------------------
# fp32 GEMM back-end choice on the CPU (fast paths only)

_onednn_linear = None  # None: not decided yet; then True/False for this process


def _onednn_usable(module, x) -> bool:
    global _onednn_linear
    if _onednn_linear is None:
        from .hardware import onednn_fp32_gemm_preferred
        op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
        _onednn_linear = bool(op is not None and torch.backends.mkldnn.is_available()
                              and onednn_fp32_gemm_preferred())
    if not _onednn_linear or type(module) is not nn.Linear or module._forward_hooks or module._forward_pre_hooks:
        return False
    if torch.compiler.is_compiling():  # inductor picks its own GEMMs (and cannot lower this op on plain weights)
        return False
    w, b = module.weight, module.bias
    return (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and w.device.type == "cpu" and x.ndim >= 2 and not torch.is_grad_enabled()
            and (b is None or b.dtype == torch.float32)
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks)


def linear(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; a plain fp32 ``nn.Linear`` on a CPU where oneDNN's GEMM is faster runs through oneDNN.

    Only the fast paths call this (the results differ from MKL's by fp32 summation order, ~1e-6 relative).
    Host layer classes (ComfyUI's casting Linear), hooked layers (per-call LoRA) and other dtypes/devices
    always go through ``module(x)``. See :func:`lens_core.hardware.onednn_fp32_gemm_preferred`.
    """
    global _onednn_linear
    if _onednn_usable(module, x):
        try:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), module.weight, module.bias, "none", [], "")
        except RuntimeError:  # a torch build whose oneDNN op refuses these inputs: use the default from now on
            _onednn_linear = False
    return module(x)
