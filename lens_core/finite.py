"""Finite checks of weights: a NaN or inf in a checkpoint (or produced by a patch) would reach every image as an
all-black PNG, so it is reported as an error naming the file and the tensor instead.

- **Float tensors at load** (F32 / F16 / BF16 / F64, whatever the file stores them in): each one right after it
  is read, while it is still in the CPU cache, by one ``torch.aminmax`` pass (NaN propagates through min/max,
  ±inf shows as an extreme). Measured cost: BENCHMARKS.md "Finite check at load" (a few per cent of a load).
- **Quantized storage** (GGUF blocks, fp8 / MXFP8 Linears: anything with a ``dequantized_weight`` method):
  checking at load would mean dequantizing the whole model once more, so each such layer checks its dequantized
  weight at its **first use** (a forward pre-hook that removes itself after a successful check). The NaN of a
  corrupt block scale is then reported before the first step's output exists.
- Merged LoRA weights are checked by :mod:`lens_core.lora` (bounds before merging, and the merged result).

``LENS_CHECK_WEIGHTS=0`` switches the load-time and first-use checks off (only for measuring their cost).
"""
from __future__ import annotations

import math
import os
import time

import torch

from .checkpoints.errors import CheckpointError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FIX = ("the file is corrupt (or was written from a model that had diverged); download it again, or use another "
       "copy / quantization of this model")


#: time and bytes spent in :func:`check_loaded` in this process (for the load benchmark's cost figure)
STATS = {"seconds": 0.0, "bytes": 0, "tensors": 0}


def enabled() -> bool:
    return os.environ.get("LENS_CHECK_WEIGHTS", "").strip() not in ("0", "false", "no", "off")


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


def check_at_first_use(model: torch.nn.Module, origin: str) -> int:
    """Give every layer of ``model`` with quantized storage (a ``dequantized_weight`` method) a one-time finite
    check of its dequantized weight at its first forward (afterwards the hook returns at once). Returns how many
    layers got one."""
    if not enabled():
        return 0
    n = 0
    for name, mod in model.named_modules():
        if callable(getattr(mod, "dequantized_weight", None)) and "_lens_finite_checked" not in mod.__dict__:
            mod.__dict__["_lens_finite_checked"] = False
            mod.register_forward_pre_hook(_first_use_hook(origin, name))
            n += 1
    return n


def pending_first_use(model: torch.nn.Module) -> list[str]:
    """Names of the layers whose first-use check has not run yet."""
    return [name for name, mod in model.named_modules() if mod.__dict__.get("_lens_finite_checked") is False]
