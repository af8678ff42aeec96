"""GPT-OSS decoder used as the Lens text encoder (raw outputs of selected layers, early exit).

Spec: ../shared/docs/text_encoder_spec.md §2 (forward) and §3.1 (which layers Lens takes).

Per layer: ``h = x + Attn(RMSNorm(x))``, ``out = h + MoE(RMSNorm(h))``.
- RMSNorm: fp32 statistics, the weight multiplied **in fp32**, then cast back (GPT-OSS flavour).
- Attention: GQA, YaRN RoPE (half-split rotation, cos/sin scaled by the YaRN attention factor), logits scaled
  by head_dim^-0.5, an additive dtype-min mask (causal + key padding, plus a sliding window on sliding layers)
  and one learned "sink" logit per head appended as an extra column of the softmax and then dropped.
- MoE: router Linear → top-k on raw logits → softmax over those k → clamped SwiGLU experts with the "+1"
  (:class:`lens_core.quant.PackedExperts`, 4-bit weights kept packed by default).
The forward stops after the last selected layer and returns the selected layers' outputs in selection order,
without the final norm. Parameter names equal the diffusers ``text_encoder/`` keys (``model.embed_tokens.weight``,
``model.layers.L....``), so the folder's state dict loads with ``load_state_dict(sd, assign=True)`` into a
module built on ``meta`` (drop ``lm_head.*``, ``model.norm.*`` and layers past the last selected one:
:meth:`LensTextEncoder.is_unused_key`).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os

import torch
from torch import nn
from torch.nn import functional as F

from . import checks as chk
from .jsonfile import read_json_object
from .ops import cast_to, resolve_operations
from .quant import PackedExperts

LENS_SELECTED_LAYERS = (5, 11, 17, 23)
#: bound on a GPT-OSS config's depth (gpt-oss-20b: 24 layers, gpt-oss-120b: 36)
MAX_TE_LAYERS = 256

_QUERY_CHUNK = 1024  # prompt rows per attention block during generation prefill

_YARN_DEFAULTS = dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                      original_max_position_embeddings=4096, truncate=False)


@dataclasses.dataclass
class TextEncoderConfig:
    """The fields of a GPT-OSS ``config.json`` the encoder needs (defaults = gpt-oss-20b / Lens)."""

    vocab_size: int = 201088
    hidden_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2880
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    layer_types: tuple = ()
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    attention_bias: bool = True
    rope: dict = dataclasses.field(default_factory=lambda: dict(_YARN_DEFAULTS))
    pad_token_id: int = 199999
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072

    def __post_init__(self):
        # values come from an untrusted config.json: types and ranges first, then the relations between them
        w = "text encoder config"
        chk.integer(self.vocab_size, "vocab_size", 1, 1 << 20, w)
        chk.integer(self.hidden_size, "hidden_size", 1, 16384, w)
        chk.integer(self.num_hidden_layers, "num_hidden_layers", 1, MAX_TE_LAYERS, w)
        chk.integer(self.num_attention_heads, "num_attention_heads", 1, 256, w)
        chk.integer(self.num_key_value_heads, "num_key_value_heads", 1, self.num_attention_heads, w)
        chk.integer(self.head_dim, "head_dim", 2, 1024, w)
        if self.head_dim % 2:
            raise ValueError(f"{w}: head_dim expected an even integer (RoPE rotates pairs), found {self.head_dim}")
        chk.integer(self.intermediate_size, "intermediate_size", 1, 65536, w)
        chk.integer(self.num_local_experts, "num_local_experts", 1, 1024, w)
        chk.integer(self.num_experts_per_tok, "num_experts_per_tok", 1, None, w)
        chk.integer(self.sliding_window, "sliding_window", 1, 1 << 24, w)
        chk.number(self.rms_norm_eps, "rms_norm_eps", 0.0, 1.0, w, lo_open=True)
        chk.number(self.swiglu_limit, "swiglu_limit", 0.0, 1e6, w, lo_open=True)
        chk.number(self.swiglu_alpha, "swiglu_alpha", 0.0, 1e6, w, lo_open=True)
        chk.boolean(self.attention_bias, "attention_bias", w)
        chk.integer(self.pad_token_id, "pad_token_id", 0, 1 << 31, w)
        _check_rope(self.rope, w)
        if not isinstance(self.layer_types, (list, tuple)) or len(self.layer_types) > MAX_TE_LAYERS:
            raise ValueError(f"{w}: layer_types expected a list of {self.num_hidden_layers} strings, found "
                             f"{type(self.layer_types).__name__}")
        if not self.layer_types:
            self.layer_types = tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                     for i in range(self.num_hidden_layers))
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"text encoder config: expected {self.num_hidden_layers} layer_types, found "
                             f"{len(self.layer_types)}")
        bad = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if bad:
            raise ValueError(f"text encoder config: expected layer_types 'sliding_attention'/'full_attention', "
                             f"found {sorted(bad)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"text encoder config: expected num_attention_heads ({self.num_attention_heads}) "
                             f"divisible by num_key_value_heads ({self.num_key_value_heads})")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"text encoder config: expected 1 <= num_experts_per_tok <= {self.num_local_experts}, "
                             f"found {self.num_experts_per_tok}")
        if not isinstance(self.max_position_embeddings, int) or self.max_position_embeddings < 1:
            raise ValueError(f"text encoder config: expected a positive int max_position_embeddings, found "
                             f"{self.max_position_embeddings!r}")
        self.tie_word_embeddings = bool(self.tie_word_embeddings)

    @classmethod
    def from_dict(cls, d: dict) -> "TextEncoderConfig":
        """From a transformers GPT-OSS config dict; rope given as ``rope_parameters`` (transformers 5) or as
        legacy ``rope_scaling`` + ``rope_theta``."""
        if not isinstance(d, dict):
            raise ValueError(f"text encoder config: expected a dict, found {type(d).__name__}")
        if d.get("model_type", "gpt_oss") != "gpt_oss":
            raise ValueError(f"text encoder config: expected model_type 'gpt_oss', found {d.get('model_type')!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"rope"}
        kw = {k: d[k] for k in names if k in d and d[k] is not None}
        if "num_experts_per_tok" not in kw and "experts_per_token" in d:
            kw["num_experts_per_tok"] = d["experts_per_token"]
        if "head_dim" not in kw and "hidden_size" in d and "num_attention_heads" in d:
            hidden = chk.integer(d["hidden_size"], "hidden_size", 1, 16384, "text encoder config")
            kw["head_dim"] = hidden // chk.integer(d["num_attention_heads"], "num_attention_heads", 1, 256,
                                                   "text encoder config")
        kw["rope"] = _rope_from_config(d)
        return cls(**kw)

    @classmethod
    def from_json(cls, path) -> "TextEncoderConfig":
        d = read_json_object(path, "GPT-OSS config.json")
        try:
            return cls.from_dict(d)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


def _check_rope(rope, where: str):
    """Types and ranges of the RoPE parameters (NaN/inf or a zero theta would give NaN features silently)."""
    if not isinstance(rope, dict):
        raise ValueError(f"{where}: rope parameters expected a JSON object, found {type(rope).__name__}")
    chk.text(rope.get("rope_type"), "rope_type", ("yarn", "default"), where)
    chk.number(rope.get("rope_theta"), "rope_theta", 1.0, 1e12, where, lo_open=True)
    if rope["rope_type"] == "yarn":
        chk.number(rope.get("factor"), "rope factor", 1.0, 1e6, where)
        chk.integer(rope.get("original_max_position_embeddings"), "original_max_position_embeddings", 1, 1 << 30,
                    where)
        for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
            if rope.get(key) is not None:
                chk.number(rope[key], key, 0.0, 1e6, where, lo_open=True)
        if "truncate" in rope:
            chk.boolean(rope["truncate"], "truncate", where)


def _rope_from_config(d: dict) -> dict:
    params = d.get("rope_parameters")
    for key in ("rope_parameters", "rope_scaling"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ValueError(f"text encoder config: {key} expected a JSON object, found {type(d[key]).__name__}")
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        raise ValueError("text encoder config: per-layer-type rope_parameters are not supported for GPT-OSS")
    if not params:
        legacy = d.get("rope_scaling")
        if legacy is None and d.get("rope_theta") is None:
            return dict(_YARN_DEFAULTS)
        params = dict(legacy or {})
        if "rope_theta" in d:
            params.setdefault("rope_theta", d["rope_theta"])
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] not in ("yarn", "default"):
        raise ValueError(f"text encoder config: expected rope_type 'yarn' (or 'default'), found "
                         f"{params['rope_type']!r}")
    if "rope_theta" not in params:
        raise ValueError("text encoder config: expected rope_theta (in rope_parameters or at top level), found none")
    if params["rope_type"] == "yarn":
        params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
        for key in ("factor", "original_max_position_embeddings"):
            if params.get(key) is None:
                raise ValueError(f"text encoder config: yarn rope needs {key}, found none")
    return params


def rope_inv_freq(head_dim: int, rope: dict):
    """``(inv_freq [head_dim/2] fp32, attention_scaling)`` for default or YaRN RoPE (spec §2.5)."""
    base = float(rope["rope_theta"])
    dim = head_dim
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope["rope_type"] == "default":
        return 1.0 / pos_freqs, 1.0
    factor = float(rope["factor"])
    l0 = float(rope["original_max_position_embeddings"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_scaling = rope.get("attention_factor")
    if attention_scaling is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attention_scaling = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
        else:
            attention_scaling = mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(l0 / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(rope.get("beta_fast") or 32)
    high = correction_dim(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # weight of the original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_scaling)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class GptOssRMSNorm(nn.Module):
    """RMSNorm whose weight multiplies the fp32-normalised activations before the cast back.

    Deliberately not ``operations.RMSNorm`` (lens_core.ops / comfy.ops cast to the input dtype *before* the
    weight multiply, which differs in bf16); the weight follows the input's device via ``cast_to``."""

    def __init__(self, dim, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (cast_to(self.weight, torch.float32, x.device) * xf).to(x.dtype)


class GptOssAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, sliding: bool, ops, device=None, dtype=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window if sliding else None
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = ops.Linear(d, self.heads * self.head_dim, bias=bias, device=device, dtype=dtype)
        self.k_proj = ops.Linear(d, self.kv_heads * self.head_dim, bias=bias, device=device, dtype=dtype)
        self.v_proj = ops.Linear(d, self.kv_heads * self.head_dim, bias=bias, device=device, dtype=dtype)
        self.o_proj = ops.Linear(self.heads * self.head_dim, d, bias=bias, device=device, dtype=dtype)
        self.sinks = nn.Parameter(torch.empty(self.heads, device=device, dtype=dtype))

    def forward(self, x, cos, sin, masks):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        rep = self.heads // self.kv_heads  # query head h reads kv head h // rep
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        logits = torch.matmul(q, k.transpose(2, 3)) * self.head_dim ** -0.5
        logits = logits + masks["sliding" if self.window else "full"].to(logits.dtype)
        sink = cast_to(self.sinks, logits.dtype, x.device).view(1, -1, 1, 1).expand(b, -1, t, 1)
        logits = torch.cat([logits, sink], dim=-1)
        logits = logits - logits.amax(dim=-1, keepdim=True)
        probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1].to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.o_proj(out)

    def forward_cached(self, x, cos, sin, cache_k, cache_v, start: int, mask):
        """Attention of ``t`` new tokens at positions ``start..start+t-1`` against the cache (generation).

        Writes their rotated keys/values into ``cache_k/v [B, kv_heads, capacity, head_dim]`` at ``start``, then
        attends to the keys a query may see: all earlier ones on full layers, the last ``window`` (the query
        included) on sliding layers. ``mask``: additive ``[1, 1, t, L]`` for the ``L`` keys read, or None (all
        visible, e.g. one new token). Query heads are grouped per kv head (no repeated copy of the cache);
        the math is the eager forward's, sinks included (in fp32 computed by SDPA: :func:`_sink_attention_sdpa`)."""
        b, t, _ = x.shape
        kv, rep, hd = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        q = self.q_proj(x).view(b, t, self.heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, kv, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, kv, hd).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        end = start + t
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v
        lo = max(0, start - self.window + 1) if self.window else 0
        keys, values = cache_k[:, :, lo:end], cache_v[:, :, lo:end]
        n_keys = end - lo
        qg = q.reshape(b, kv, rep, t, hd)
        sink = cast_to(self.sinks, q.dtype, x.device).view(1, kv, rep, 1, 1)
        if q.dtype == torch.float32:
            out = _sink_attention_sdpa(qg, keys, values, sink, mask)
            return self.o_proj(out.view(b, self.heads, t, hd).transpose(1, 2).reshape(b, t, self.heads * hd))
        out = torch.empty(b, kv, rep, t, hd, dtype=v.dtype, device=x.device)
        for c in range(0, t, _QUERY_CHUNK):  # bounded [.., chunk, L] logits for long prompts
            n = min(_QUERY_CHUNK, t - c)
            logits = torch.matmul(qg[:, :, :, c:c + n].reshape(b, kv, rep * n, hd), keys.transpose(2, 3))
            logits = logits.view(b, kv, rep, n, n_keys) * hd ** -0.5
            if mask is not None:
                logits = logits + mask[..., c:c + n, :].unsqueeze(1).to(logits.dtype)
            logits = torch.cat([logits, sink.expand(b, kv, rep, n, 1)], dim=-1)
            logits = logits - logits.amax(dim=-1, keepdim=True)
            probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1].to(values.dtype)
            out[:, :, :, c:c + n] = torch.matmul(probs.reshape(b, kv, rep * n, n_keys), values).view(
                b, kv, rep, n, hd)
        out = out.view(b, self.heads, t, hd).transpose(1, 2).reshape(b, t, self.heads * hd)
        return self.o_proj(out)


