"""Stand-in of comfy.ops.manual_cast: torch layers that cast weight/bias to the input's device and dtype."""
import torch
from torch.nn import functional as F


def cast_to_input(weight, input, non_blocking=False, copy=True):
    return weight.to(device=input.device, dtype=input.dtype, non_blocking=non_blocking)


def _cast(layer, x):
    w = None if layer.weight is None else cast_to_input(layer.weight, x)
    b = None if getattr(layer, "bias", None) is None else cast_to_input(layer.bias, x)
    return w, b


class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []


class disable_weight_init:
    class Linear(torch.nn.Linear, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward(self, x):
            if not self.comfy_cast_weights:
                return super().forward(x)
            w, b = _cast(self, x)
            return F.linear(x, w, b)

    class Conv2d(torch.nn.Conv2d, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward(self, x):
            if not self.comfy_cast_weights:
                return super().forward(x)
            w, b = _cast(self, x)
            return self._conv_forward(x, w, b)

    class GroupNorm(torch.nn.GroupNorm, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward(self, x):
            if not self.comfy_cast_weights:
                return super().forward(x)
            w, b = _cast(self, x)
            return F.group_norm(x, self.num_groups, w, b, self.eps)

    class LayerNorm(torch.nn.LayerNorm, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward(self, x):
            if not self.comfy_cast_weights:
                return super().forward(x)
            w, b = _cast(self, x)
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)

    class Embedding(torch.nn.Embedding, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward(self, x, out_dtype=None):
            if not self.comfy_cast_weights:
                return super().forward(x)
            return F.embedding(x, self.weight.to(x.device), self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.sparse)


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
