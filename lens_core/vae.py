"""FLUX.2 autoencoder (``AutoencoderKLFlux2``) for Lens: decode / encode, BN (un)normalisation, 2×2 packing to
128 channels, tiled decode / encode for large images, and the image conversions.

Spec: ../shared/docs/lens_dit_spec.md §4 "Decode and output" and §5 (latents), and
../shared/docs/checkpoint_formats.md §4 (key names in the diffusers and the BFL/LDM scheme).

Latent spaces
    * VAE latent: 32 channels at H/8 × W/8 (the posterior of the encoder, input of ``post_quant_conv``).
    * Lens latent (ComfyUI LATENT, DiT space): [B, 128, H/16, W/16], the VAE latent packed 2×2 with channel
      index ``c·4 + p1·2 + p2`` (p1 = row offset, p2 = column offset) and normalised per channel by the
      ``bn`` running statistics: ``x_norm = (x − mean) / sqrt(var + eps)`` (eps = ``batch_norm_eps``, 1e-4).

``decode`` un-normalises exactly as the official pipeline does (``x / (1/std) + mean``, statistics in the
model dtype), unpacks and runs ``post_quant_conv`` + decoder. ``encode`` runs encoder + ``quant_conv`` and
takes the **posterior mean** (the first 32 of the 64 moment channels; no sampling, as ComfyUI's VAE encode and
img2img/hires workflows expect a deterministic latent), then packs and normalises.

Parameter names are the diffusers ones, so the diffusers ``vae/`` state dict (and Comfy-Org's
``flux2-vae.safetensors``) loads directly; :func:`bfl_to_diffusers` maps the BFL/LDM layout (``ae.safetensors``
and the Klein-repo ``flux2-vae.safetensors``). All layers are built through ``operations``.

Speed (CPU and GPU): activations run in channels_last, GroupNorm is followed by an in-place SiLU, residual
adds are in place, the mid-block attention is one SDPA call, and the nearest-upsample + 3×3 conv pairs are
computed as four 2×2 sub-pixel convolutions on the low-resolution input (exactly the same linear map with
2.25× fewer multiplies; see :class:`Upsample`). ``vae.exact = True`` instead follows diffusers op for op and
layout for layout, which makes a bf16 decode bit-identical to the official one in the reference kernel
environment (see :attr:`LensVAE.exact`).
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from . import checks as chk
from .jsonfile import read_json_object
from .ops import cast_to, resolve_operations

# ---------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of ``vae/config.json`` (``AutoencoderKLFlux2``) that shape the model; others are ignored."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    decoder_block_out_channels: tuple | None = None
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch_size: tuple = (2, 2)
    act_fn: str = "silu"

    def __post_init__(self):
        # values come from an untrusted config.json: types and ranges before anything is built
        w = "VAE config"
        object.__setattr__(self, "block_out_channels",
                           chk.int_list(self.block_out_channels, "block_out_channels", 1, 4096, w, 2, 8))
        if self.decoder_block_out_channels is not None:
            object.__setattr__(self, "decoder_block_out_channels",
                               chk.int_list(self.decoder_block_out_channels, "decoder_block_out_channels", 1,
                                            4096, w, 2, 8))
        chk.integer(self.in_channels, "in_channels (RGB)", 3, 3, w)
        chk.integer(self.out_channels, "out_channels (RGB)", 3, 3, w)
        chk.integer(self.layers_per_block, "layers_per_block", 1, 8, w)
        chk.integer(self.latent_channels, "latent_channels", 1, 256, w)
        chk.integer(self.norm_num_groups, "norm_num_groups", 1, 1024, w)
        for flag in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            chk.boolean(getattr(self, flag), flag, w)
        chk.number(self.batch_norm_eps, "batch_norm_eps", 0.0, 1.0, w, lo_open=True)
        chk.number(self.batch_norm_momentum, "batch_norm_momentum", 0.0, 1.0, w)
        ps = self.patch_size
        ps = (ps, ps) if isinstance(ps, int) and not isinstance(ps, bool) else ps
        ps = chk.int_list(ps, "patch_size", 1, 16, w, 2, 2)
        object.__setattr__(self, "patch_size", ps)
        if ps != (2, 2):
            raise ValueError(f"VAEConfig: patch_size expected [2, 2] (FLUX.2), got {list(ps)}")
        if self.act_fn != "silu":
            raise ValueError(f"VAEConfig: act_fn expected 'silu', got {self.act_fn!r}")
        if len(self.dec_channels) != len(self.block_out_channels):
            raise ValueError(f"VAEConfig: decoder_block_out_channels must have {len(self.block_out_channels)} "
                             f"entries, got {list(self.dec_channels)}")
        for c in set(self.block_out_channels) | set(self.dec_channels):
            if c % self.norm_num_groups:
                raise ValueError(f"VAEConfig: every channel width must be divisible by norm_num_groups="
                                 f"{self.norm_num_groups}, got width {c}")

    @property
    def dec_channels(self) -> tuple:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def packed_channels(self) -> int:
        """Channels of the Lens latent: latent_channels · 2 · 2 (128)."""
        return self.latent_channels * self.patch_size[0] * self.patch_size[1]

    @property
    def downscale(self) -> int:
        """Pixels per VAE-latent cell (8 for the 4-level FLUX.2 VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        if not isinstance(d, dict):
            raise ValueError(f"VAE config: expected a JSON object, found {type(d).__name__}")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if key in d and (not isinstance(d[key], (list, tuple)) or any(t != want for t in d[key])):
                raise ValueError(f"VAEConfig: {key} expected all {want!r}, got {d[key]}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path) -> "VAEConfig":
        return cls.from_dict(read_json_object(path, "JSON VAE config"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("block_out_channels", "decoder_block_out_channels", "patch_size"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


#: The released FLUX.2 VAE (Lens ``vae/``, Comfy-Org ``flux2-vae.safetensors``; checkpoint_formats.md §4.2).
REAL_VAE_CONFIG = VAEConfig()


def infer_vae_config(state_dict, base: VAEConfig | None = None) -> VAEConfig:
    """A config whose widths, depth and latent size are read from a diffusers-keyed state dict (or a dict of
    key → shape); everything the keys cannot tell (GroupNorm groups, eps) comes from ``base`` (default: the
    real FLUX.2 config). Lets single files without config.json load, including tiny test files."""
    base = base or REAL_VAE_CONFIG

    def shape(k, ndim=4):
        if k not in state_dict:
            raise ValueError(f"infer_vae_config: expected tensor {k!r} (FLUX.2 VAE layout), found none")
        v = state_dict[k]
        dims = tuple(v.shape) if hasattr(v, "shape") else tuple(v)
        if len(dims) != ndim or not all(d >= 1 for d in dims):
            raise ValueError(f"infer_vae_config: tensor {k!r} expected a {ndim}-D convolution weight, found "
                             f"shape {list(dims)}")
        return dims

    keys = set(state_dict)
    need = "decoder.conv_in.weight"
    if need not in keys or "encoder.conv_in.weight" not in keys:
        raise ValueError(f"infer_vae_config: expected a diffusers-keyed FLUX.2 VAE state dict with {need!r} and "
                         f"'encoder.conv_in.weight', found keys like {sorted(keys)[:5]}")
    levels = 1 + max((int(m.group(1)) for k in keys if (m := re.match(r"encoder\.down_blocks\.(\d{1,3})\.", k))),
                     default=-1)
    if not 2 <= levels <= 8:
        raise ValueError(f"infer_vae_config: expected 2..8 encoder.down_blocks (FLUX.2: 4), found {levels}")
    enc = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels))
    dec = tuple(shape(f"decoder.up_blocks.{levels - 1 - i}.resnets.0.conv1.weight")[0] for i in range(levels))
    layers = 1 + max((int(m.group(1)) for k in keys
                      if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d{1,3})\.", k))), default=-1)
    groups = base.norm_num_groups
    while any(c % groups for c in enc + dec):
        groups //= 2
    return dataclasses.replace(
        base,
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=enc,
        decoder_block_out_channels=None if dec == enc else dec,
        layers_per_block=layers,
        latent_channels=shape(need)[1],
        norm_num_groups=groups,
        use_quant_conv="quant_conv.weight" in keys,
        use_post_quant_conv="post_quant_conv.weight" in keys,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in keys,
    )


# ---------------------------------------------------------------------------------------------------------
# Key layouts


def is_diffusers_vae_state_dict(keys) -> bool:
    """True for the diffusers ``AutoencoderKLFlux2`` naming (``decoder.up_blocks.0.resnets.0…``)."""
    return any(k.startswith("decoder.up_blocks.") for k in keys) and any(k.startswith("encoder.down_blocks.")
                                                                        for k in keys)


def is_bfl_vae_state_dict(keys) -> bool:
    """True for the BFL/LDM naming (``encoder.down.0.block.0…``, ``decoder.up.0…``, ``mid.attn_1``)."""
    return any(k.startswith("decoder.up.") for k in keys) and any(k.startswith("encoder.down.") for k in keys)


def is_flux2_vae_state_dict(keys) -> bool:
    """A FLUX.2 VAE in either layout: an 8× KL autoencoder that carries the 128-channel ``bn`` statistics."""
    keys = set(keys)
    return "bn.running_mean" in keys and (is_diffusers_vae_state_dict(keys) or is_bfl_vae_state_dict(keys))


_BFL_RESNET_PARTS = {"nin_shortcut": "conv_shortcut"}
_BFL_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _bfl_key_to_diffusers(key: str, up_levels: int) -> str | None:
    """The diffusers name of one BFL/LDM key (None = not a VAE key we know)."""
    if key.startswith("bn."):
        return key
    m = re.fullmatch(r"(?:encoder\.)?quant_conv\.(weight|bias)", key)
    if m:
        return f"quant_conv.{m.group(1)}"
    m = re.fullmatch(r"(?:decoder\.)?post_quant_conv\.(weight|bias)", key)
    if m:
        return f"post_quant_conv.{m.group(1)}"
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return None
    side, rest = m.groups()
    if rest.split(".")[0] in ("conv_in", "conv_out"):
        return key
    if rest.startswith("norm_out."):
        return f"{side}.conv_norm_out.{rest[len('norm_out.'):]}"
    m = re.fullmatch(r"mid\.block_(\d+)\.(\w+)\.(weight|bias)", rest)
    if m:
        part = _BFL_RESNET_PARTS.get(m.group(2), m.group(2))
        return f"{side}.mid_block.resnets.{int(m.group(1)) - 1}.{part}.{m.group(3)}"
    m = re.fullmatch(r"mid\.attn_1\.(\w+)\.(weight|bias)", rest)
    if m and m.group(1) in _BFL_ATTN_PARTS:
        return f"{side}.mid_block.attentions.0.{_BFL_ATTN_PARTS[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", rest)
    if m:
        kind, i, j, part, wb = m.groups()
        blocks = "down_blocks" if kind == "down" else "up_blocks"
        i = int(i) if kind == "down" else up_levels - 1 - int(i)
        return f"{side}.{blocks}.{i}.resnets.{j}.{_BFL_RESNET_PARTS.get(part, part)}.{wb}"
    m = re.fullmatch(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", rest)
    if m:
        kind, i, which, wb = m.groups()
        blocks = "down_blocks.{}.downsamplers" if kind == "down" else "up_blocks.{}.upsamplers"
        i = int(i) if kind == "down" else up_levels - 1 - int(i)
        return f"{side}.{blocks.format(i)}.0.conv.{wb}"
    return None


def bfl_to_diffusers(state_dict: dict) -> dict:
    """Rename a BFL/LDM-layout FLUX.2 VAE state dict (``ae.safetensors``, or ComfyUI's internal names with a
    top-level ``quant_conv``) to the diffusers names of :class:`LensVAE`; 1×1-conv attention weights
    [C, C, 1, 1] become Linear weights [C, C]. A diffusers-keyed dict is returned unchanged (as a new dict).
    Raises ValueError on keys that belong to neither scheme."""
    keys = list(state_dict)
    if not is_bfl_vae_state_dict(keys):
        return dict(state_dict)
    up_levels = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up\.(\d+)\.", k)))
    out, unknown = {}, []
    for k, v in state_dict.items():
        new = _bfl_key_to_diffusers(k, up_levels)
        if new is None:
            unknown.append(k)
            continue
        if ".attentions.0.to_" in new and new.endswith(".weight") and v.ndim == 4:
            v = v.reshape(v.shape[0], v.shape[1])
        out[new] = v
    if unknown:
        raise ValueError(f"bfl_to_diffusers: expected only FLUX.2 VAE keys in the BFL/LDM scheme, found "
                         f"{len(unknown)} unknown key(s), e.g. {unknown[:3]}")
    return out


def diffusers_to_bfl(state_dict: dict) -> dict:
    """The inverse of :func:`bfl_to_diffusers` (BFL file names: ``encoder.quant_conv``,
    ``decoder.post_quant_conv``, attention weights as [C, C, 1, 1]); for export and round-trip tests."""
    keys = list(state_dict)
    up_levels = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    inverse = {v: k for k, v in {**_BFL_RESNET_PARTS, **_BFL_ATTN_PARTS}.items()}
    out = {}
    for k, v in state_dict.items():
        new = k
        if k.startswith("quant_conv."):
            new = "encoder." + k
        elif k.startswith("post_quant_conv."):
            new = "decoder." + k
        elif ".conv_norm_out." in k:
            new = k.replace(".conv_norm_out.", ".norm_out.")
        elif (m := re.fullmatch(r"(\w+)\.mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)", k)):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{inverse.get(m.group(3), m.group(3))}.{m.group(4)}"
        elif (m := re.fullmatch(r"(\w+)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", k)):
            new = f"{m.group(1)}.mid.attn_1.{inverse[m.group(2)]}.{m.group(3)}"
            if m.group(3) == "weight" and v.ndim == 2:
                v = v.reshape(*v.shape, 1, 1)
        elif (m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", k)):
            new = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{inverse.get(m.group(3), m.group(3))}.{m.group(4)}"
        elif (m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", k)):
            new = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif (m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", k)):
            i = up_levels - 1 - int(m.group(1))
            new = f"decoder.up.{i}.block.{m.group(2)}.{inverse.get(m.group(3), m.group(3))}.{m.group(4)}"
        elif (m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", k)):
            new = f"decoder.up.{up_levels - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        out[new] = v
    return out


def prepare_vae_state_dict(state_dict: dict) -> dict:
    """Any FLUX.2 VAE state dict → the exact key set of :class:`LensVAE` (BFL names mapped, 1×1-conv attention
    weights flattened, a missing ``bn.num_batches_tracked`` filled in). Tensors are not copied."""
    sd = bfl_to_diffusers(state_dict)
    for k in list(sd):
        if ".attentions.0.to_" in k and k.endswith(".weight") and sd[k].ndim == 4:
            sd[k] = sd[k].reshape(sd[k].shape[0], sd[k].shape[1])
    if "bn.running_mean" in sd and "bn.num_batches_tracked" not in sd:
        sd["bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return sd


# ---------------------------------------------------------------------------------------------------------
# Building blocks (diffusers parameter names)


class _StopTile(Exception):
    """Raised inside a tile when the GroupNorm whose global statistics are being gathered has been reached."""


class _GlobalGroupNorm:
    """Tiling with *global* GroupNorm statistics (``tile_mode="exact"``).

    The tiled stages are run over all tiles once per GroupNorm layer: in pass k every tile stops at the k-th
    GroupNorm and adds the sums over its own core region (the part it owns after blending) to that layer's
    totals; from pass k+1 on, layer k normalises with the image-wide mean and variance. The final pass, with all
    statistics known, produces the output. Memory stays that of one tile; time is about (layers/2 + 1) tiled
    passes."""

    current: "_GlobalGroupNorm | None" = None

    def __init__(self):
        self.stats = {}      # id(norm) -> (mean [B, G, 1], var [B, G, 1])
        self.sums = None     # [sum, sum of squares, count] of the layer being measured
        self.core = None     # (y0, y1, x0, x1) fractions of the tile that the current tile owns

    def __call__(self, norm, x):
        key = id(norm)
        b, c = x.shape[:2]
        g = norm.num_groups
        if key not in self.stats:
            h, w = x.shape[-2:]
            y0, y1, x0, x1 = self.core
            part = x[:, :, round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)].double().reshape(b, g, -1)
            sums = (part.sum(-1), part.square().sum(-1), part.shape[-1])
            if self.sums is None:
                self.sums = [key, *sums]
            else:
                self.sums[1] += sums[0]
                self.sums[2] += sums[1]
                self.sums[3] += sums[2]
            raise _StopTile
        mean, var = self.stats[key]
        xf = x.reshape(b, g, -1)
        y = ((xf - mean.to(x.dtype)) * torch.rsqrt(var + norm.eps).to(x.dtype)).reshape(x.shape)
        weight, bias = cast_to(norm.weight, x.dtype, x.device), cast_to(norm.bias, x.dtype, x.device)
        return torch.addcmul(bias[:, None, None], y, weight[:, None, None])

    def finish_layer(self):
        key, s, sq, n = self.sums
        mean = s / n
        var = (sq / n - mean.square()).clamp_min(0)
        self.stats[key] = (mean[..., None].float(), var[..., None].float())
        self.sums = None


def _group_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gn = _GlobalGroupNorm.current
    return norm(x) if gn is None else gn(norm, x)


def _norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm followed by SiLU, in place on the fresh GroupNorm output when no gradient is recorded."""
    h = _group_norm(norm, x)
    return F.silu(h, inplace=not torch.is_grad_enabled())


def _add(h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return h.add_(residual) if not torch.is_grad_enabled() else h + residual


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv → GroupNorm → SiLU → 3×3 conv, plus the (1×1 conv when widths differ) skip."""

    def __init__(self, cin, cout, groups, ops, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1 = ops.GroupNorm(groups, cin, eps=1e-6, affine=True, **kw)
        self.conv1 = ops.Conv2d(cin, cout, 3, padding=1, **kw)
        self.norm2 = ops.GroupNorm(groups, cout, eps=1e-6, affine=True, **kw)
        self.conv2 = ops.Conv2d(cout, cout, 3, padding=1, **kw)
        self.conv_shortcut = ops.Conv2d(cin, cout, 1, **kw) if cin != cout else None

    def forward(self, x):
        h = self.conv1(_norm_silu(self.norm1, x))
        h = self.conv2(_norm_silu(self.norm2, h))
        return _add(h, self.conv_shortcut(x) if self.conv_shortcut is not None else x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all latent positions (the mid block), with a residual connection."""

    def __init__(self, channels, groups, ops, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.group_norm = ops.GroupNorm(groups, channels, eps=1e-6, affine=True, **kw)
        self.to_q = ops.Linear(channels, channels, **kw)
        self.to_k = ops.Linear(channels, channels, **kw)
        self.to_v = ops.Linear(channels, channels, **kw)
        self.to_out = nn.ModuleList([ops.Linear(channels, channels, **kw)])

    #: reference layout (set by :attr:`LensVAE.exact`): build the output view exactly as diffusers'
    #: ``AttnProcessor2_0`` does ([B, HW, C] → transpose → reshape, then an out-of-place residual add). Its
    #: strides decide which CPU GroupNorm kernel the next block takes (for B = 1 torch does not count them as
    #: channels_last, for B > 1 it does), and the two kernels round bf16 differently.
    reference_layout = False

    def forward(self, x):
        b, c, h, w = x.shape
        # [B, C, H, W] → [B, 1, HW, C]; free when x is channels_last
        t = _group_norm(self.group_norm, x).permute(0, 2, 3, 1).reshape(b, 1, h * w, c)
        o = F.scaled_dot_product_attention(self.to_q(t), self.to_k(t), self.to_v(t))
        o = self.to_out[0](o.reshape(b, h * w, c))
        if self.reference_layout:
            o = o.transpose(1, 2).reshape(b, c, h, w)
            return o + x
        # back to [B, C, H, W] as a channels_last view (no copy)
        o = o.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return _add(o, x)


class MidBlock(nn.Module):
    def __init__(self, channels, groups, add_attention, ops, device=None, dtype=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, ops, device, dtype) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [AttentionBlock(channels, groups, ops, device, dtype)] if add_attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3×3 conv (no padding)."""

    def __init__(self, channels, ops, device=None, dtype=None):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, stride=2, padding=0, device=device, dtype=dtype)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _subpixel_weights(weight: torch.Tensor) -> torch.Tensor:
    """For a 3×3 conv applied after a nearest ×2 upsample: the four 2×2 kernels [4·Cout, Cin, 2, 2] (phase
    order (dy, dx) = (0,0), (0,1), (1,0), (1,1)) that give the same output from the low-resolution input.

    Output pixel (2i+dy, 2j+dx) sees upsampled rows 2i+dy−1 … 2i+dy+1, i.e. low-res rows i−1, i (dy = 0: taps
    0 | 1+2) or i, i+1 (dy = 1: taps 0+1 | 2); the same along columns. Sums are formed in float32."""
    w = weight.float()
    groups = {0: ((0,), (1, 2)), 1: ((0, 1), (2,))}
    phases = []
    for dy in (0, 1):
        rows = torch.stack([w[:, :, list(g), :].sum(2) for g in groups[dy]], 2)  # [O, I, 2, 3]
        for dx in (0, 1):
            phases.append(torch.stack([rows[:, :, :, list(g)].sum(3) for g in groups[dx]], 3))  # [O, I, 2, 2]
    return torch.cat(phases, 0).to(weight.dtype)


class Upsample(nn.Module):
    """Nearest ×2 upsample followed by a 3×3 conv (parameter ``conv``).

    When ``conv`` is a plain 3×3 conv (torch.nn or an ``operations`` class that only casts), the pair is computed
    as one 2×2 convolution of the low-resolution input producing the four output phases (see
    :func:`_subpixel_weights`) followed by a pixel shuffle: the same linear map as upsample + conv, with 16
    instead of 36 multiply-adds per output pixel and no upsampled intermediate. The result equals the reference
    to float rounding (the summed taps change the summation order). ``subpixel=False`` uses the reference path.
    """

    subpixel = True

    def __init__(self, channels, ops, device=None, dtype=None):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)
        self._cache = None

    def _phase_weights(self, x):
        w, b = self.conv.weight, self.conv.bias
        key = (w.data_ptr(), w._version, w.dtype, w.device, x.dtype, x.device)
        if self._cache is None or self._cache[0] != key:
            wp = cast_to(_subpixel_weights(w), x.dtype, x.device)
            bp = cast_to(b, x.dtype, x.device).repeat(4) if b is not None else None
            self._cache = (key, wp, bp)
        return self._cache[1], self._cache[2]

    def forward(self, x):
        conv = self.conv
        plain = type(conv).forward is nn.Conv2d.forward or getattr(conv, "comfy_cast_weights", None) is False
        if not (self.subpixel and plain and conv.weight.device.type != "meta" and not torch.is_grad_enabled()):
            return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        wp, bp = self._phase_weights(x)
        b, c, h, w = x.shape
        cout = wp.shape[0] // 4
        y = F.conv2d(x, wp, bp, padding=1)  # [B, 4·Cout, h+1, w+1]: phase (dy,dx) at offset (dy,dx)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        out = torch.empty((b, cout, 2 * h, 2 * w), device=x.device, dtype=x.dtype, memory_format=fmt)
        for p, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            out[:, :, dy::2, dx::2] = y[:, p * cout:(p + 1) * cout, dy:dy + h, dx:dx + w]
        return out


class DownEncoderBlock(nn.Module):
    def __init__(self, cin, cout, layers, groups, downsample, ops, device=None, dtype=None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if i == 0 else cout, cout, groups, ops, device, dtype) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(cout, ops, device, dtype)] if downsample else [])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class UpDecoderBlock(nn.Module):
    def __init__(self, cin, cout, layers, groups, upsample, ops, device=None, dtype=None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if i == 0 else cout, cout, groups, ops, device, dtype) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(cout, ops, device, dtype)] if upsample else [])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, ops, device=None, dtype=None):
        super().__init__()
        ch, g, kw = cfg.block_out_channels, cfg.norm_num_groups, dict(device=device, dtype=dtype)
        self.conv_in = ops.Conv2d(cfg.in_channels, ch[0], 3, padding=1, **kw)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1, ops, device, dtype)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, ops, device, dtype)
        self.conv_norm_out = ops.GroupNorm(g, ch[-1], eps=1e-6, affine=True, **kw)
        self.conv_out = ops.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1, **kw)

    def high(self, x):
        """The full-resolution stages (conv_in and the down blocks with a downsampler): tiled when tiling."""
        x = self.conv_in(x)
        for blk in self.down_blocks[:-1]:
            x = blk(x)
        return x

    def low(self, x):
        """The 1/8-resolution stages (last down block, mid block with attention, output): always global."""
        x = self.mid_block(self.down_blocks[-1](x))
        return self.conv_out(_norm_silu(self.conv_norm_out, x))

    def forward(self, x):
        return self.low(self.high(x))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, ops, device=None, dtype=None):
        super().__init__()
        ch, g, kw = tuple(reversed(cfg.dec_channels)), cfg.norm_num_groups, dict(device=device, dtype=dtype)
        self.conv_in = ops.Conv2d(cfg.latent_channels, ch[0], 3, padding=1, **kw)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, ops, device, dtype)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < len(ch) - 1, ops, device, dtype)
            for i in range(len(ch))])
        self.conv_norm_out = ops.GroupNorm(g, ch[-1], eps=1e-6, affine=True, **kw)
        self.conv_out = ops.Conv2d(ch[-1], cfg.out_channels, 3, padding=1, **kw)

    #: up blocks run globally before the tiled part (through the first upsampler: 1/4 resolution)
    global_up_blocks = 1

    def low(self, z):
        """conv_in, mid block (attention over the whole latent) and the first up block: always global."""
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks[: self.global_up_blocks]:
            x = blk(x)
        return x

    def high(self, x):
        """The remaining up blocks and the output layers: tiled when tiling."""
        for blk in self.up_blocks[self.global_up_blocks:]:
            x = blk(x)
        return self.conv_out(_norm_silu(self.conv_norm_out, x))

    def forward(self, z):
        return self.high(self.low(z))


