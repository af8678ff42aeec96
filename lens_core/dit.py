"""The Lens MMDiT denoiser (``LensTransformer2DModel`` of the official code), written from
../shared/docs/lens_dit_spec.md §2–§3.

Shape conventions: image tokens ``[B, S_img, 128]`` (row-major over the latent grid H′×W′), text features
either a list of 4 ``[B, S_txt, D]`` tensors (selected GPT-OSS layers in order) or the stacked ComfyUI layout
``[B, S_txt, 4·D]``, mask ``[B, S_txt]`` bool (True = valid), timestep ``[B]`` = σ ∈ [0, 1].

Parameter names equal the checkpoint keys (``img_in.weight``, ``transformer_blocks.N.attn.img_qkv.weight``,
…), so a diffusers / Comfy-Org state dict loads with ``load_state_dict`` and no renaming.

Two numerical modes share one implementation:

- ``exact=True`` (reference-exact): every rounding point of the official bf16 run (spec §3, §8) is kept, the
  additive ``-inf`` mask is always passed to SDPA, RoPE is applied as a complex64 product. It reproduces the
  golden ``out_bf16`` bit for bit and ``out`` (fp32) to float noise.
- ``exact=False`` (fast): fewer memory passes for the memory-bound parts: RMSNorm from one fp32-accumulated
  norm pass with its weight folded into the modulation factor (``addcmul``), QK-norm + RoPE in fp32 written
  straight into the joint attention buffers (no ``cat``), ``addcmul`` gated residuals, in-place SiLU·gate, and
  no attention mask when no text position is padded. Differences are bf16 rounding of single elements
  (fp32: ~1e-7 relative), measured in tests/test_dit.py and tests/test_sampling.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LensDiTConfig, check_grid, pack_latents, unpack_latents
from .ops import RMSNorm, cast_to, linear, resolve_operations
from .sampling import model_timestep

ROPE_THETA = 10000.0
ROPE_MAX_POSITIONS = 4096  # the official tables cover positions -4096..4095
BLOCK_NORM_EPS = 1e-6
TEXT_NORM_EPS = 1e-5
TIME_PROJ_DIM = 256


# ---------------------------------------------------------------------------------------------------------
# Rotary position tables (spec §3 step 6)


def _axis_angles(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """fp32 angles p·inv_freq_j, inv_freq_j = 1 / 10000^(2j/dim) (exponent, power and reciprocal in fp32)."""
    inv_freq = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2, device=positions.device).float().div(dim))
    return torch.outer(positions, inv_freq)


def _centred_positions(n: int, device) -> torch.Tensor:
    """Image-axis positions with scale_rope: the first n − n//2 rows are negative, e.g. 64 → −32..31."""
    return torch.arange(n, device=device) - (n - n // 2)


def rope_tables(grid: tuple[int, int], text_len: int, axes_dims=(8, 28, 28), device=None):
    """Complex64 rotation factors (image [H′·W′, D/2], text [S_txt, D/2]) for a latent grid and text length."""
    gh, gw = grid
    if max(gh - gh // 2, gw - gw // 2, max(gh // 2, gw // 2) + text_len) > ROPE_MAX_POSITIONS:
        raise ValueError(f"RoPE supports positions up to {ROPE_MAX_POSITIONS}: expected max(H'//2, W'//2) + "
                         f"S_txt <= {ROPE_MAX_POSITIONS}, got grid {grid} with S_txt {text_len}")
    d_f, d_h, d_w = axes_dims
    zeros = torch.zeros(gh * gw, d_f // 2, device=device)
    rows = _axis_angles(_centred_positions(gh, device), d_h)  # [gh, d_h/2]
    cols = _axis_angles(_centred_positions(gw, device), d_w)
    img = torch.cat([zeros,
                     rows[:, None, :].expand(gh, gw, -1).reshape(gh * gw, -1),
                     cols[None, :, :].expand(gh, gw, -1).reshape(gh * gw, -1)], dim=1)
    pos = torch.arange(text_len, device=device) + max(gh // 2, gw // 2)
    txt = torch.cat([_axis_angles(pos, d) for d in axes_dims], dim=1)
    return torch.polar(torch.ones_like(img), img), torch.polar(torch.ones_like(txt), txt)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent (even, odd) pairs of x [B, S, H, D] by freqs [S, D/2] (complex), computed in fp32."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs.unsqueeze(1)).flatten(3).to(x.dtype)


def _rms(norm, x):
    """RMSNorm with the reference rounding (fp32 statistics, cast, then × weight), whatever class ``norm`` is.

    The module comes from ``operations`` (so a host such as ComfyUI owns the weight's storage/offload), but the
    maths is always ours: a host RMSNorm built on ``F.rms_norm`` rounds differently in bf16.
    """
    return RMSNorm.forward(norm, x)


def _rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 1/rms(x) over the last dim, from one fp32-accumulated norm pass (no fp32 copy of x)."""
    ss = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return torch.rsqrt(ss.square_().div_(x.shape[-1]).add_(eps))


def _norm_modulate_fast(norm, x, shift, scale):
    """Fast RMSNorm(x)·(1 + scale) + shift: the norm weight folded into the per-channel factor (3–4 passes)."""
    w = cast_to(norm.weight, torch.float32, x.device)
    factor = (1 + scale.float()) * w
    out = torch.empty_like(x)  # fp32 maths, one rounding straight into x's dtype
    return torch.addcmul(shift.float(), x * _rms_scale(x, getattr(norm, "eps", BLOCK_NORM_EPS)), factor, out=out)


def _qk_fast(norm, x, freqs, out):
    """Fast QK-RMSNorm + RoPE of x [B,S,H,Dh] in fp32, written (cast) into ``out`` (a joint-buffer slice)."""
    y = x * _rms_scale(x, getattr(norm, "eps", BLOCK_NORM_EPS))
    y.mul_(cast_to(norm.weight, torch.float32, x.device))
    if torch.compiler.is_compiling():  # inductor has no complex kernels: the same product in real arithmetic
        fr = torch.view_as_real(freqs).unsqueeze(1)
        cos, sin, ye, yo = fr[..., 0], fr[..., 1], y[..., 0::2], y[..., 1::2]
        out.copy_(torch.stack([ye * cos - yo * sin, ye * sin + yo * cos], dim=-1).flatten(3))
        return
    yc = torch.view_as_complex(y.unflatten(-1, (-1, 2)))
    if out.dtype == torch.float32:  # rotate straight into the buffer (no temporary, no copy)
        torch.mul(yc, freqs.unsqueeze(1), out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
    else:
        out.copy_(torch.view_as_real(yc * freqs.unsqueeze(1)).flatten(3))


def timestep_projection(t: torch.Tensor, dim: int = TIME_PROJ_DIM) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of σ (spec §3 step 5): arg_k = 1000·(t·f_k) in fp32, f_k fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    arg = 1000 * (t[:, None].float() * freqs[None, :])
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Modules (names mirror the checkpoint keys)


class _TimestepEmbedder(nn.Module):
    def __init__(self, dim, ops, device, dtype):
        super().__init__()
        self.linear_1 = ops.Linear(TIME_PROJ_DIM, dim, device=device, dtype=dtype)
        self.linear_2 = ops.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, proj):
        return self.linear_2(F.silu(self.linear_1(proj)))


class _TimeTextEmbed(nn.Module):
    def __init__(self, dim, ops, device, dtype):
        super().__init__()
        self.timestep_embedder = _TimestepEmbedder(dim, ops, device, dtype)


class _GateMLP(nn.Module):
    """w2(SiLU(w1 x) ⊙ w3 x), no biases."""

    def __init__(self, dim, hidden, ops, device, dtype):
        super().__init__()
        self.w1 = ops.Linear(dim, hidden, bias=False, device=device, dtype=dtype)
        self.w2 = ops.Linear(hidden, dim, bias=False, device=device, dtype=dtype)
        self.w3 = ops.Linear(dim, hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x, exact=True):
        if exact:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        a = F.silu(linear(self.w1, x), inplace=True)
        return linear(self.w2, a.mul_(linear(self.w3, x)))


class _JointAttention(nn.Module):
    def __init__(self, dim, heads, head_dim, ops, device, dtype):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.img_qkv = ops.Linear(dim, 3 * inner, device=device, dtype=dtype)
        self.txt_qkv = ops.Linear(dim, 3 * inner, device=device, dtype=dtype)
        self.norm_q = ops.RMSNorm(head_dim, eps=BLOCK_NORM_EPS, device=device, dtype=dtype)
        self.norm_k = ops.RMSNorm(head_dim, eps=BLOCK_NORM_EPS, device=device, dtype=dtype)
        self.norm_added_q = ops.RMSNorm(head_dim, eps=BLOCK_NORM_EPS, device=device, dtype=dtype)
        self.norm_added_k = ops.RMSNorm(head_dim, eps=BLOCK_NORM_EPS, device=device, dtype=dtype)
        self.to_out = nn.ModuleList([ops.Linear(inner, dim, device=device, dtype=dtype), nn.Identity()])
        self.to_add_out = ops.Linear(inner, dim, device=device, dtype=dtype)

    def forward(self, x_img, x_txt, rope, attn_mask, exact=True):
        b, s_img, _ = x_img.shape
        s_txt = x_txt.shape[1]
        lin = _call if exact else linear
        img_q, img_k, img_v = lin(self.img_qkv, x_img).view(b, s_img, 3, self.heads, self.head_dim).unbind(2)
        txt_q, txt_k, txt_v = lin(self.txt_qkv, x_txt).view(b, s_txt, 3, self.heads, self.head_dim).unbind(2)
        rope_img, rope_txt = rope
        if exact:
            img_q = apply_rope(_rms(self.norm_q, img_q), rope_img)
            img_k = apply_rope(_rms(self.norm_k, img_k), rope_img)
            txt_q, txt_k = _rms(self.norm_added_q, txt_q), _rms(self.norm_added_k, txt_k)
            if s_txt:
                txt_q = apply_rope(txt_q, rope_txt)
                txt_k = apply_rope(txt_k, rope_txt)
            q = torch.cat([img_q, txt_q], dim=1)
            k = torch.cat([img_k, txt_k], dim=1)
            v = torch.cat([img_v, txt_v], dim=1)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        else:  # norm + RoPE in fp32 written straight into joint buffers (no cat), laid out [B, H, S, Dh]:
            # SDPA's CPU kernel is faster on head-major contiguous inputs than on [B, S, H, Dh] views
            q, k, v = (img_v.new_empty(b, self.heads, s_img + s_txt, self.head_dim) for _ in range(3))
            qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, S, H, Dh] views
            _qk_fast(self.norm_q, img_q, rope_img, qs[:, :s_img])
            _qk_fast(self.norm_k, img_k, rope_img, ks[:, :s_img])
            vs[:, :s_img].copy_(img_v)
            if s_txt:
                _qk_fast(self.norm_added_q, txt_q, rope_txt, qs[:, s_img:])
                _qk_fast(self.norm_added_k, txt_k, rope_txt, ks[:, s_img:])
                vs[:, s_img:].copy_(txt_v)
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(b, s_img + s_txt, -1)
        return lin(self.to_out[0], out[:, :s_img]), lin(self.to_add_out, out[:, s_img:])


def _call(module, x):
    return module(x)


def _modulate(x, shift, scale, exact):
    if exact:
        return x * (1 + scale) + shift
    return torch.addcmul(shift, x, 1 + scale)


def _norm_modulate(norm, x, shift, scale, exact):
    if exact:
        return _modulate(_rms(norm, x), shift, scale, True)
    return _norm_modulate_fast(norm, x, shift, scale)


def _gated_add(x, gate, y, exact):
    if exact:
        return x + gate * y
    return torch.addcmul(x, gate, y)


class LensTransformerBlock(nn.Module):
    """One dual-stream block (spec §3 step 7). ``forward`` returns (text, image), like the official block."""

    def __init__(self, cfg: LensDiTConfig, ops, device=None, dtype=None):
        super().__init__()
        dim = cfg.width
        kw = dict(device=device, dtype=dtype)
        self.img_mod = nn.Sequential(nn.SiLU(), ops.Linear(dim, 6 * dim, **kw))
        self.txt_mod = nn.Sequential(nn.SiLU(), ops.Linear(dim, 6 * dim, **kw))
        self.img_norm1 = ops.RMSNorm(dim, eps=BLOCK_NORM_EPS, **kw)
        self.img_norm2 = ops.RMSNorm(dim, eps=BLOCK_NORM_EPS, **kw)
        self.txt_norm1 = ops.RMSNorm(dim, eps=BLOCK_NORM_EPS, **kw)
        self.txt_norm2 = ops.RMSNorm(dim, eps=BLOCK_NORM_EPS, **kw)
        self.attn = _JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, ops, device, dtype)
        self.img_mlp = _GateMLP(dim, cfg.mlp_hidden, ops, device, dtype)
        self.txt_mlp = _GateMLP(dim, cfg.mlp_hidden, ops, device, dtype)

    def forward(self, img, txt, temb, rope, attn_mask, exact=True):
        # modulation once per block: [B, 1, 6·D] -> shift1, scale1, gate1, shift2, scale2, gate2
        im = self.img_mod(temb).unsqueeze(1).chunk(6, dim=-1)
        tm = self.txt_mod(temb).unsqueeze(1).chunk(6, dim=-1)
        x_img = _norm_modulate(self.img_norm1, img, im[0], im[1], exact)
        x_txt = _norm_modulate(self.txt_norm1, txt, tm[0], tm[1], exact)
        a_img, a_txt = self.attn(x_img, x_txt, rope, attn_mask, exact)
        img = _gated_add(img, im[2], a_img, exact)
        txt = _gated_add(txt, tm[2], a_txt, exact)
        x_img = _norm_modulate(self.img_norm2, img, im[3], im[4], exact)
        x_txt = _norm_modulate(self.txt_norm2, txt, tm[3], tm[4], exact)
        img = _gated_add(img, im[5], self.img_mlp(x_img, exact), exact)
        txt = _gated_add(txt, tm[5], self.txt_mlp(x_txt, exact), exact)
        return txt, img


class _AdaNormOut(nn.Module):
    """Final AdaLN: LayerNorm (no affine, eps 1e-6)·(1 + scale) + shift, with emb = [scale | shift]."""

    def __init__(self, dim, ops, device, dtype):
        super().__init__()
        self.linear = ops.Linear(dim, 2 * dim, device=device, dtype=dtype)
        self.norm = ops.LayerNorm(dim, eps=1e-6, elementwise_affine=False, device=device, dtype=dtype)

    def forward(self, x, temb, exact=True):
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).unsqueeze(1).chunk(2, dim=-1)
        return _modulate(self.norm(x), shift, scale, exact)


class LensTransformer(nn.Module):
    """The Lens MMDiT. ``LensTransformer(config, operations=None, device=None, dtype=None)``.

    ``config`` is a :class:`LensDiTConfig` or a dict of transformer/config.json fields. All layers come from
    ``operations`` (``lens_core.ops.resolve_operations``); building on ``device="meta"`` allocates nothing.
    ``exact`` (default True) selects the reference-exact numerics; ``forward(..., exact=...)`` overrides it
    per call.
    """

    def __init__(self, config, operations=None, device=None, dtype=None, exact: bool = True):
        super().__init__()
        cfg = config if isinstance(config, LensDiTConfig) else LensDiTConfig.from_dict(dict(config))
        self.config = cfg
        self.exact = exact
        ops = resolve_operations(operations)
        kw = dict(device=device, dtype=dtype)
        dim = cfg.width
        self.img_in = ops.Linear(cfg.in_channels, dim, **kw)
        self.txt_norm = nn.ModuleList([ops.RMSNorm(cfg.enc_hidden_dim, eps=TEXT_NORM_EPS, **kw)
                                       for _ in range(cfg.num_text_layers)])
        self.txt_in = ops.Linear(cfg.enc_hidden_dim * cfg.num_text_layers, dim, **kw)
        self.time_text_embed = _TimeTextEmbed(dim, ops, device, dtype)
        self.transformer_blocks = nn.ModuleList([LensTransformerBlock(cfg, ops, **kw)
                                                 for _ in range(cfg.num_layers)])
        self.norm_out = _AdaNormOut(dim, ops, device, dtype)
        self.proj_out = ops.Linear(dim, cfg.out_features, **kw)
        self._rope_cache: dict = {}
        self._compiled_block = None

    # -- helpers --------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype: ``compute_dtype`` when the loader set it (weights may be stored narrower, see
        :mod:`lens_core.upcast`), else the weights' dtype (bf16 for 8-bit storage formats)."""
        if getattr(self, "compute_dtype", None) is not None:
            return self.compute_dtype
        dt = self.img_in.weight.dtype
        return dt if dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64) else torch.bfloat16

    def rope(self, grid, text_len, device):
        """(image, text) complex RoPE factors, computed once per (grid, text length, device) and cached."""
        key = (tuple(grid), int(text_len), str(device))
        if key not in self._rope_cache:
            if len(self._rope_cache) > 16:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_tables(grid, text_len, self.config.axes_dims_rope, device)
        return self._rope_cache[key]

    def split_text_features(self, text_features):
        """Accept a list/tuple of 4 [B,S,D] tensors or the stacked [B,S,4·D] layout; return the list."""
        n, d = self.config.num_text_layers, self.config.enc_hidden_dim
        if isinstance(text_features, torch.Tensor):
            if text_features.ndim != 3 or text_features.shape[-1] != n * d:
                raise ValueError(f"text features: expected a list of {n} [B, S, {d}] tensors or a stacked "
                                 f"[B, S, {n * d}] tensor, got shape {tuple(text_features.shape)}")
            return list(text_features.split(d, dim=-1))
        feats = list(text_features)
        if len(feats) != n:
            raise ValueError(f"text features: expected {n} per-layer tensors, got {len(feats)}")
        for i, f in enumerate(feats):
            if f.ndim != 3 or f.shape[-1] != d or f.shape[:2] != feats[0].shape[:2]:
                raise ValueError(f"text feature layer {i}: expected [B, S, {d}] matching layer 0 "
                                 f"{tuple(feats[0].shape[:2])}, got shape {tuple(f.shape)}")
        return feats

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, hidden_states, text_features, text_mask, timestep, grid, exact=None,
                transformer_options=None, control=None, patch_input=None):
        """Velocity [B, S_img, 128] for image tokens [B, S_img, 128] at σ = ``timestep`` [B] (spec §3).

        Text features and the timestep are brought to ``hidden_states``' dtype/device (the official pipeline
        casts them to the model dtype before the call, so this is the same thing). ``grid`` = (H′, W′).

        ``transformer_options`` (a dict, as a host such as ComfyUI passes it; see :func:`run_blocks`) adds the
        host's patch points: ``patches["post_input"]``, ``patches_replace["dit"][("double_block", i)]``,
        ``patches["double_block"]``; ``control`` = {"input": [per-block additions to the image tokens]};
        ``patch_input`` is what patches see as ``"x"`` (default ``hidden_states``). Without them the
        computation is unchanged.
        """
        exact = self.exact if exact is None else exact
        cfg = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(f"hidden_states: expected [B, S_img, {cfg.in_channels}], got shape "
                             f"{tuple(hidden_states.shape)}")
        b, s_img, _ = hidden_states.shape
        gh, gw = check_grid(grid, s_img)
        feats = self.split_text_features(text_features)
        s_txt = feats[0].shape[1]
        if feats[0].shape[0] != b:
            raise ValueError(f"text features: expected batch {b} (as hidden_states), got {feats[0].shape[0]}")
        if text_mask is None or tuple(text_mask.shape) != (b, s_txt):
            raise ValueError(f"text_mask: expected shape {(b, s_txt)} matching the text features, got "
                             f"{None if text_mask is None else tuple(text_mask.shape)}")
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        if tuple(timestep.shape) != (b,):
            raise ValueError(f"timestep: expected shape ({b},) of sigmas in [0, 1], got {tuple(timestep.shape)}")
        dtype, device = hidden_states.dtype, hidden_states.device
        text_mask = text_mask.to(device=device, dtype=torch.bool)

        # 1. joint additive mask [B,1,1,S_img+S_txt]; the fast path drops it when nothing is padded
        attn_mask = None
        if exact or not bool(text_mask.all()):
            joint = torch.cat([torch.ones(b, s_img, dtype=torch.bool, device=device), text_mask], dim=1)
            attn_mask = torch.zeros(joint.shape, dtype=torch.float32, device=device)
            attn_mask.masked_fill_(~joint, float("-inf"))
            attn_mask = attn_mask[:, None, None, :]

        rope = self.rope((gh, gw), s_txt, device)  # 6. (cached per grid and text length)
        img = self.img_in(hidden_states)  # 2.
        t = timestep.to(img.dtype)  # 3.
        txt = torch.cat([_rms(norm, cast_to(f, dtype, device)) for norm, f in zip(self.txt_norm, feats)], dim=-1)
        txt = self.txt_in(txt)  # 4.
        options = dict(transformer_options) if transformer_options else {}
        patches = options.get("patches", {})
        for patch in patches.get("post_input", ()):
            out = patch({"img": img, "txt": txt, "transformer_options": options})
            img, txt = out["img"], out["txt"]
        temb = self.time_text_embed.timestep_embedder(timestep_projection(t).to(img.dtype))  # 5.
        if options or control is not None:
            txt, img = self.run_blocks(img, txt, temb, rope, attn_mask, exact, options, control,
                                       hidden_states if patch_input is None else patch_input)
        else:
            compiled = self._compiled_block if not exact else None
            for block in self.transformer_blocks:  # 7.
                if compiled is not None:
                    txt, img = compiled(block, img, txt, temb, rope, attn_mask)
                else:
                    txt, img = block(img, txt, temb, rope, attn_mask, exact)
        return self.proj_out(self.norm_out(img, temb, exact))  # 8.

    velocity = forward      # the token-layout forward under a name a subclass's host convention leaves alone

    def run_blocks(self, img, txt, temb, rope, attn_mask, exact, options, control=None, patch_input=None):
        """Step 7 with a host's patch points (the keys ComfyUI's native Lens model honours), returns (txt, img).

        ``options`` (a dict the caller owns; ``total_blocks``, ``block_type`` = "double" and ``block_index``
        are written into it) may hold ``patches_replace["dit"][("double_block", i)]``: a callable
        ``replace(args, {"original_block": fn})`` returning {"img", "txt"}, where ``args`` = {"img", "txt",
        "vec" (the timestep embedding), "pe" (this model's RoPE tables), "attn_mask", "transformer_options"}
        and ``fn(args)`` runs the block itself; and ``patches["double_block"]``: callables run after each block
        on {"img", "txt", "x" (``patch_input``), "block_index", "transformer_options"} returning {"img", "txt"}.
        ``control["input"][i]`` is added to the first image tokens after block i.
        """
        replace = options.get("patches_replace", {}).get("dit", {})
        after = options.get("patches", {}).get("double_block", ())
        added = (control or {}).get("input") or ()
        compiled = self._compiled_block if not exact else None
        options["total_blocks"] = len(self.transformer_blocks)
        options["block_type"] = "double"
        for i, block in enumerate(self.transformer_blocks):
            options["block_index"] = i
            if ("double_block", i) in replace:
                def original(args, block=block):
                    t_out, i_out = block(args["img"], args["txt"], args["vec"], args["pe"], args.get("attn_mask"),
                                         exact)
                    return {"txt": t_out, "img": i_out}
                out = replace[("double_block", i)](
                    {"img": img, "txt": txt, "vec": temb, "pe": rope, "attn_mask": attn_mask,
                     "transformer_options": options}, {"original_block": original})
                txt, img = out["txt"], out["img"]
            elif compiled is not None:
                txt, img = compiled(block, img, txt, temb, rope, attn_mask)
            else:
                txt, img = block(img, txt, temb, rope, attn_mask, exact)
            for patch in after:
                out = patch({"img": img, "txt": txt, "x": patch_input, "block_index": i,
                             "transformer_options": options})
                img, txt = out["img"], out["txt"]
            if i < len(added) and added[i] is not None:
                img = img.clone()
                img[:, :added[i].shape[1]] += added[i].to(img.dtype)
        return txt, img

    def forward_latents(self, x, timestep, context, attention_mask=None, transformer_options=None, control=None,
                        exact=None):
        """The forward in a host's latent layout: ``x`` [B, 128, H′, W′] (the ComfyUI LATENT layout), σ
        ``timestep`` [B], ``context`` the stacked text features [B, S, 4·D] with ``attention_mask`` [B, S]
        (any dtype, nonzero = valid; None = all valid) → velocity [B, 128, H′, W′].

        The DiT receives the official model timestep (σ·1000 rounded to the compute dtype, then /1000:
        ``lens_core.sampling.model_timestep``), so any host schedule that hands over σ, as ComfyUI's flow
        samplers do, drives it the official way. Patch points: :meth:`forward`; the patches' ``"x"`` is ``x``.
        """
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x: expected a latent [B, {self.config.in_channels}, H', W'], got shape "
                             f"{tuple(x.shape)}")
        b, _, h, w = x.shape
        if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[0] != b:
            raise ValueError(f"context: expected stacked text features [B={b}, S, "
                             f"{self.config.num_text_layers * self.config.enc_hidden_dim}], got "
                             f"{getattr(context, 'shape', type(context).__name__)}")
        if attention_mask is None:
            mask = torch.ones(context.shape[:2], dtype=torch.bool, device=x.device)
        else:
            mask = attention_mask.reshape(b, -1).to(device=x.device) != 0
        t = model_timestep(torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b), x.dtype)
        out = self.velocity(pack_latents(x), context, mask, t, grid=(h, w), exact=exact,
                           transformer_options=transformer_options, control=control, patch_input=x)
        return unpack_latents(out, h, w)

    def enable_compile(self, enabled: bool = True, **compile_kwargs):
        """Run the fast path's blocks (``exact=False``) through ``torch.compile`` (regional compilation).

        One compiled function serves all blocks (their parameters are graph inputs), so compiling costs about
        one block's worth, whatever the depth. The exact path always runs eagerly (compiled kernels round
        differently). Shapes vary with the image size and text length: by default torch recompiles once with
        dynamic shapes on the second size; ``dynamic=True`` starts that way. ``enabled=False`` goes back to
        eager. Whether it pays depends on the machine: see BENCHMARKS.md (DiT, torch.compile).
        """
        self._compiled_block = torch.compile(_fast_block, **compile_kwargs) if enabled else None
        return self


def _fast_block(block, img, txt, temb, rope, attn_mask):
    """One block on the fast path; module-level so that torch.compile traces one graph for every block."""
    return block(img, txt, temb, rope, attn_mask, False)
