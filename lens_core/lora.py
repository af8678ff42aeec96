"""LoRA / LoHa / LoKr adapters for the Lens DiT: read every trainer's file into one normalised adapter, apply it
to a ``LensTransformer`` with a strength, stack several, remove them again bit-exactly.

Facts (key names, defaults, who writes what): ../shared/docs/lora_gguf_reasoner.md §1.

Reading (:func:`load_lora`) is independent of the model. Every key is split into a module part and a factor
suffix; the module part loses its trainer prefix and is mapped to a Lens module name
(``transformer_blocks.N.attn.img_qkv`` …):

==============================  ===================================================================================
kohya / musubi-tuner            ``lora_unet_transformer_blocks_0_attn_img_qkv.lora_down.weight`` / ``lora_up`` /
                                ``.alpha`` (underscore-flattened names)
VideoX-Fun (comfyui file)       the same with ``lora_unet__``
OneTrainer                      ``transformer.transformer_blocks.0.attn.img_qkv.lora_down.weight`` …, LoHa ``hada_*``
diffusers / PEFT                ``[prefix.]transformer_blocks.0.attn.img_qkv.lora_A[.default].weight`` / ``lora_B``;
                                prefixes ``diffusion_model.``, ``transformer.``, ``base_model.model.`` …; alpha in
                                the ``lora_adapter_metadata`` JSON
SceneWorks LoKr (PEFT LoKr)     ``transformer_blocks.0.attn.img_qkv.lokr_w1`` / ``lokr_w2`` (or ``_a``/``_b``
                                halves, optional ``lokr_t2``), metadata ``networkType=lokr``, ``rank``, ``alpha``
==============================  ===================================================================================

Scale of one target (how the decision follows the trainer that wrote the file):

- a per-key ``.alpha`` tensor (kohya, musubi, VideoX-Fun, OneTrainer, LyCORIS): ``alpha / rank`` with the rank
  of the factors (LoRA: ``lora_down`` rows; LoHa: ``hada_w1_b`` rows). LyCORIS LoKr: ``alpha / rank`` of the
  decomposed half (``lokr_w1_b`` / ``lokr_w2_b`` rows); with both halves full, 1 (LyCORIS sets alpha = dim then).
- else metadata: diffusers/PEFT ``lora_adapter_metadata`` (``lora_alpha``, ``r``, ``alpha_pattern``,
  ``use_rslora``: ``alpha / sqrt(r)``); SceneWorks/PEFT LoKr (``networkType=lokr``, ``alpha``, ``rank``):
  ``alpha / rank`` **always**, as PEFT's LoKr scales even full ``w1``/``w2`` halves; kohya ``ss_network_alpha``
  (``alpha / rank`` of each target); a plain ``lora_alpha`` / ``alpha`` entry likewise.
- else 1 (alpha = rank, what every trainer means when it stores none).

Metadata is validated, not guessed: booleans (``use_rslora``) must be true/false (JSON or the strings), numbers
must be numbers, and a metadata rank (PEFT ``r`` / ``rank_pattern``, LoKr ``rank``) that disagrees with the
factors' rank is an error (the scale would depend on which one is believed). Scales above :data:`MAX_SCALE`
and factors beyond ±:data:`MAX_FACTOR_ABS` are refused when the file is read.

Applying (:func:`apply_lora`): a Linear with an ordinary float weight gets the deltas **merged** into its weight
(``W ← W + strength·scale·ΔW`` in fp32, rounded once into the weight's dtype, each adapter once when it is
applied: linear cost for a stack of at most :data:`MAX_STACK`; an exact copy of ``W₀`` is kept on the CPU), so a
forward costs nothing extra and :func:`remove_loras` restores ``W₀`` bit for bit. An apply is atomic: it is
checked whole first (strength within ±:data:`MAX_STRENGTH`, no weight beyond ±:data:`MAX_MERGED_ABS` or
non-finite) and a failure at any point leaves the model bit for bit as it was, the adapter unregistered. A layer
whose weight is produced at forward time (the quantized storage of :mod:`lens_core.quant_linear`) keeps its
storage and gets the delta **per call**: it adds ``strength·scale·ΔW`` to its dequantized weight before the
matmul (:meth:`LoraDelta.patch_weight`: the hand merge, also for formats whose own path quantizes activations);
any other layer with a non-float weight gets a forward hook adding ``strength·scale·ΔW x`` (LoRA as two thin
matmuls, LoKr through the Kronecker identity, LoHa from the materialised ΔW) to its output. Both read the module
attribute ``lens_lora_deltas`` (a tuple of :class:`LoraDelta`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings

import torch
import torch.nn.functional as F

from .checkpoints import CheckpointError, SafetensorsFile, detect

# --------------------------------------------------------------------------------------------------------
# Lens module vocabulary (the Linear layers of LensTransformer, names as in the checkpoints)

BLOCK_TARGETS = ("attn.img_qkv", "attn.txt_qkv", "attn.to_out.0", "attn.to_add_out",
                 "img_mlp.w1", "img_mlp.w2", "img_mlp.w3", "txt_mlp.w1", "txt_mlp.w2", "txt_mlp.w3",
                 "img_mod.1", "txt_mod.1")
GLOBAL_TARGETS = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
                  "time_text_embed.timestep_embedder.linear_2")
_FLAT_BLOCK = {t.replace(".", "_"): t for t in BLOCK_TARGETS}
_FLAT_GLOBAL = {t.replace(".", "_"): t for t in GLOBAL_TARGETS}
_DOTTED_RE = re.compile(r"transformer_blocks\.(\d{1,4})\.(" + "|".join(map(re.escape, BLOCK_TARGETS)) + r")")
_FLAT_RE = re.compile(r"transformer_blocks_(\d{1,4})_(" + "|".join(map(re.escape, _FLAT_BLOCK)) + r")")

# prefixes trainers put in front of the module name (longest first)
DOTTED_PREFIXES = ("base_model.model.transformer.", "base_model.model.", "model.diffusion_model.",
                   "diffusion_model.", "transformer.", "unet.")
FLAT_PREFIXES = ("lora_unet__", "lora_unet_", "lora_transformer_", "lycoris_")

# factor suffix -> (kind, role); checked longest first
SUFFIXES = {
    ".lora_down.weight": ("lora", "down"), ".lora_up.weight": ("lora", "up"),
    ".lora.down.weight": ("lora", "down"), ".lora.up.weight": ("lora", "up"),
    ".lora_A.weight": ("lora", "down"), ".lora_B.weight": ("lora", "up"),
    ".lora_A.default.weight": ("lora", "down"), ".lora_B.default.weight": ("lora", "up"),
    ".hada_w1_a": ("loha", "w1a"), ".hada_w1_b": ("loha", "w1b"),
    ".hada_w2_a": ("loha", "w2a"), ".hada_w2_b": ("loha", "w2b"),
    ".hada_t1": ("loha", "t1"), ".hada_t2": ("loha", "t2"),
    ".lokr_w1": ("lokr", "w1"), ".lokr_w1_a": ("lokr", "w1a"), ".lokr_w1_b": ("lokr", "w1b"),
    ".lokr_w2": ("lokr", "w2"), ".lokr_w2_a": ("lokr", "w2a"), ".lokr_w2_b": ("lokr", "w2b"),
    ".lokr_t2": ("lokr", "t2"),
    ".alpha": (None, "alpha"),
    ".dora_scale": (None, "dora"), ".lora_magnitude_vector": (None, "dora"),
    ".lora_magnitude_vector.default": (None, "dora"), ".lora_magnitude_vector.default.weight": (None, "dora"),
    ".lora_magnitude_vector.weight": (None, "dora"), ".lora_mid.weight": (None, "mid"),
}
_SUFFIX_ORDER = sorted(SUFFIXES, key=len, reverse=True)

# LoRA files of other models: (pattern in the key with '.' → '_', what it is). First match wins.
FOREIGN_LORAS = (
    ("lora_te2_", "an SDXL LoRA (UNet + two CLIP text encoders)"),
    ("text_encoder_2_", "an SDXL LoRA (UNet + two CLIP text encoders)"),
    ("input_blocks_", "a Stable Diffusion 1.x/2.x/SDXL UNet LoRA"),
    ("down_blocks_", "a Stable Diffusion 1.x/2.x/SDXL UNet LoRA"),
    ("lora_te_", "a Stable Diffusion 1.x/2.x LoRA (UNet + CLIP text encoder)"),
    ("lora_te1_", "an SDXL LoRA (UNet + two CLIP text encoders)"),
    ("double_blocks_", "a FLUX (or HunyuanVideo) LoRA (double_blocks / single_blocks)"),
    ("single_transformer_blocks_", "a FLUX LoRA (diffusers names)"),
    ("single_blocks_", "a FLUX (or HunyuanVideo) LoRA (double_blocks / single_blocks)"),
    ("joint_blocks_", "a Stable Diffusion 3 LoRA"),
    ("img_mlp_net_", "a Qwen-Image LoRA"),
    ("attn_add_q_proj", "a Qwen-Image LoRA"),
    ("cross_attn_", "a Wan video LoRA"),
    ("blocks_0_self_attn_", "a Wan video LoRA"),
    ("attention_to_q", "a Lumina2 / Z-Image LoRA"),
    ("self_attn_q_proj", "a LoRA for a language / text-encoder model"),
    ("attn_to_q", "a LoRA for another diffusion transformer (separate to_q/to_k/to_v; Lens fuses img_qkv)"),
)

MAX_KEYS = 100_000
MAX_RANK = 65_536
WARN_NAMES = 5
#: |strength| limit (ComfyUI's own LoraLoader offers -100 … 100; a useful Lens LoRA strength is within ±2).
MAX_STRENGTH = 100.0
#: Largest scale (alpha / rank, or the metadata's alpha / r) a target may have. Trainers write alpha between
#: 1 and a few times the rank (scales 1/128 … 16 in the files we know); 1000 leaves a wide margin.
MAX_SCALE = 1000.0
#: Largest |value| of a factor: a trainer's factors are O(1) and fit fp16 (±65504) whatever they are stored in.
MAX_FACTOR_ABS = 65504.0
#: Largest |weight| a merge may produce (the fp16 range). Lens DiT weights are O(1); beyond this an adapter
#: (or its strength/scale) is broken and the image would come out black (activations overflow to inf/NaN).
MAX_MERGED_ABS = 65504.0
#: Adapters one model may hold at once (stacked :func:`apply_lora` calls, strength-0 ones included).
MAX_STACK = 32


class LoraError(CheckpointError):
    """A LoRA file that cannot be read or does not fit the model (a ValueError)."""


# --------------------------------------------------------------------------------------------------------
# the normalised adapter


@dataclasses.dataclass
class LoraTarget:
    """One Lens Linear's adapter: ``kind`` lora / loha / lokr, fp32 ``factors``, ``scale``.

    lora: ``up`` [out, r], ``down`` [r, in]  (ΔW = up @ down)
    loha: ``w1a`` [out, r1], ``w1b`` [r1, in], ``w2a`` [out, r2], ``w2b`` [r2, in]  (ΔW = (w1a@w1b) ⊙ (w2a@w2b))
    lokr: ``w1`` [a, b], ``w2`` [c, d] (halves given as ``_a@_b`` products are kept as ``w1a``/``w1b`` …)
          (ΔW = kron(w1, w2), shape [a·c, b·d])
    """
    kind: str
    factors: dict
    scale: float
    key: str            # the first file key of this target (for messages)

    @property
    def shape(self) -> tuple[int, int]:
        f = self.factors
        if self.kind == "lora":
            return f["up"].shape[0], f["down"].shape[1]
        if self.kind == "loha":
            return f["w1a"].shape[0], f["w1b"].shape[1]
        (a, b), (c, d) = _lokr_half_shape(f, "w1"), _lokr_half_shape(f, "w2")
        return a * c, b * d

    def half(self, which: str, dtype=torch.float32, device=None) -> torch.Tensor:
        """LoKr: the full ``w1`` / ``w2`` (product of its ``_a``/``_b`` halves when decomposed)."""
        f = self.factors
        if which in f:
            return f[which].to(device=device, dtype=dtype)
        return f[which + "a"].to(device=device, dtype=dtype) @ f[which + "b"].to(device=device, dtype=dtype)

    def delta(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """``scale · ΔW`` [out, in], computed in fp32 and returned in ``dtype``."""
        f = {k: v.to(device=device, dtype=torch.float32) for k, v in self.factors.items()}
        if self.kind == "lora":
            d = f["up"] @ f["down"]
        elif self.kind == "loha":
            d = (f["w1a"] @ f["w1b"]) * (f["w2a"] @ f["w2b"])
        else:
            d = torch.kron(self.half("w1", device=device), self.half("w2", device=device))
        return (d * self.scale).to(dtype)


def _lokr_half_shape(f: dict, which: str) -> tuple[int, int]:
    if which in f:
        return tuple(f[which].shape)
    return f[which + "a"].shape[0], f[which + "b"].shape[1]


@dataclasses.dataclass
class LoraAdapter:
    """A normalised adapter: Lens module name → :class:`LoraTarget`, independent of any model."""
    targets: dict
    path: str
    format: str                 # kohya / videox-fun / onetrainer / peft / lycoris (what the keys looked like)
    unmatched: list = dataclasses.field(default_factory=list)   # file keys that name no Lens layer

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def __repr__(self):
        kinds = sorted({t.kind for t in self.targets.values()})
        return f"LoraAdapter({self.name!r}, {self.format}, {len(self.targets)} targets, {'/'.join(kinds)})"


# --------------------------------------------------------------------------------------------------------
# reading


def _split_key(key: str):
    """(module part, kind, role) or None when the key has no known factor suffix."""
    for suf in _SUFFIX_ORDER:
        if key.endswith(suf) and len(key) > len(suf):
            kind, role = SUFFIXES[suf]
            return key[: -len(suf)], kind, role
    return None


def lens_module_name(module: str) -> tuple[str | None, str]:
    """(Lens module name or None, key style) for the module part of a LoRA key."""
    for p in FLAT_PREFIXES:
        if module.startswith(p):
            flat = module[len(p):]
            style = "videox-fun" if p == "lora_unet__" else "kohya"
            m = _FLAT_RE.fullmatch(flat)
            if m:
                return f"transformer_blocks.{int(m.group(1))}.{_FLAT_BLOCK[m.group(2)]}", style
            return _FLAT_GLOBAL.get(flat), style
    style = "peft"
    for p in DOTTED_PREFIXES:
        if module.startswith(p):
            module = module[len(p):]
            style = "onetrainer" if p == "transformer." else "peft"
            break
    m = _DOTTED_RE.fullmatch(module)
    if m:
        return f"transformer_blocks.{int(m.group(1))}.{m.group(2)}", style
    return (module if module in GLOBAL_TARGETS else None), style


def _number(value, what: str, path: str) -> float | None:
    """A finite positive float from a metadata value (str / number), None for 'None'/empty; error otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, bool):
        raise LoraError(f"{path}: metadata {what} = {value!r}: expected a number, found a boolean")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise LoraError(f"{path}: metadata {what} = {value!r}: expected a number") from None
    if not math.isfinite(x) or x <= 0:
        raise LoraError(f"{path}: metadata {what} = {value!r}: expected a finite positive number")
    return x


