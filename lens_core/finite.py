"""Finite checks of weights: a NaN or inf in a checkpoint (or produced by a patch) would reach every image as an
all-black PNG, so it is reported as an error naming the file and the tensor instead.

- **The DiT: at its first forward.** Checking 8 GB of float weights while loading was measured at 24–28 % of the
  load time (BENCHMARKS.md "Finite check of the weights"; the issue's budget is 10 %), so the loaded DiT gets a
  one-time check of all its float parameters when it is first run (a forward pre-hook on the model, which then
  does nothing): the same error, before the first step's output exists, at a cost that is small next to that
  forward (and none at all for a DiT that is loaded but never run).
- **Text encoder, VAE and the enhancer's generator: at load.** Their float tensors are a small part of the
  bytes read (the encoder's are mostly packed 4-bit experts), so each float tensor (F32 / F16 / BF16 / F64) is
  checked right after it is read, while it is in the CPU cache, by one ``torch.aminmax`` pass (NaN propagates
  through min/max, ±inf shows as an extreme).
- **Quantized storage** (GGUF blocks, fp8 / MXFP8 / ``.comfy_quant`` Linears: anything with a
  ``dequantized_weight`` method): each such layer checks its dequantized weight at its **first use** (checking at
  load would mean dequantizing the whole model once more). The NaN of a corrupt block scale is then reported
  before the first step's output exists. Layers that merely store a float weight narrower than they compute
  (``UpcastLinear``: bf16 kept under fp32) are covered by the float checks above instead.
- Merged LoRA weights are checked by :mod:`lens_core.lora` (bounds before merging, and the merged result).

``LENS_CHECK_WEIGHTS=0`` switches these checks off, ``LENS_CHECK_WEIGHTS=load`` checks the DiT at load too (both
only for measuring the cost).
"""
from __future__ import annotations

import math
import os
import time

import torch

from .checkpoints.errors import CheckpointError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: components whose float weights are checked at their first forward instead of at load (see the docstring)
FIRST_USE_COMPONENTS = ("transformer",)
FIX = ("the file is corrupt (or was written from a model that had diverged); download it again, or use another "
       "copy / quantization of this model")


#: time and bytes spent in :func:`check_loaded` in this process (for the load benchmark's cost figure)
STATS = {"seconds": 0.0, "bytes": 0, "tensors": 0}


def enabled() -> bool:
    return os.environ.get("LENS_CHECK_WEIGHTS", "").strip() not in ("0", "false", "no", "off")


def checked_at_load(component: str) -> bool:
    """Whether ``component``'s float tensors are checked as they are read (else: the model's first forward).
    ``LENS_CHECK_WEIGHTS=load`` checks every component at load (to measure that alternative)."""
    return component not in FIRST_USE_COMPONENTS or os.environ.get("LENS_CHECK_WEIGHTS", "").strip() == "load"


def is_finite(t: torch.Tensor) -> bool:
    """True when the float tensor ``t`` holds no NaN and no ±inf (one min/max pass, no full-size temporary)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def describe_bad(t: torch.Tensor) -> str:
    """"N NaN and M inf of K values (first at index …)" (only computed once a check failed)."""
    t = t.detach()
    nan, inf = torch.isnan(t), torch.isinf(t)
    first = int((nan | inf).flatten().nonzero()[0]) if bool((nan | inf).any()) else -1
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), t.shape)) if first >= 0 else ()
    return f"{int(nan.sum())} NaN and {int(inf.sum())} ±inf of {t.numel()} values (first at index {list(where)})"


def check_loaded(t: torch.Tensor, name: str, origin: str) -> torch.Tensor:
    """CheckpointError naming ``origin`` (the file) and tensor ``name`` if the float tensor ``t`` is not finite."""
    if t.dtype not in FLOAT_DTYPES or not enabled():
        return t
    t0 = time.perf_counter()
    ok = is_finite(t)
    STATS["seconds"] += time.perf_counter() - t0
    STATS["bytes"] += t.numel() * t.element_size()
    STATS["tensors"] += 1
    if not ok:
        raise CheckpointError(f"{origin}: tensor {name!r} holds {describe_bad(t)}; every image would come out "
                              f"black. Fix: {FIX}")
    return t


def _first_use_hook(origin: str, name: str):
    def hook(module, args):
        if module.__dict__.get("_lens_finite_checked", True):
            return
        x = args[0] if args and torch.is_tensor(args[0]) else None
        w = module.dequantized_weight(torch.float32, None if x is None else x.device)
        if not is_finite(w):
            raise CheckpointError(f"{origin}: the weight of {name} ({getattr(module, 'qtype', type(module).__name__)}"
                                  f" storage) dequantizes to {describe_bad(w)} (a corrupt block or scale); every "
                                  f"image would come out black. Fix: {FIX}")
        module.__dict__["_lens_finite_checked"] = True
    return hook


def _root_hook(origin: str):
    def hook(module, args):
        if module.__dict__.get("_lens_finite_checked", True):
            return
        t0 = time.perf_counter()
        for name, p in module.named_parameters():
            if p.dtype in FLOAT_DTYPES and p.device.type != "meta" and not is_finite(p):
                raise CheckpointError(f"{origin}: tensor {name!r} holds {describe_bad(p)}; every image would come "
                                      f"out black. Fix: {FIX}")
        STATS["first_use_seconds"] = STATS.get("first_use_seconds", 0.0) + time.perf_counter() - t0
        module.__dict__["_lens_finite_checked"] = True
    return hook


def _float_stored(mod: torch.nn.Module) -> bool:
    """A layer whose only tensors are a plain float weight (and bias), e.g. :class:`lens_core.upcast.UpcastLinear`
    (bf16 stored, fp32 computed): its "dequantized" weight is a cast of a float tensor that the float checks
    (at load, or the model's first-use pass) already cover, so it needs no check (nor fp32 copy) of its own."""
    w = mod._parameters.get("weight")
    own = [n for n, t in [*mod._parameters.items(), *mod._buffers.items()] if t is not None]
    return w is not None and w.dtype in FLOAT_DTYPES and set(own) <= {"weight", "bias"}


def check_at_first_use(model: torch.nn.Module, origin: str, floats: bool = False) -> int:
    """Give every layer of ``model`` with quantized storage (a ``dequantized_weight`` method) a one-time finite
    check of its dequantized weight at its first forward, and with ``floats`` the model itself a one-time check
    of all its float parameters at its first forward (afterwards the hooks return at once). Returns how many
    hooks were added. Layers storing a plain float weight get none: the caller checks float tensors at load or
    passes ``floats`` (as :func:`lens_core.checkpoints.assign` does)."""
    if not enabled():
        return 0
    n = 0
    if floats and "_lens_finite_checked" not in model.__dict__:
        model.__dict__["_lens_finite_checked"] = False
        model.register_forward_pre_hook(_root_hook(origin))
        n += 1
    for name, mod in model.named_modules():
        if _float_stored(mod):
            continue
        if callable(getattr(mod, "dequantized_weight", None)) and "_lens_finite_checked" not in mod.__dict__:
            mod.__dict__["_lens_finite_checked"] = False
            mod.register_forward_pre_hook(_first_use_hook(origin, name))
            n += 1
    return n


def pending_first_use(model: torch.nn.Module) -> list[str]:
    """Names of the layers whose first-use check has not run yet."""
    return [name for name, mod in model.named_modules() if mod.__dict__.get("_lens_finite_checked") is False]
