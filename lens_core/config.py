"""Lens DiT configuration, variant presets, resolution buckets, size validation and latent packing.

Spec: ../shared/docs/lens_dit_spec.md §2 (transformer/config.json), §4 (variant defaults) and §5 (latents,
buckets). Everything here is plain Python / tensor reshaping; no model code.
"""
from __future__ import annotations

import dataclasses

import torch

from . import checks as chk
from .jsonfile import read_json_object

#: bounds of what a Lens DiT config can be (the released model: 48 layers, width 1536); far above any real file
MAX_DIT_LAYERS = 128
MAX_DIT_WIDTH = 16384

# ---------------------------------------------------------------------------------------------------------
# transformer/config.json


@dataclasses.dataclass(frozen=True)
class LensDiTConfig:
    """The fields of ``transformer/config.json`` (spec §2). Unknown keys (``_class_name`` …) are ignored.

    Derived sizes (``width``, ``mlp_hidden``, ``out_features``) follow the official code: the width is
    always heads × head_dim (``inner_dim`` is stored but unused), the GateMLP hidden size is
    ``int(width / 3 * 8)``, and ``proj_out`` maps to patch² · out_channels.
    """

    patch_size: int = 2
    in_channels: int = 128
    out_channels: int = 32
    num_layers: int = 48
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    inner_dim: int = 1536
    enc_hidden_dim: int = 2880
    axes_dims_rope: tuple = (8, 28, 28)
    gate_mlp: bool = True
    rms_norm: bool = True
    multi_layer_encoder_feature: bool = True
    selected_layer_index: tuple = (5, 11, 17, 23)

    def __post_init__(self):
        # every value comes from an untrusted config.json: types and ranges are checked before anything is built
        w = "transformer config"
        chk.integer(self.patch_size, "patch_size", 2, 2, w)
        chk.integer(self.in_channels, "in_channels (the packed FLUX.2 latent)", 128, 128, w)
        chk.integer(self.out_channels, "out_channels (FLUX.2 latent channels)", 32, 32, w)
        chk.integer(self.num_layers, "num_layers", 1, MAX_DIT_LAYERS, w)
        chk.integer(self.attention_head_dim, "attention_head_dim", 2, 512, w)
        chk.integer(self.num_attention_heads, "num_attention_heads", 1, 256, w)
        chk.integer(self.inner_dim, "inner_dim", 0, MAX_DIT_WIDTH, w)
        chk.integer(self.enc_hidden_dim, "enc_hidden_dim", 1, 16384, w)
        chk.integer(self.width, "num_attention_heads * attention_head_dim", 1, MAX_DIT_WIDTH, w)
        object.__setattr__(self, "axes_dims_rope",
                           chk.int_list(self.axes_dims_rope, "axes_dims_rope", 2, 512, w, 3, 3))
        object.__setattr__(self, "selected_layer_index",
                           chk.int_list(self.selected_layer_index, "selected_layer_index", 0, 255, w, 1, 16))
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope must be even and sum to attention_head_dim="
                             f"{self.attention_head_dim}, got {list(self.axes_dims_rope)}")
        for flag in ("gate_mlp", "rms_norm", "multi_layer_encoder_feature"):
            if not chk.boolean(getattr(self, flag), flag, w):
                raise ValueError(f"LensDiTConfig: {flag}=false is not used by any Lens checkpoint and is not "
                                 f"supported (expected true, got false)")
        if len(self.selected_layer_index) != 4:
            raise ValueError(f"selected_layer_index: expected 4 text-encoder layers, got "
                             f"{list(self.selected_layer_index)}")

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.width / 3 * 8)

    @property
    def out_features(self) -> int:
        return self.patch_size * self.patch_size * self.out_channels

    @property
    def num_text_layers(self) -> int:
        return len(self.selected_layer_index)

    @classmethod
    def from_dict(cls, d: dict) -> "LensDiTConfig":
        if not isinstance(d, dict):
            raise ValueError(f"transformer config: expected a JSON object, found {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path) -> "LensDiTConfig":
        return cls.from_dict(read_json_object(path, "JSON transformer config"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(d["axes_dims_rope"])
        d["selected_layer_index"] = list(d["selected_layer_index"])
        return d


#: The released Lens / Lens-Turbo / Lens-Base transformer config (spec §2).
REAL_DIT_CONFIG = LensDiTConfig()

# ---------------------------------------------------------------------------------------------------------
# Variant presets (spec §4 "Defaults per variant")

#: name -> (steps, cfg)
VARIANTS = {
    "lens": (20, 5.0),
    "turbo": (4, 1.0),
    "base": (50, 5.0),
}

_VARIANT_ALIASES = {
    "lens": "lens", "lens-rl": "lens",
    "turbo": "turbo", "lens-turbo": "turbo", "lens_turbo": "turbo",
    "base": "base", "lens-base": "base", "lens_base": "base",
}


def variant_name(name: str) -> str:
    """The canonical variant key ("lens", "turbo", "base") for a name such as "Lens-Turbo"."""
    key = str(name).strip().lower()
    if key not in _VARIANT_ALIASES:
        raise ValueError(f"unknown Lens variant {name!r}: expected one of {sorted(VARIANTS)} "
                         f"(or Lens / Lens-Turbo / Lens-Base)")
    return _VARIANT_ALIASES[key]


def variant_defaults(name: str) -> tuple[int, float]:
    """(steps, cfg) of a variant: lens 20/5.0, turbo 4/1.0, base 50/5.0. ValueError on an unknown name."""
    return VARIANTS[variant_name(name)]


# ---------------------------------------------------------------------------------------------------------
# Resolution buckets (spec §5; tuples are (height, width), the label is W:H)

ASPECT_LABELS = ("1:2", "9:16", "2:3", "3:4", "1:1", "4:3", "3:2", "16:9", "2:1")

_BUCKETS = {
    1024: {"1:2": (1472, 736), "9:16": (1376, 768), "2:3": (1248, 832), "3:4": (1152, 864),
           "1:1": (1024, 1024), "4:3": (864, 1152), "3:2": (832, 1248), "16:9": (768, 1376),
           "2:1": (736, 1472)},
    1440: {"1:2": (2080, 1040), "9:16": (1936, 1088), "2:3": (1760, 1168), "3:4": (1616, 1216),
           "1:1": (1440, 1440), "4:3": (1216, 1616), "3:2": (1168, 1760), "16:9": (1088, 1936),
           "2:1": (1040, 2080)},
}


def aspect_buckets(base: int) -> dict[str, tuple[int, int]]:
    """The nine official buckets {label W:H: (height, width)} for base 1024 or 1440."""
    try:
        return dict(_BUCKETS[int(base)])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"unsupported base resolution {base!r}: expected one of {sorted(_BUCKETS)}") from None


def bucket_size(base: int, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) of one official bucket, e.g. ``bucket_size(1024, "16:9") == (768, 1376)``."""
    buckets = aspect_buckets(base)
    if aspect_ratio not in buckets:
        raise ValueError(f"unsupported aspect ratio {aspect_ratio!r}: expected one of {list(ASPECT_LABELS)}")
    return buckets[aspect_ratio]


def check_grid(grid, s_img: int) -> tuple[int, int]:
    """The latent grid (H′, W′) as ints, checked against the number of image tokens S_img = H′·W′."""
    gh, gw = (int(g) for g in grid)
    if gh * gw != s_img:
        raise ValueError(f"grid {tuple(grid)}: expected H'*W' = S_img = {s_img}, got {gh * gw}")
    return gh, gw


def validate_size(height: int, width: int) -> tuple[int, int]:
    """Check that the pixel size is positive and a multiple of 16; return the latent token grid (H/16, W/16)."""
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 16:
            raise ValueError(f"{name} must be a positive multiple of 16 pixels, got {v!r}")
    return height // 16, width // 16


# ---------------------------------------------------------------------------------------------------------
# Latent packing: ComfyUI LATENT [B,128,h,w] <-> packed tokens [B,h*w,128] (row-major over the grid)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, 128, h, w] (channel c·4 + p1·2 + p2) -> tokens [B, h·w, 128], row-major over (h, w)."""
    if x.ndim != 4:
        raise ValueError(f"pack_latents: expected a [B, C, h, w] latent, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(1, 2).contiguous()


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """tokens [B, h·w, C] -> [B, C, h, w] (the inverse of :func:`pack_latents`)."""
    if tokens.ndim != 3 or tokens.shape[1] != h * w:
        raise ValueError(f"unpack_latents: expected tokens [B, {h}*{w}={h * w}, C], got shape "
                         f"{tuple(tokens.shape)}")
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, h, w).contiguous()
