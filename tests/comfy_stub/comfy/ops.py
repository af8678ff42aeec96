"""Stand-in of comfy.ops: torch layers whose weight init is skipped and which, when ``comfy_cast_weights`` is
set (always for ``manual_cast``), cast weight and bias to the input's device and dtype in forward."""
import torch
from torch.nn import functional as F


def cast_to_input(weight, input, non_blocking=False, copy=True):
    return weight.to(device=input.device, dtype=input.dtype, non_blocking=non_blocking)


class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []


def _layer(base, cast_forward, to_input=True):
    """``base`` with a no-op reset_parameters and ``cast_forward(layer, x, weight, bias)`` when casting
    (weight/bias cast to the input's device and dtype; only to its device for index inputs)."""

    class Layer(base, CastWeightBiasOp):
        def reset_parameters(self):
            if not hasattr(self, "bias"):      # ComfyUI's Embedding declares an absent bias, as cast layers must
                self.bias = None
            return None

        def forward(self, x, *args, **kwargs):
            if not self.comfy_cast_weights:
                return super().forward(x, *args, **kwargs)
            cast = (lambda t: cast_to_input(t, x)) if to_input else (lambda t: t.to(x.device))
            b = getattr(self, "bias", None)
            return cast_forward(self, x, None if self.weight is None else cast(self.weight),
                                None if b is None else cast(b))

    Layer.__name__ = Layer.__qualname__ = base.__name__
    return Layer


class disable_weight_init:
    Linear = _layer(torch.nn.Linear, lambda s, x, w, b: F.linear(x, w, b))
    Conv2d = _layer(torch.nn.Conv2d, lambda s, x, w, b: s._conv_forward(x, w, b))
    GroupNorm = _layer(torch.nn.GroupNorm, lambda s, x, w, b: F.group_norm(x, s.num_groups, w, b, s.eps))
    LayerNorm = _layer(torch.nn.LayerNorm, lambda s, x, w, b: F.layer_norm(x, s.normalized_shape, w, b, s.eps))
    Embedding = _layer(torch.nn.Embedding, lambda s, x, w, b: F.embedding(
        x, w, s.padding_idx, s.max_norm, s.norm_type, s.scale_grad_by_freq, s.sparse), to_input=False)


class manual_cast(disable_weight_init):
    class Linear(disable_weight_init.Linear):
        comfy_cast_weights = True

    class Conv2d(disable_weight_init.Conv2d):
        comfy_cast_weights = True

    class GroupNorm(disable_weight_init.GroupNorm):
        comfy_cast_weights = True

    class LayerNorm(disable_weight_init.LayerNorm):
        comfy_cast_weights = True

    class Embedding(disable_weight_init.Embedding):
        comfy_cast_weights = True