def _sink_attention_sdpa(qg, keys, values, sink, mask):
    """fp32 attention with GPT-OSS sinks through ``F.scaled_dot_product_attention`` (generation only).

    The sink is one more key column whose logit is the head's sink value and whose value vector is zero: the
    softmax then runs over the keys and the sink together, and the sink adds nothing to the output, which is
    exactly the eager softmax-with-sink-dropped. Query heads stay grouped per kv head (``qg [B, kv, rep, t,
    hd]`` read as ``rep·t`` query rows of that kv head; no repeated copy of the cache); queries in blocks of
    ``_QUERY_CHUNK`` bound the ``[.., rows, L+1]`` bias. Returns ``[B, kv, rep, t, hd]``."""
    b, kv, rep, t, hd = qg.shape
    n_keys = keys.shape[2]
    zero = keys.new_zeros(b, kv, 1, hd)
    keys, values = torch.cat([keys, zero], dim=2), torch.cat([values, zero], dim=2)
    out = torch.empty_like(qg)
    for c in range(0, t, _QUERY_CHUNK):
        n = min(_QUERY_CHUNK, t - c)
        bias = qg.new_zeros(1, kv, rep, n, n_keys + 1)
        if mask is not None:
            bias[..., :n_keys] = mask[..., c:c + n, :].unsqueeze(1)
        bias[..., n_keys:] = sink
        out[:, :, :, c:c + n] = F.scaled_dot_product_attention(
            qg[:, :, :, c:c + n].reshape(b, kv, rep * n, hd), keys, values,
            attn_mask=bias.view(1, kv, rep * n, n_keys + 1), scale=hd ** -0.5).view(b, kv, rep, n, hd)
    return out