def _flag(value, what: str, path: str) -> bool:
    """A metadata boolean, parsed strictly: JSON true/false, or the strings "true"/"false" (any case); anything
    else (e.g. "no", 1, "0") is an error rather than a guess (``bool("false")`` is True)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise LoraError(f"{path}: metadata {what} = {value!r}: expected true or false; fix: correct the metadata "
                    f"(it decides the scale: alpha/sqrt(r) when true, alpha/r when false)")


@dataclasses.dataclass
class _MetaAlpha:
    alpha: float | None = None
    source: str = ""                 # "peft" / "peft-lokr" / "kohya" / ""
    rslora: bool = False
    rank: float | None = None        # the adapter-wide rank (PEFT LoKr halves may all be full; PEFT ``r``)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    rank_pattern: dict = dataclasses.field(default_factory=dict)


def _metadata_alpha(md: dict, path: str) -> _MetaAlpha:
    """The adapter-wide alpha from safetensors metadata (None when the file stores none)."""
    raw = md.get("lora_adapter_metadata")
    if raw is not None:
        try:
            cfg = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as exc:
            raise LoraError(f"{path}: metadata lora_adapter_metadata is not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise LoraError(f"{path}: metadata lora_adapter_metadata: expected a JSON object")
        pattern = cfg.get("alpha_pattern") or {}
        if not isinstance(pattern, dict):
            raise LoraError(f"{path}: metadata alpha_pattern: expected a JSON object")
        pattern = {str(k): _number(v, f"alpha_pattern[{k!r}]", path) for k, v in pattern.items()}
        ranks = cfg.get("rank_pattern") or {}
        if not isinstance(ranks, dict):
            raise LoraError(f"{path}: metadata rank_pattern: expected a JSON object")
        ranks = {str(k): _number(v, f"rank_pattern[{k!r}]", path) for k, v in ranks.items()}
        alpha = _number(cfg.get("lora_alpha", cfg.get("alpha")), "lora_alpha", path)
        return _MetaAlpha(alpha, "peft", _flag(cfg.get("use_rslora", False), "use_rslora", path),
                          _number(cfg.get("r"), "r", path), pattern, ranks)
    ntype = str(md.get("networkType", md.get("network_type", ""))).lower()
    if ntype == "lokr":
        return _MetaAlpha(_number(md.get("alpha", md.get("lora_alpha")), "alpha", path), "peft-lokr",
                          rank=_number(md.get("rank", md.get("r")), "rank", path))
    for k in ("ss_network_alpha", "lora_alpha", "alpha"):
        if k in md:
            return _MetaAlpha(_number(md[k], k, path), "kohya")
    return _MetaAlpha()


def _pattern_alpha(meta: _MetaAlpha, name: str) -> float | None:
    for pat, a in meta.alpha_pattern.items():
        if name == pat or name.endswith("." + pat):
            return a
    return meta.alpha


def _pattern_rank(meta: _MetaAlpha, name: str) -> float | None:
    for pat, r in meta.rank_pattern.items():
        if name == pat or name.endswith("." + pat):
            return r
    return meta.rank


def _foreign(keys) -> tuple[str, str] | None:
    """(what the file is, an example key) from the most specific other-model signature found, or None."""
    flat = [(k.replace(".", "_"), k) for k in keys]
    for pat, what in FOREIGN_LORAS:
        for f, k in flat:
            if pat in f:
                return what, k
    return None


def _check_2d(t: torch.Tensor, key: str, path: str):
    if t.ndim != 2:
        if t.ndim == 4 and t.shape[2:] == (1, 1):
            return t[:, :, 0, 0]
        raise LoraError(f"{path}: {key}: expected a 2-D factor for a Linear layer, found shape {tuple(t.shape)}")
    return t


def _build_target(name: str, kind: str, parts: dict, keys: dict, alpha, meta: _MetaAlpha, path: str) -> LoraTarget:
    """Validate one module's factors and decide its scale (see the module docstring)."""
    need = {"lora": ("up", "down"), "loha": ("w1a", "w1b", "w2a", "w2b")}.get(kind)
    if kind == "lokr":
        for h in ("w1", "w2"):
            if h not in parts and not (h + "a" in parts and h + "b" in parts):
                raise LoraError(f"{path}: LoKr target {name}: expected lokr_{h} or lokr_{h}_a + lokr_{h}_b, "
                                f"found {sorted(keys.values())}")
    else:
        missing = [r for r in need if r not in parts]
        if missing:
            raise LoraError(f"{path}: {kind} target {name}: factor(s) {missing} missing (found "
                            f"{sorted(keys.values())})")
    if kind == "loha" and ("t1" in parts or "t2" in parts):
        raise LoraError(f"{path}: {keys[next(iter(keys))]}: Tucker LoHa (hada_t1/hada_t2) is for convolutions; "
                        f"the Lens DiT has only Linear layers")
    f = {}
    for role, t in parts.items():
        if role == "t2":
            continue
        f[role] = _check_2d(t, keys[role], path)
    first = keys[sorted(keys)[0]]
    rank = None
    if kind == "lora":
        if f["up"].shape[1] != f["down"].shape[0]:
            raise LoraError(f"{path}: {keys['up']} {tuple(f['up'].shape)} and {keys['down']} "
                            f"{tuple(f['down'].shape)}: ranks differ")
        rank = f["down"].shape[0]
    elif kind == "loha":
        if f["w1a"].shape[1] != f["w1b"].shape[0] or f["w2a"].shape[1] != f["w2b"].shape[0] or \
                f["w1a"].shape[0] != f["w2a"].shape[0] or f["w1b"].shape[1] != f["w2b"].shape[1]:
            raise LoraError(f"{path}: LoHa target {name}: inconsistent factor shapes "
                            f"{ {keys[r]: tuple(f[r].shape) for r in ('w1a', 'w1b', 'w2a', 'w2b')} }")
        rank = f["w1b"].shape[0]
    else:
        if "t2" in parts:       # Tucker w2 (LyCORIS/PEFT conv form; w2_a is [r, c] there): fold it for a Linear
            t2 = parts["t2"]
            if "w2a" not in f or "w2b" not in f or t2.ndim not in (2, 4) or (t2.ndim == 4 and t2.shape[2:] != (1, 1)):
                raise LoraError(f"{path}: {keys['t2']}: a Tucker lokr_t2 needs lokr_w2_a/_b and a 1×1 kernel, "
                                f"found shape {tuple(t2.shape)}")
            t2 = t2.reshape(t2.shape[0], t2.shape[1])
            a, b = f.pop("w2a"), f.pop("w2b")
            if a.shape[0] != t2.shape[0] or t2.shape[1] != b.shape[0]:
                raise LoraError(f"{path}: {keys['t2']} {tuple(t2.shape)} does not fit lokr_w2_a "
                                f"{tuple(a.shape)} / lokr_w2_b {tuple(b.shape)}")
            rank = b.shape[0]
            f["w2"] = a.float().t() @ t2.float() @ b.float()
        for h in ("w1", "w2"):
            if h not in f:
                if f[h + "a"].shape[1] != f[h + "b"].shape[0]:
                    raise LoraError(f"{path}: {keys[h + 'a']} {tuple(f[h + 'a'].shape)} and {keys[h + 'b']} "
                                    f"{tuple(f[h + 'b'].shape)}: ranks differ")
                rank = f[h + "b"].shape[0]
    for role, t in f.items():
        if not t.is_floating_point():
            raise LoraError(f"{path}: {keys.get(role, first)}: expected a float tensor, found {t.dtype}")
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise LoraError(f"{path}: {keys.get(role, first)}: contains NaN or infinity")
        big = float(t.abs().max()) if t.numel() else 0.0
        if big > MAX_FACTOR_ABS:
            raise LoraError(f"{path}: {keys.get(role, first)}: holds values up to {big:.3g}; expected factors "
                            f"within ±{MAX_FACTOR_ABS:g} (trained LoRA factors are O(1)); the file is corrupt or "
                            f"was exported wrongly")
    if rank is not None and not 0 < rank <= MAX_RANK:
        raise LoraError(f"{path}: target {name}: rank {rank} out of range 1..{MAX_RANK}")
    if alpha is None and meta.source in ("peft", "peft-lokr") and rank is not None:
        meta_r = _pattern_rank(meta, name)
        if meta_r is not None and meta_r != rank:
            what = "r" if meta.source == "peft" else "rank"
            a = _pattern_alpha(meta, name)
            raise LoraError(f"{path}: target {name}: metadata {what}={meta_r:g} but its factors have rank {rank} "
                            f"({keys[sorted(keys)[0]]}); the scale would be {a}/{meta_r:g} by the metadata or "
                            f"{a}/{rank} by the factors. Fix: correct the metadata's {what} (or re-export the "
                            f"adapter); the file disagrees with itself")

    # scale
    if alpha is not None:                                   # per-key .alpha (kohya / LyCORIS meaning)
        scale = 1.0 if (kind == "lokr" and rank is None) else alpha / rank
    else:
        a = _pattern_alpha(meta, name)
        if a is None or rank is None and meta.source != "peft-lokr":
            scale = 1.0
        elif meta.source == "peft-lokr":                    # PEFT LoKr: alpha / r even for full halves
            r = rank if rank is not None else meta.rank
            scale = a / r if r else 1.0
        elif meta.source == "peft" and meta.rslora:
            scale = a / math.sqrt(rank)
        else:
            scale = a / rank
    if not (math.isfinite(scale) and 0 < scale <= MAX_SCALE):
        a = alpha if alpha is not None else _pattern_alpha(meta, name)
        raise LoraError(f"{path}: target {name} ({first}): scale {scale:.3g} (alpha {a!r} / rank {rank}); expected "
                        f"at most {MAX_SCALE:g} (trainers write alpha between 1 and a few times the rank). Fix: "
                        f"correct the alpha (.alpha tensors or metadata) or re-export")
    f = {k: v.float().contiguous() for k, v in f.items()}
    return LoraTarget(kind, f, float(scale), first)