class LatentBatchNorm(nn.Module):
    """The ``bn`` running statistics (BatchNorm2d(128), affine off): buffers only, used by hand."""

    def __init__(self, channels, eps, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(channels, device=device, dtype=dtype))
        self.register_buffer("running_var", torch.ones(channels, device=device, dtype=dtype))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def stats(self, dtype, device):
        """(mean, 1/std) in the buffers' dtype (as the official code, bf16 in a bf16 model), cast to ``dtype``."""
        std = torch.sqrt(self.running_var + self.eps)
        return cast_to(self.running_mean, dtype, device), cast_to(1.0 / std, dtype, device)


# ---------------------------------------------------------------------------------------------------------
# Packing and latent-family diagnostics

_LATENT_FAMILIES = {
    3: "an RGB image, not a latent",
    4: "an SD1.x / SD2.x / SDXL latent (4 channels at 1/8)",
    12: "a packed 3-channel latent (e.g. a 2×2-packed preview format)",
    16: "an SD3 / FLUX.1 / Wan 2.1 latent (16 channels at 1/8)",
    32: "an unpacked FLUX.2 latent (32 channels at 1/8); pack it 2×2 and BN-normalise it first",
    48: "a Wan 2.2 latent (48 channels)",
    64: "a 2×2-packed FLUX.1 latent (16×4 = 64 channels) or an LTX/Hunyuan-like latent",
}


