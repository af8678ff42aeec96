"""Lens DiT configuration, variant presets, resolution buckets, size validation and latent packing.

Spec: ../shared/docs/lens_dit_spec.md §2 (transformer/config.json), §4 (variant defaults) and §5 (latents,
buckets). Everything here is plain Python / tensor reshaping; no model code.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

from .lazy_torch import torch

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


def validate_size(height: int, width: int, names=("height", "width")) -> tuple[int, int]:
    """Check that the pixel size is positive and a multiple of 16; return the latent token grid (H/16, W/16).
    ``names``: how to call height and width in the message."""
    for name, v in zip(names, (height, width)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0 or v % 16:
            raise ValueError(f"{name} must be a positive multiple of 16 pixels, got {v!r}")
    return int(height) // 16, int(width) // 16


# ---------------------------------------------------------------------------------------------------------
# Limits of a generation request (checked before anything is allocated; the pipeline, the CLI and the
# ComfyUI nodes all call these). Facts: spec §3 step 6 (RoPE tables for positions −4096..4095, text positions
# start at max(H′//2, W′//2)), §5 (aspect 1:2 … 2:1, areas up to 1440²), §6 (at most 512 − 97 text tokens).

#: RoPE table length: max(H′//2, W′//2) + S_txt must stay below it (the official code fails beyond).
ROPE_POSITIONS = 4096
#: Largest text length the DiT sees: 512 tokens for the rendered template minus the 97-token crop.
MAX_TEXT_TOKENS = 512 - 97
#: Pixel budget of one image: 2048² (4.19 MP). The largest official bucket is 1440² (2.07 MP); 2048² is the
#: second pass of the hires workflow (1024² × 2). Larger sizes are outside what Lens was made for.
MAX_PIXELS = 2048 * 2048
#: Aspect range W/H of a generated image (the official buckets span 1:2 … 2:1).
MIN_ASPECT, MAX_ASPECT = 0.5, 2.0
#: Images per request (the CLI's --num-images, the pipeline's prompts × num_images, LensEmptyLatent's batch).
MAX_BATCH = 64
#: Sampling steps (the schedule has 1000 training timesteps; the variants use 4 … 50).
MAX_STEPS = 1000
#: An init image is resized to the generation size, but decoding it must stay bounded: 64 MP (8192²).
MAX_INIT_IMAGE_PIXELS = 8192 * 8192
#: Seeds are unsigned 64-bit (torch.Generator.manual_seed, ComfyUI's seed widget).
MAX_SEED = 2 ** 64 - 1


def check_int(value, name: str, low: int, high: int, fix: str = "") -> int:
    """``value`` as an int in [low, high]; ValueError naming ``name``, the range, the value found and the fix."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer in [{low}, {high}], found {value!r} "
                         f"({type(value).__name__}){'; fix: ' + fix if fix else ''}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name}: expected an integer in [{low}, {high}], found {int(value)}"
                         f"{'; fix: ' + fix if fix else ''}")
    return int(value)


def check_number(value, name: str, low: float | None = None, high: float | None = None, fix: str = "") -> float:
    """``value`` as a finite float (optionally in [low, high]); ValueError for NaN, ±inf, non-numbers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a number, found {value!r} ({type(value).__name__})"
                         f"{'; fix: ' + fix if fix else ''}")
    v = float(value)
    if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
        rng = f" in [{low}, {high}]" if low is not None and high is not None else \
            f" >= {low}" if low is not None else f" <= {high}" if high is not None else ""
        raise ValueError(f"{name}: expected a finite number{rng}, found {v!r}{'; fix: ' + fix if fix else ''}")
    return v


def check_finite_tensor(t: torch.Tensor, name: str) -> torch.Tensor:
    """ValueError if a floating tensor holds NaN or ±inf (they would give an all-black image)."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: expected finite values, found {bad} NaN/inf of {t.numel()} (shape "
                         f"{tuple(t.shape)}); fix: recompute or replace the input (NaN/inf gives a black image)")
    return t


def check_steps(steps, name: str = "steps") -> int:
    return check_int(steps, name, 1, MAX_STEPS, "Lens uses 20, Turbo 4, Base 50 steps")


def check_batch(n, name: str = "num_images") -> int:
    return check_int(n, name, 1, MAX_BATCH, f"generate at most {MAX_BATCH} images per request (repeat the "
                                            f"request for more)")


def check_seed(seed, name: str = "seed") -> int:
    return check_int(seed, name, 0, MAX_SEED, "use a seed in 0 … 2^64 − 1")


def check_pixels(height: int, width: int, what: str = "size", limit: int = MAX_PIXELS) -> None:
    """ValueError if height × width exceeds ``limit`` pixels (before any tensor of that size exists)."""
    if int(height) * int(width) > limit:
        side = int(math.isqrt(limit))
        raise ValueError(f"{what} {int(width)}×{int(height)} = {int(width) * int(height) / 1e6:.2f} MP: expected at "
                         f"most {limit / 1e6:.2f} MP ({side}×{side}; the official Lens sizes are the 1024/1440 "
                         f"buckets); fix: generate at a bucket size (aspect + base 1024/1440) and upscale afterwards")


def check_generation_size(height, width, what: str = "size", aspect: bool = True,
                          names=("height", "width")) -> tuple[int, int]:
    """The latent grid (H/16, W/16) of a generation request, refused beyond what Lens supports: a positive
    multiple of 16, at most :data:`MAX_PIXELS`, W/H in [1/2, 2] (``aspect=True``), RoPE positions in range."""
    gh, gw = validate_size(height, width, names)
    height, width = int(height), int(width)
    check_pixels(height, width, what)
    if aspect and not MIN_ASPECT <= width / height <= MAX_ASPECT:
        raise ValueError(f"{what} {width}×{height}: expected an aspect ratio W:H between 1:2 and 2:1 (what Lens "
                         f"supports), found {width / height:.3g}:1; fix: use one of the aspect buckets "
                         f"{list(ASPECT_LABELS)} or crop/pad afterwards")
    if max(gh // 2, gw // 2) + MAX_TEXT_TOKENS > ROPE_POSITIONS:
        raise ValueError(f"{what} {width}×{height}: the latent grid {gh}×{gw} needs RoPE positions up to "
                         f"{max(gh // 2, gw // 2) + MAX_TEXT_TOKENS}, expected at most {ROPE_POSITIONS}; fix: "
                         f"use a smaller size")
    return gh, gw


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