def load_lora(path) -> LoraAdapter:
    """Read a LoRA / LoHa / LoKr safetensors file of any Lens trainer into a :class:`LoraAdapter`.

    Errors (:class:`LoraError`, a ValueError) for pickles, non-safetensors, a LoRA of another model (named),
    a Lens checkpoint that is not a LoRA, incomplete factor sets, NaN/inf. Keys naming no Lens layer give one
    warning with their count and first names.
    """
    path = os.fspath(path)
    st = SafetensorsFile(path)          # refuses pickles / GGUF / truncated files with a message
    try:
        keys = list(st.entries)
        if len(keys) > MAX_KEYS:
            raise LoraError(f"{path}: {len(keys)} tensors: more than the {MAX_KEYS} any LoRA of the Lens DiT has")
        meta = _metadata_alpha(st.metadata, path)
        groups: dict = {}
        unmatched, styles, foreign_like = [], set(), []
        for k in keys:
            sp = _split_key(k)
            if sp is None:
                unmatched.append(k)
                continue
            module, kind, role = sp
            name, style = lens_module_name(module)
            if name is None:
                unmatched.append(k)
                foreign_like.append(k)
                continue
            styles.add(style)
            g = groups.setdefault(name, {"kinds": set(), "parts": {}, "keys": {}})
            if kind is not None:
                g["kinds"].add(kind)
            if role in g["parts"]:
                raise LoraError(f"{path}: {k} and {g['keys'][role]} both give the {role} factor of {name} "
                                f"(two key styles for one layer)")
            if role == "mid":
                raise LoraError(f"{path}: {k}: LoCon mid (Tucker) weights are for convolutions; the Lens DiT has "
                                f"only Linear layers")
            if role == "dora":
                raise LoraError(f"{path}: {k}: DoRA adapters are not supported (only LoRA, LoHa and LoKr); "
                                f"re-export without DoRA")
            if st.entries[k].dtype not in ("F32", "F16", "BF16", "F64"):
                raise LoraError(f"{path}: {k}: expected a float tensor (F32/F16/BF16), found {st.entries[k].dtype}")
            g["parts"][role] = st.read(k)
            g["keys"][role] = k
        # another model's LoRA may share a few names with Lens (Qwen-Image has img_mod.1 / txt_mod.1 too): any
        # key with another model's signature decides
        found = _foreign(unmatched)
        if found is not None:
            raise LoraError(f"{path}: this is {found[0]}, not a LoRA for the Lens DiT (e.g. key {found[1]!r}); "
                            f"use it with its own model")
        if not groups:
            det = detect(keys)
            if det.component is not None:
                raise LoraError(f"{path}: this is {det.description}, not a LoRA for the Lens DiT; load it with "
                                f"the model loaders")
            raise LoraError(f"{path}: none of its {len(keys)} keys names a Lens DiT layer (e.g. "
                            f"{sorted(keys)[:WARN_NAMES]}); expected keys like "
                            f"'lora_unet_transformer_blocks_0_attn_img_qkv.lora_down.weight' or "
                            f"'transformer_blocks.0.attn.img_qkv.lora_A.weight'")
        targets = {}
        for name, g in groups.items():
            kinds = g["kinds"]
            if len(kinds) != 1:
                desc = "only an alpha" if not kinds else f"mixed factor kinds {sorted(kinds)}"
                raise LoraError(f"{path}: layer {name}: {desc} ({sorted(g['keys'].values())})")
            kind = next(iter(kinds))
            alpha = None
            if "alpha" in g["parts"]:
                t = g["parts"].pop("alpha")
                if t.numel() != 1:
                    raise LoraError(f"{path}: {g['keys']['alpha']}: expected a scalar alpha, found shape "
                                    f"{tuple(t.shape)}")
                alpha = _number(float(t.reshape(())), g["keys"]["alpha"], path)
            targets[name] = _build_target(name, kind, g["parts"], g["keys"], alpha, meta, path)
        if meta.source == "peft-lokr":
            fmt = "sceneworks-lokr"
        else:
            fmt = "+".join(sorted(styles))
        adapter = LoraAdapter(dict(sorted(targets.items(), key=lambda kv: _order(kv[0]))), path, fmt, unmatched)
        if unmatched:
            warnings.warn(f"{path}: {len(unmatched)} key(s) name no Lens DiT layer and are not used, e.g. "
                          f"{unmatched[:WARN_NAMES]}", UserWarning, stacklevel=2)
        return adapter
    finally:
        st.close()