def _check_latent(latents: torch.Tensor, expected: int) -> None:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        hint = (" (this looks like packed DiT tokens [B, S, 128]; use lens_core.config.unpack_latents first)"
                if isinstance(latents, torch.Tensor) and latents.ndim == 3 and latents.shape[-1] == expected else "")
        raise ValueError(f"LensVAE.decode: expected a Lens latent [B, {expected}, H/16, W/16], got {shape}{hint}")
    c = latents.shape[1]
    if c != expected:
        family = _LATENT_FAMILIES.get(c, "not a FLUX.2 / Lens latent")
        raise ValueError(f"LensVAE.decode: expected a Lens / FLUX.2 latent with {expected} channels "
                         f"([B, {expected}, H/16, W/16], 2×2-packed and BN-normalised), got {c} channels "
                         f"(shape {tuple(latents.shape)}): looks like {family}")


def patchify(z: torch.Tensor) -> torch.Tensor:
    """VAE latent [B, C, 2h, 2w] → [B, 4C, h, w] with channel index c·4 + p1·2 + p2."""
    b, c, hh, ww = z.shape
    return z.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, hh // 2, ww // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """[B, 4C, h, w] (channel c·4 + p1·2 + p2) → VAE latent [B, C, 2h, 2w]; the inverse of :func:`patchify`."""
    b, c4, h, w = x.shape
    return x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