class GptOssMoE(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, ops, experts="packed", expert_format="mxfp4", device=None,
                 dtype=None):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = ops.Linear(cfg.hidden_size, cfg.num_local_experts, bias=True, device=device, dtype=dtype)
        self.experts = ops.PackedExperts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size,
                                         alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit, fmt=expert_format,
                                         mode=experts, device=device, dtype=dtype)

    def forward(self, x):
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        logits = self.router(flat)
        top_values, top_index = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top_values, dim=-1, dtype=top_values.dtype)
        return self.experts(flat, top_index, weights).reshape(b, t, d)


class GptOssDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx, ops, experts, expert_format, device=None, dtype=None):
        super().__init__()
        sliding = cfg.layer_types[layer_idx] == "sliding_attention"
        self.input_layernorm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.self_attn = GptOssAttention(cfg, sliding, ops, device=device, dtype=dtype)
        self.post_attention_layernorm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.mlp = GptOssMoE(cfg, ops, experts, expert_format, device=device, dtype=dtype)

    def forward(self, x, cos, sin, masks):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, masks)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x, cos, sin, cache_k, cache_v, start, masks):
        mask = masks["sliding" if self.self_attn.window else "full"]
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, cache_k, cache_v, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class _GptOssBody(nn.Module):
    """Holds the ``model.*`` parameters (embedding + decoder layers)."""

    def __init__(self, cfg, n_layers, ops, experts, expert_format, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = ops.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(GptOssDecoderLayer(cfg, i, ops, experts, expert_format, device=device,
                                                       dtype=dtype) for i in range(n_layers))


def _validate_selected(selected, num_layers):
    try:
        sel = tuple(int(i) for i in selected)
    except (TypeError, ValueError):
        raise ValueError(f"selected_layers: expected a list of layer indices, found {selected!r}") from None
    if not sel or len(set(sel)) != len(sel) or any(i < 0 or i >= num_layers for i in sel):
        raise ValueError(f"selected_layers: expected distinct indices in 0..{num_layers - 1}, found {list(sel)}")
    return sel


def attention_masks(attention_mask: torch.Tensor, window: int, dtype, device):
    """Additive masks ``[B, 1, T, T]`` (0 = allowed, dtype-min = blocked) for full and sliding layers.

    Key j is visible from query i iff j <= i and j is a real token; sliding layers also need i - j < window.
    Padding masks keys only."""
    t = attention_mask.shape[1]
    i = torch.arange(t, device=device).view(t, 1)
    j = torch.arange(t, device=device).view(1, t)
    keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    full = (j <= i) & keys
    sliding = full & (i - j < window)
    neg = torch.finfo(dtype).min
    zero = torch.zeros((), dtype=dtype, device=device)
    return {"full": torch.where(full, zero, neg), "sliding": torch.where(sliding, zero, neg)}


class LensTextEncoder(nn.Module):
    """GPT-OSS decoder returning the raw outputs of ``selected_layers`` (default Lens: 5, 11, 17, 23).

    ``operations``: layer namespace (``lens_core.ops.resolve_operations``); ``experts``: ``"packed"`` keeps
    4-bit experts as bytes and dequantizes the routed experts per call, ``"dequantized"`` expands them at load;
    ``expert_format``: ``"mxfp4"`` (diffusers folder) or ``"nvfp4"`` (Comfy-Org file, after
    ``lens_core.quant.nvfp4_state_dict_to_lens``). Only layers ``0..max(selected_layers)`` are built.
    """

    def __init__(self, config: TextEncoderConfig, selected_layers=LENS_SELECTED_LAYERS, operations=None,
                 device=None, dtype=None, experts="packed", expert_format="mxfp4"):
        super().__init__()
        if isinstance(config, dict):
            config = TextEncoderConfig.from_dict(config)
        self.config = config
        self.selected_layers = _validate_selected(selected_layers, config.num_hidden_layers)
        self.compute_dtype = dtype
        ops = resolve_operations(operations)
        n_layers = max(self.selected_layers) + 1
        self.model = _GptOssBody(config, n_layers, ops, experts, expert_format, device=device, dtype=dtype)
        # what a TextGenerator builds its modules (later layers, final norm, lm_head) with
        self._build = dict(ops=ops, experts=experts, expert_format=expert_format, dtype=dtype)
        inv_freq, self.attention_scaling = rope_inv_freq(config.head_dim, config.rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        bump_weights_version(self)

    def is_unused_key(self, key: str) -> bool:
        """True for checkpoint keys this encoder does not hold (``lm_head``, final norm, layers past the last
        selected one: text generation's, :class:`lens_core.generator.TextGenerator`): drop them before
        ``load_state_dict``."""
        if key.startswith(("lm_head.", "model.norm.")):
            return True
        parts = key.split(".")
        if key.startswith("model.layers.") and len(parts) > 2 and parts[2].isdigit():
            return int(parts[2]) >= len(self.model.layers)
        return False

    @property
    def feature_layers(self) -> int:
        """Decoder layers the feature forward runs (0..max(selected_layers))."""
        return max(self.selected_layers) + 1

    # ---- weights version (what a TextGenerator's kept prefix is keyed by) ---------------------------------
    def load_state_dict(self, *args, **kwargs):
        out = super().load_state_dict(*args, **kwargs)
        bump_weights_version(self)
        return out

    def set_expert_cache(self, max_bytes):
        """Keep up to ``max_bytes`` of dequantized experts for one-token steps (text generation decode), least
        recently used first out, shared by all layers; ``None`` or 0 removes it (the default: packed experts are
        read in place). Memory for time: see :class:`lens_core.quant.ExpertCache`. Returns the cache (or None)."""
        from .quant import ExpertCache

        cache = ExpertCache(int(max_bytes)) if max_bytes else None
        for layer in self.model.layers:
            layer.mlp.experts.expert_cache = cache
        return cache

    @torch.no_grad()
    def dequantize_experts_(self, dtype=None):
        """Expand every packed expert bank to dense weights (``experts="dequantized"``; also usable on a packed
        encoder to trade memory for speed). Idempotent."""
        for layer in self.model.layers:
            layer.mlp.experts.dequantize_(dtype)
        return self

    def rope_tables(self, t, dtype, device, start: int = 0):
        """(cos, sin) ``[t, head_dim/2]`` of positions ``start … start + t − 1`` (YaRN-scaled)."""
        inv_freq = self.inv_freq
        if inv_freq.device.type == "meta":  # built on meta and never materialised: recompute
            inv_freq, _ = rope_inv_freq(self.config.head_dim, self.config.rope)
        pos = torch.arange(start, start + t, device=device, dtype=torch.float32)[:, None]
        angles = pos * inv_freq.to(device, torch.float32)
        return ((angles.cos() * self.attention_scaling).to(dtype), (angles.sin() * self.attention_scaling).to(dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """``input_ids [B, T]`` (right-padded), ``attention_mask [B, T]`` (True/1 = real token) → list of
        ``[B, T, hidden]`` outputs of the selected layers, in selection order (no final norm)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [B, T], found {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, found "
                             f"{tuple(attention_mask.shape)}")
        if any(layer.mlp.experts.mode == "dequantized" and layer.mlp.experts.is_packed for layer in self.model.layers):
            self.dequantize_experts_()  # loaded tensor by tensor (not via load_state_dict): expand now
        x = self.model.embed_tokens(input_ids)
        dtype = self.compute_dtype or self.model.layers[0].self_attn.k_proj.weight.dtype
        x = x.to(dtype)
        cos, sin = self.rope_tables(input_ids.shape[1], dtype, x.device)
        masks = attention_masks(attention_mask, self.config.sliding_window, dtype, x.device)
        wanted = {layer: pos for pos, layer in enumerate(self.selected_layers)}
        outputs = [None] * len(self.selected_layers)
        for idx, layer in enumerate(self.model.layers[:self.feature_layers]):
            x = layer(x, cos, sin, masks)
            if idx in wanted:
                outputs[wanted[idx]] = x
        return outputs


class KVCache:
    """Keys and values of every decoder layer during one generation: ``k[i], v[i]`` are
    ``[B, kv_heads, capacity, head_dim]`` buffers filled up to ``length`` (RoPE already applied to the keys).
    Sliding layers read only their last ``window`` positions of it."""

    def __init__(self, num_layers, batch, kv_heads, head_dim, capacity, dtype, device=None):
        if capacity < 1 or batch < 1:
            raise ValueError(f"KV cache: expected batch >= 1 and capacity >= 1, found {batch} and {capacity}")
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity, self.dtype, self.length = capacity, dtype, 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @staticmethod
    def bytes_for(config: TextEncoderConfig, batch: int, capacity: int, dtype) -> int:
        """Size of a cache for ``capacity`` positions of every layer of ``config`` (before allocating it)."""
        per = batch * config.num_key_value_heads * capacity * config.head_dim * torch.finfo(dtype).bits // 8
        return 2 * config.num_hidden_layers * per


_WEIGHTS_VERSIONS = itertools.count(1)


def bump_weights_version(module: nn.Module) -> int:
    """Stamp ``module`` with a new weights version (unique in this process) and return it. Loaders call it after
    filling a module; code that changes weights in place must call it too (kept results keyed by the version,
    such as a :class:`lens_core.generator.TextGenerator`'s prefix key/values, are then not reused)."""
    v = next(_WEIGHTS_VERSIONS)
    module.__dict__["lens_weights_version"] = v
    return v


def weights_version(module: nn.Module) -> int:
    """The weights version of ``module`` (stamped now if it has none)."""
    v = module.__dict__.get("lens_weights_version")
    return bump_weights_version(module) if v is None else v


def load_config(folder) -> TextEncoderConfig:
    """``TextEncoderConfig`` from ``folder/config.json`` (convenience for the checkpoint loader and tests)."""
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: expected the GPT-OSS text encoder config.json, found nothing")
    return TextEncoderConfig.from_json(path)