def _order(name: str):
    m = re.match(r"transformer_blocks\.(\d+)\.(.*)", name)
    return (1, int(m.group(1)), m.group(2)) if m else (0, 0, name)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:STRENGTH]`` (the CLI's ``--lora``) → (path, strength); a Windows drive colon is kept."""
    path, strength = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and not ("/" in tail or "\\" in tail):
        try:
            strength = float(tail)
            path = head
        except ValueError:
            pass
    if not math.isfinite(strength):
        raise ValueError(f"--lora {text!r}: strength must be a finite number, got {strength}")
    if not path:
        raise ValueError(f"--lora {text!r}: expected FILE[:STRENGTH]")
    check_strength(strength, f"--lora {text!r}: strength")
    return path, strength


def check_strength(strength, what="strength") -> float:
    """``strength`` as a finite float within ±:data:`MAX_STRENGTH`; ValueError naming ``what`` otherwise."""
    if isinstance(strength, bool):
        raise ValueError(f"LoRA {what}: expected a number, got {strength!r}")
    try:
        s = float(strength)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"LoRA {what}: expected a number, got {strength!r}") from None
    if not math.isfinite(s):
        raise ValueError(f"LoRA {what}: expected a finite number, got {strength!r}")
    if abs(s) > MAX_STRENGTH:
        raise ValueError(f"LoRA {what}: expected a value within ±{MAX_STRENGTH:g}, got {strength!r}; fix: a "
                         f"strength around 0.5 … 1.5 (negative values invert the adapter)")
    return s