# ---------------------------------------------------------------------------------------------------------
# Tiling


def _tile_starts(size: int, tile: int, overlap: int, align: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering [0, size) with at least ``overlap`` shared, multiples
    of ``align``; the last tile ends exactly at ``size``."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    starts = [round(i * (size - tile) / (n - 1) / align) * align for i in range(n)]
    starts[-1] = size - tile
    return starts


def _ramp(length: int, lead: int, trail: int, device) -> torch.Tensor:
    """1-D blend weight over a tile: 0 on the outer quarter of each overlap (where the tile's own border effects
    live), then linear up to 1 over the middle half; ``lead``/``trail`` = overlap with the previous/next tile."""
    i = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    w = torch.ones(length, device=device, dtype=torch.float32)
    if lead:
        m = lead // 4
        w = torch.minimum(w, ((i - m) / max(lead - 2 * m, 1)).clamp(0, 1))
    if trail:
        m = trail // 4
        w = torch.minimum(w, ((length - i - m) / max(trail - 2 * m, 1)).clamp(0, 1))
    return w


def _core(starts: list[int], i: int, tile: int) -> tuple[float, float]:
    """The part of tile ``i`` (as fractions of its length) that it owns: up to the middle of each overlap."""
    lo = 0 if i == 0 else (starts[i - 1] + tile - starts[i]) / 2
    hi = tile if i == len(starts) - 1 else tile - (starts[i] + tile - starts[i + 1]) / 2
    return lo / tile, hi / tile


def _tiled_apply(fn, x, tile: int, overlap: int, align: int, scale: float, out_channels: int, out_dtype,
                 exact: bool = False):
    """Apply ``fn`` (spatial map with output/input size ratio ``scale``) on overlapping tiles of ``x`` and blend the
    tile outputs with linear ramps over the overlaps (weights normalised to sum to one everywhere). With
    ``exact`` the GroupNorms inside ``fn`` use image-wide statistics (:class:`_GlobalGroupNorm`)."""
    b, _, h, w = x.shape
    ys, xs = _tile_starts(h, tile, overlap, align), _tile_starts(w, tile, overlap, align)
    oh, ow = round(h * scale), round(w * scale)
    th, tw = min(tile, h), min(tile, w)
    gn = _GlobalGroupNorm() if exact else None
    previous, _GlobalGroupNorm.current = _GlobalGroupNorm.current, gn
    try:
        while True:
            out = torch.zeros((b, out_channels, oh, ow), device=x.device, dtype=torch.float32)
            norm = torch.zeros((1, 1, oh, ow), device=x.device, dtype=torch.float32)
            measuring = False
            for iy, y0 in enumerate(ys):
                for ix, x0 in enumerate(xs):
                    if gn is not None:
                        gn.core = (*_core(ys, iy, th), *_core(xs, ix, tw))
                    try:
                        y = fn(x[:, :, y0:y0 + th, x0:x0 + tw]).float()
                    except _StopTile:
                        measuring = True
                        continue
                    oy, ox, ty, tx = round(y0 * scale), round(x0 * scale), y.shape[2], y.shape[3]
                    lead_y = round((ys[iy - 1] + th - y0) * scale) if iy else 0
                    trail_y = round((y0 + th - ys[iy + 1]) * scale) if iy + 1 < len(ys) else 0
                    lead_x = round((xs[ix - 1] + tw - x0) * scale) if ix else 0
                    trail_x = round((x0 + tw - xs[ix + 1]) * scale) if ix + 1 < len(xs) else 0
                    wgt = _ramp(ty, lead_y, trail_y, x.device)[:, None] * _ramp(tx, lead_x, trail_x, x.device)[None]
                    out[:, :, oy:oy + ty, ox:ox + tx].add_(y * wgt)
                    norm[:, :, oy:oy + ty, ox:ox + tx].add_(wgt)
                    del y
            if not measuring:
                return out.div_(norm).to(out_dtype)
            gn.finish_layer()
    finally:
        _GlobalGroupNorm.current = previous


# ---------------------------------------------------------------------------------------------------------
# The model


class LensVAE(nn.Module):
    """FLUX.2 autoencoder with diffusers parameter names (``encoder.*``, ``decoder.*``, ``quant_conv``,
    ``post_quant_conv``, ``bn.running_mean/var/num_batches_tracked``).

    Computation happens on the input's device in ``compute_dtype`` (default: the dtype of the weights; a host
    with cast-on-the-fly ``operations`` sets it to its compute dtype).

    Tiling: ``tiled=None`` tiles when the estimated activation memory exceeds ``memory_budget`` bytes (default:
    half of the free device memory / MemAvailable); ``True``/``False`` force it. Tiles are ``tile_size`` pixels
    (a multiple of 16) with ``tile_overlap`` pixels blended linearly.
    """

    tile_size = 512
    tile_overlap = 128
    tile_mode = "fast"
    memory_budget: int | None = None

    def __init__(self, config: VAEConfig | None = None, operations=None, device=None, dtype=None):
        super().__init__()
        self.config = cfg = config or REAL_VAE_CONFIG
        ops = resolve_operations(operations)
        kw = dict(device=device, dtype=dtype)
        self.encoder = Encoder(cfg, ops, **kw)
        self.decoder = Decoder(cfg, ops, **kw)
        c2, c = 2 * cfg.latent_channels, cfg.latent_channels
        self.quant_conv = ops.Conv2d(c2, c2, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = ops.Conv2d(c, c, 1, **kw) if cfg.use_post_quant_conv else None
        self.bn = LatentBatchNorm(cfg.packed_channels, cfg.batch_norm_eps, **kw)
        self.compute_dtype = None
        self.channels_last = True
        self._exact = False

    @property
    def exact(self) -> bool:
        """Reference-exact computation (default False: the fast path). When True, decode and encode follow the
        official diffusers ``AutoencoderKLFlux2`` op for op, so that a bf16 decode in the reference kernel
        environment (tests/test_dit.py ``EXACT_ENV``) is bit-identical to the official one:

        * activations stay in the standard (NCHW) layout instead of channels_last: the bf16 CPU GroupNorm
          kernel for channels_last inputs rounds differently from the contiguous one;
        * the mid-block attention output gets the memory layout of diffusers' (see
          :attr:`AttentionBlock.reference_layout`), so the following GroupNorm takes the same kernel;
        * nearest ×2 upsample followed by the 3×3 conv, instead of the sub-pixel 2×2 convolutions (same linear
          map, different bf16 rounding; 2.25× more multiplies in those convolutions).

        Tested (tests/test_vae.py): bit-identical bf16 ``decoded`` and uint8 images for the pipeline_tiny cases
        (batch 1), vae_tiny's bf16 decode, and diffusers' own decode at batch 2. Measured once, not tested: the
        bf16 encode moments are bit-identical to diffusers' too. The fast path differs in ~84% of the bf16
        elements (max abs 0.04-0.07) and is ~1.3× faster (bf16, 512², one CPU thread). In fp32 both paths agree
        to float rounding (~1e-6). Independent of ``tile_mode="exact"`` (tiling with global GroupNorm
        statistics)."""
        return self._exact

    @exact.setter
    def exact(self, value: bool) -> None:
        self._exact = bool(value)
        for mod in self.modules():
            if isinstance(mod, Upsample):
                mod.subpixel = not self._exact
            elif isinstance(mod, AttentionBlock):
                mod.reference_layout = self._exact

    # ---- helpers
    def _dtype(self):
        return self.compute_dtype or self.decoder.conv_in.weight.dtype

    def _layout(self, x):
        if self.channels_last and not self._exact:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous() if self._exact else x

    def activation_bytes(self, batch: int, height: int, width: int, dtype=None) -> int:
        """Rough peak activation memory (bytes) of an untiled decode/encode at ``height``×``width`` pixels: the
        largest full-resolution stage holds about four maps of its widest channel count."""
        dtype = dtype or self._dtype()
        ch = self.config.dec_channels
        widest_full = max(ch[0], ch[1] if len(ch) > 1 else ch[0])
        return 4 * batch * height * width * widest_full * torch.finfo(dtype).bits // 8

    def _want_tiles(self, tiled, batch, height, width, device, dtype) -> bool:
        if tiled is not None:
            return bool(tiled)
        if height <= self.tile_size and width <= self.tile_size:
            return False
        if self.memory_budget is not None:
            budget = self.memory_budget
        else:
            from .memory import available_ram, available_vram

            free = available_vram(device)
            budget = (available_ram() if free is None else free) // 2
        return self.activation_bytes(batch, height, width, dtype) > budget

    # ---- decode
    def unnormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Lens latent [B, 128, h, w] → VAE latent [B, 32, 2h, 2w] (official form x / (1/std) + mean)."""
        _check_latent(latents, self.config.packed_channels)
        dtype = self._dtype()
        x = latents.to(dtype)
        mean, inv_std = self.bn.stats(dtype, x.device)
        x = x / inv_std[:, None, None] + mean[:, None, None]
        return unpatchify(x)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent [B, 32, H/8, W/8] → image [B, 3, H, W] (post_quant_conv + decoder), untiled."""
        z = self._layout(z.to(self._dtype()))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Lens latent [B, 128, h, w] (normalised, packed) → image [B, 3, 16h, 16w], about [-1, 1], not clamped."""
        z = self.unnormalize(latents)
        b, _, h8, w8 = z.shape
        f = self.config.downscale
        if not self._want_tiles(tiled, b, h8 * f, w8 * f, z.device, z.dtype):
            return self.decode_raw(z)
        z = self._layout(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        x = self.decoder.low(z)
        scale = h8 * f // x.shape[2]
        return _tiled_apply(self.decoder.high, x, max(self.tile_size // scale, 1), self.tile_overlap // scale, 1,
                            scale, self.config.out_channels, z.dtype, exact=self._exact_tiles())

    def _exact_tiles(self) -> bool:
        if self.tile_mode not in ("fast", "exact"):
            raise ValueError(f"LensVAE.tile_mode: expected 'fast' or 'exact', got {self.tile_mode!r}")
        return self.tile_mode == "exact"

    # ---- encode
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] in [-1, 1] → posterior moments [B, 64, H/8, W/8] (mean ‖ logvar), untiled."""
        x = self._layout(images.to(self._dtype()))
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h.contiguous()

    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_moments(images)[:, : self.config.latent_channels]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent [B, 32, 2h, 2w] → Lens latent [B, 128, h, w]: pack 2×2, then (x − mean) / sqrt(var + eps)."""
        x = patchify(z)
        mean, inv_std = self.bn.stats(x.dtype, x.device)
        return (x - mean[:, None, None]) * inv_std[:, None, None]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Image [B, 3, H, W] in [-1, 1] (H, W multiples of 16) → Lens latent [B, 128, H/16, W/16], normalised
        and packed, from the **posterior mean** (deterministic; no sampling)."""
        cfg = self.config
        if images.ndim != 4 or images.shape[1] != cfg.in_channels:
            raise ValueError(f"LensVAE.encode: expected images [B, {cfg.in_channels}, H, W] in [-1, 1], got shape "
                             f"{tuple(images.shape)}" + (" (a ComfyUI IMAGE [B, H, W, 3]? use from_comfy_image)"
                                                         if images.ndim == 4 and images.shape[-1] == 3 else ""))
        b, _, h, w = images.shape
        step = 2 * cfg.downscale
        if h % step or w % step:
            raise ValueError(f"LensVAE.encode: expected height and width divisible by {step}, got {h}×{w}")
        dtype = self._dtype()
        if not self._want_tiles(tiled, b, h, w, images.device, dtype):
            return self.normalize(self.encode_mean(images))
        f = cfg.downscale
        x = _tiled_apply(self.encoder.high, self._layout(images.to(dtype)), max(self.tile_size // f * f, step),
                         self.tile_overlap // f * f, f, 1.0 / f, cfg.block_out_channels[-2], dtype,
                         exact=self._exact_tiles())
        moments = self.encoder.low(self._layout(x))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return self.normalize(moments[:, : cfg.latent_channels].contiguous())


# ---------------------------------------------------------------------------------------------------------
# Image conversions


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoded [B, 3, H, W] → uint8 [B, H, W, 3] exactly as the official pipeline: clamp(−1, 1), (x + 1)·127.5
    in the images' dtype, truncating cast."""
    x = images.clamp(-1, 1)
    x = (x + 1) * 127.5
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_comfy_image(images: torch.Tensor) -> torch.Tensor:
    """Decoded [B, 3, H, W] → ComfyUI IMAGE [B, H, W, 3] float32 in [0, 1] (clamp(−1, 1), then (x + 1)/2)."""
    x = images.float().clamp(-1, 1)
    return ((x + 1) * 0.5).permute(0, 2, 3, 1).contiguous()


def from_comfy_image(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C≥3] float in [0, 1] → [B, 3, H, W] float32 in [-1, 1] (alpha dropped)."""
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"from_comfy_image: expected a ComfyUI IMAGE [B, H, W, 3], got shape {tuple(image.shape)}")
    return (image[..., :3].float() * 2 - 1).permute(0, 3, 1, 2).contiguous()