# --------------------------------------------------------------------------------------------------------
# applying


def is_per_call(module) -> bool:
    """Whether ``module``'s weight is produced at forward time (quantized storage): deltas go per call."""
    w = getattr(module, "weight", None)
    if hasattr(module, "dequantized_weight"):
        return True
    return not (isinstance(w, torch.Tensor) and w.dtype in (torch.float32, torch.float16, torch.bfloat16,
                                                            torch.float64))


def module_shape(module) -> tuple[int, int] | None:
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if isinstance(out_f, int) and isinstance(in_f, int):
        return out_f, in_f
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.ndim == 2:
        return tuple(w.shape)
    return None


def resolve_targets(model, adapter: LoraAdapter) -> dict:
    """{module name: module} of ``adapter``'s targets present in ``model``; errors for shape mismatches (the
    first one, both shapes), one warning for targets the model lacks. Nothing is modified."""
    found, missing = {}, []
    for name, t in adapter.targets.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            missing.append(t.key)
            continue
        want = module_shape(mod)
        if want is None:
            missing.append(t.key)
            continue
        if tuple(t.shape) != tuple(want):
            raise LoraError(f"{adapter.path}: {t.key}: the LoRA changes a [{t.shape[0]}, {t.shape[1]}] weight but "
                            f"this model's {name} is [{want[0]}, {want[1]}]; the LoRA was trained for a Lens model "
                            f"of another size")
        found[name] = mod
    if missing:
        warnings.warn(f"{adapter.path}: {len(missing)} LoRA target(s) match no layer of this model and are not used, "
                      f"e.g. {missing[:WARN_NAMES]}", UserWarning, stacklevel=3)
    if not found:
        raise LoraError(f"{adapter.path}: none of its {len(adapter.targets)} targets exists in this model")
    return found


class LoraDelta:
    """``coef · ΔW x`` for one target, added to a per-call layer's output (factors cast once per device/dtype)."""

    def __init__(self, target: LoraTarget, coef: float):
        self.target, self.coef = target, float(coef)
        self._cache: dict = {}

    def _factors(self, dtype, device):
        key = (dtype, str(device))
        if key not in self._cache:
            self._cache.clear()
            t = self.target
            if t.kind == "lora":
                self._cache[key] = (t.factors["down"].to(device, dtype), t.factors["up"].to(device, dtype))
            elif t.kind == "lokr":
                self._cache[key] = (t.half("w1", device=device).to(dtype), t.half("w2", device=device).to(dtype))
            else:
                self._cache[key] = tuple(t.factors[r].to(device, dtype) for r in ("w1a", "w1b", "w2a", "w2b"))
        return self._cache[key]

    def patch_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``w + coef·scale·ΔW`` summed in fp32 and rounded once to ``w``'s dtype: the per-call patch a quantized
        layer (lens_core.quant_linear) applies to its dequantized weight (= the hand merge of that weight)."""
        acc = w.to(torch.float32, copy=True)
        if self.target.kind == "lora":
            down, up = self._factors(torch.float32, w.device)
            acc.addmm_(up, down, alpha=self.coef * self.target.scale)
        else:
            acc.add_(self.target.delta(torch.float32, w.device), alpha=self.coef)
        return acc.to(w.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t, c = self.target, self.coef * self.target.scale
        f = self._factors(x.dtype, x.device)
        if t.kind == "lora":
            return F.linear(F.linear(x, f[0]), f[1]) * c
        if t.kind == "lokr":            # kron(w1, w2) x = vec(w1 · X · w2ᵀ), X = x viewed [b, d]
            w1, w2 = f
            xs = x.reshape(*x.shape[:-1], w1.shape[1], w2.shape[1])
            y = torch.matmul(torch.matmul(w1, xs), w2.t())
            return y.reshape(*x.shape[:-1], w1.shape[0] * w2.shape[0]) * c
        w1a, w1b, w2a, w2b = f
        return F.linear(x, (w1a @ w1b) * (w2a @ w2b)) * c


def _delta_hook(module, args, output):
    deltas = getattr(module, "lens_lora_deltas", ())
    if not deltas:
        return None
    x = args[0]
    for d in deltas:
        output = output + d(x)
    return output


def install_delta_hook(module):
    """Give ``module`` the per-call delta hook (once) and an empty ``lens_lora_deltas``. The quantized storage
    classes (lens_core.quant_linear.QuantStorage) apply ``lens_lora_deltas`` to their dequantized weight
    themselves (:meth:`LoraDelta.patch_weight`) and get no hook."""
    if not hasattr(module, "lens_lora_deltas"):
        module.lens_lora_deltas = ()
    if hasattr(module, "weight_patches"):
        return
    if not getattr(module, "_lens_lora_hooked", False):
        module.register_forward_hook(_delta_hook)
        module._lens_lora_hooked = True


def _state(model) -> dict:
    st = getattr(model, "_lens_lora_state", None)
    if st is None:
        st = {"applied": [], "backup": {}}
        model._lens_lora_state = st
    return st


def _abs_bound(t: LoraTarget) -> float:
    """An upper bound of max |ΔW| (without ``scale``) from the factors alone, in float64: cheap (no ΔW)."""
    f = t.factors

    def prod_bound(a, b):           # max |a @ b| <= max_i Σ_r |a_ir| · max |b|
        return float(a.abs().double().sum(dim=1).max()) * float(b.abs().max()) if a.numel() and b.numel() else 0.0

    if t.kind == "lora":
        return prod_bound(f["up"], f["down"])
    if t.kind == "loha":
        return prod_bound(f["w1a"], f["w1b"]) * prod_bound(f["w2a"], f["w2b"])
    halves = []
    for h in ("w1", "w2"):          # max |kron(w1, w2)| = max |w1| · max |w2|
        halves.append(float(f[h].abs().max()) if h in f else prod_bound(f[h + "a"], f[h + "b"]))
    return halves[0] * halves[1]


def _weight_abs_max(w: torch.Tensor) -> float:
    lo_, hi = torch.aminmax(w.detach())
    return max(abs(float(lo_)), abs(float(hi)))


def check_merge(adapter: LoraAdapter, strength: float, mods: dict):
    """Refuse (LoraError, nothing modified) an adapter whose ``strength · scale · ΔW`` would push a weight
    beyond ±:data:`MAX_MERGED_ABS` (or to inf/NaN): a bound from the factors first (no ΔW built); only where
    that bound is too loose is the exact ΔW of that one layer computed."""
    for name, mod in mods.items():
        t = adapter.targets[name]
        coef = abs(strength * t.scale)
        w = getattr(mod, "weight", None)
        base = _weight_abs_max(w) if not is_per_call(mod) and w.numel() else 0.0
        if base + coef * _abs_bound(t) <= MAX_MERGED_ABS:
            continue
        d = t.delta(torch.float32, "cpu") * float(strength)
        if not is_per_call(mod):
            d += w.detach().to("cpu", torch.float32)
        worst = float(d.abs().max()) if bool(torch.isfinite(d).all()) else math.inf
        if worst > MAX_MERGED_ABS:
            raise LoraError(f"{adapter.path}: {t.key}: at strength {strength:g} (scale {t.scale:.3g}) the adapter "
                            f"makes {name}'s weights reach {worst:.3g}; expected at most ±{MAX_MERGED_ABS:g} (Lens "
                            f"weights are O(1): the result would be a black image). Fix: a smaller strength, or "
                            f"check the file's alpha/factors (re-export the adapter)")


def _merge_step(model, name: str, module, target: LoraTarget, coef: float):
    """One adapter merged into a float Linear: W ← W + coef·scale·ΔW, in fp32, rounded once into W's dtype.
    The exact original is kept on the CPU the first time (for :func:`remove_loras`)."""
    st = _state(model)
    w = module.weight
    if name not in st["backup"]:
        st["backup"][name] = w.detach().to("cpu", copy=True)
    if coef == 0.0:
        return
    with torch.no_grad():
        acc = w.detach().to(torch.float32, copy=True)
        if target.kind == "lora":       # fused acc += c·scale·(up @ down), no ΔW temporary
            f = target.factors
            acc.addmm_(f["up"].to(w.device), f["down"].to(w.device), alpha=coef * target.scale)
        else:
            acc.add_(target.delta(torch.float32, w.device), alpha=coef)
        lo_, hi = torch.aminmax(acc)
        if not (math.isfinite(float(lo_)) and math.isfinite(float(hi))):
            raise LoraError(f"{target.key}: merging gives non-finite weights in {name}")
        w.copy_(acc)


def _entries_for(model, name: str) -> list:
    return [(a.targets[name], s) for a, s in _state(model)["applied"] if name in a.targets]


def _restore(model, name: str, module, entries):
    """A merged layer back to backup + ``entries`` merged one by one in their order (the same operations as
    when they were applied, so the same bits)."""
    st = _state(model)
    if name not in st["backup"]:
        return
    with torch.no_grad():
        module.weight.copy_(st["backup"][name])
    for t, c in entries:
        _merge_step(model, name, module, t, c)


def apply_lora(model, adapter, strength: float = 1.0) -> list[str]:
    """Apply ``adapter`` (a :class:`LoraAdapter` or a path) to ``model`` with ``strength``; adapters stack (at
    most :data:`MAX_STACK`).

    Float Linears get the delta merged into their weight (exact backup kept on the CPU): each adapter is merged
    once, when applied (cost linear in the number of adapters; a stack is rounded once per adapter). Layers
    with quantized storage get it per call. Returns the names of the patched modules. Strength 0 changes
    nothing.

    Atomic: the whole adapter is checked first (:func:`check_merge`: no weight may leave ±:data:`MAX_MERGED_ABS`
    or become NaN/inf); if anything fails, even half-way through merging, the model is left bit for bit as it
    was and the adapter is not registered.
    """
    s = check_strength(strength)
    if not isinstance(adapter, LoraAdapter):
        adapter = load_lora(adapter)
    st = _state(model)
    if len(st["applied"]) >= MAX_STACK:
        raise LoraError(f"{adapter.path}: {len(st['applied'])} adapters are already applied to this model; at most "
                        f"{MAX_STACK} stack. Fix: remove some (remove_loras / fewer --lora), or merge several "
                        f"adapters into one file")
    mods = resolve_targets(model, adapter)
    if s != 0.0:
        check_merge(adapter, s, mods)
    done = []                         # (name, module, previous per-call deltas or None)
    try:
        for name, mod in mods.items():
            if is_per_call(mod):
                install_delta_hook(mod)
                done.append((name, mod, mod.lens_lora_deltas))
                if s != 0.0:
                    mod.lens_lora_deltas = tuple(mod.lens_lora_deltas) + (LoraDelta(adapter.targets[name], s),)
            else:
                done.append((name, mod, None))
                _merge_step(model, name, mod, adapter.targets[name], s)
    except BaseException:
        for name, mod, previous in reversed(done):
            if previous is not None:
                mod.lens_lora_deltas = previous
            else:
                _restore(model, name, mod, [(t, c) for t, c in _entries_for(model, name) if c != 0.0])
        raise
    st["applied"].append((adapter, s))
    return list(mods)


def remove_loras(model):
    """Undo every :func:`apply_lora`: merged weights get their exact originals back, per-call deltas go."""
    st = getattr(model, "_lens_lora_state", None)
    if st is None:
        return
    with torch.no_grad():
        for name, base in st["backup"].items():
            model.get_submodule(name).weight.copy_(base)
    for mod in model.modules():
        if getattr(mod, "lens_lora_deltas", ()):
            mod.lens_lora_deltas = ()
    st["applied"].clear()
    st["backup"].clear()


def applied_loras(model) -> list:
    """[(adapter, strength)] currently applied to ``model`` by :func:`apply_lora`."""
    st = getattr(model, "_lens_lora_state", None)
    return list(st["applied"]) if st else []


# --------------------------------------------------------------------------------------------------------
# host (ComfyUI) bridge data: what a ModelPatcher needs, without importing the host


@dataclasses.dataclass
class HostPatch:
    """One weight patch in host-neutral form: the parameter key, the adapter kind, the factors in the order
    ComfyUI's weight adapters take them (alpha slots None: the scale is folded into ``strength``)."""
    key: str
    kind: str
    factors: tuple
    strength: float


def host_patches(model, adapter: LoraAdapter, strength: float):
    """(merge patches, per-call patches), both lists of :class:`HostPatch`, for ``model``.

    Layers with float weights become merge patches (the host merges ``strength·scale·ΔW`` when it loads the
    weights, and restores them on unload); quantized layers (:func:`is_per_call`) become per-call patches: the
    host applies them to the layer's dequantized weight at each call and the layer stays quantized."""
    s = check_strength(strength)
    mods = resolve_targets(model, adapter)
    patches, per_call = [], []
    if s == 0.0:
        return patches, per_call
    check_merge(adapter, s, mods)
    for name, mod in mods.items():
        t = adapter.targets[name]
        f = t.factors
        if t.kind == "lora":
            factors = (f["up"], f["down"], None, None, None, None)
        elif t.kind == "loha":
            factors = (f["w1a"], f["w1b"], None, f["w2a"], f["w2b"], None, None, None)
        else:
            factors = (f.get("w1"), f.get("w2"), None, f.get("w1a"), f.get("w1b"), f.get("w2a"), f.get("w2b"),
                       None, None)
        (per_call if is_per_call(mod) else patches).append(HostPatch(name + ".weight", t.kind, factors, s * t.scale))
    return patches, per_call
