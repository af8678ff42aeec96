"""Text generation on a Lens text encoder's weights: :class:`TextGenerator` (the prompt enhancer's model).

The feature encoder (:class:`lens_core.text_encoder.LensTextEncoder`) holds the embedding and the decoder
layers up to the last selected one. Generation needs all layers, the final norm ``model.norm`` and the output
head ``lm_head`` (or the tied embedding). A :class:`TextGenerator`:

- **references** the encoder and its layers (they are used, never copied, moved or changed: the encoder stays a
  feature encoder, its state dict and size unchanged);
- **owns** what the encoder lacks: the later decoder layers, ``model.norm`` and ``lm_head`` (its own state dict,
  with the checkpoint's key names, loaded by :meth:`TextGenerator.load_weights`; a host such as ComfyUI can give
  it its own ModelPatcher);
- **owns its caches explicitly**: the KV cache of the generation in progress (:attr:`TextGenerator.kv_cache`,
  ``None`` between runs) and the kept key/values of a fixed prompt prefix (the enhancer's system prompt;
  :meth:`TextGenerator.clear_prefix_cache`);
- **is invalidated by explicit weights versions**: every loader stamps the module it fills with a new
  :func:`lens_core.text_encoder.weights_version` (``load_text_encoder``, ``LensTextEncoder.load_state_dict``,
  :meth:`TextGenerator.load_weights`; code that changes weights in place calls
  :func:`lens_core.text_encoder.bump_weights_version`). A kept prefix is reused only while the encoder's and the
  generator's versions are those it was computed with.

Numbers are those of transformers' ``GptOssForCausalLM`` (tests/test_enhance.py): the prompt is prefilled in
one pass, then one token per step against the cache (sinks, the sliding window on alternating layers, YaRN RoPE
at any position).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .ops import cast_to
from .text_encoder import (GptOssDecoderLayer, GptOssRMSNorm, KVCache, LensTextEncoder, bump_weights_version,
                           weights_version)


class _Strong:
    """A plain (non-module) strong reference, so the encoder is not registered as a submodule."""

    def __init__(self, obj):
        self.obj = obj

    def __call__(self):
        return self.obj


class TextGenerator(nn.Module):
    """GPT-OSS text generation on ``encoder``'s weights (see the module docstring).

    ``TextGenerator(encoder)`` builds the missing modules on ``meta`` with the encoder's operations and dtype;
    :meth:`load_weights` loads them. ``weak=True`` keeps only a weak reference to the encoder (used by
    :func:`lens_core.enhance.generator_for`, which keeps one generator per live encoder)."""

    def __init__(self, encoder: LensTextEncoder, *, weak: bool = False):
        super().__init__()
        if not isinstance(encoder, LensTextEncoder):
            raise ValueError(f"TextGenerator: expected a LensTextEncoder, found {type(encoder).__name__}")
        self._encoder = weakref.ref(encoder) if weak else _Strong(encoder)
        cfg, b = encoder.config, encoder._build
        self.config = cfg
        self.first_own_layer = len(encoder.model.layers)
        self.model = nn.Module()         # checkpoint key names: model.layers.N.*, model.norm.*, lm_head.*
        self.model.layers = nn.ModuleDict({
            str(i): GptOssDecoderLayer(cfg, i, b["ops"], b["experts"], b["expert_format"], device="meta",
                                       dtype=b["dtype"]) for i in range(self.first_own_layer, cfg.num_hidden_layers)})
        self.model.norm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device="meta", dtype=b["dtype"])
        self.lm_head = (None if cfg.tie_word_embeddings else
                        b["ops"].Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta", dtype=b["dtype"]))
        self._loaded = False             # set by load_weights / load_state_dict
        self.loaded_from = None
        self.kv_cache = None             # the KV cache of the generation in progress
        self._prefix = None              # (key, [k], [v]) of the kept prefix, on the CPU

    # ---- the encoder and the layers --------------------------------------------------------------------
    @property
    def encoder(self) -> LensTextEncoder:
        enc = self._encoder()
        if enc is None:
            raise ValueError("TextGenerator: its text encoder no longer exists (it was freed); build a generator "
                             "for the encoder in use")
        return enc

    def decoder_layers(self) -> list:
        """All decoder layers in order: the encoder's (referenced) then this generator's own."""
        return list(self.encoder.model.layers) + list(self.model.layers.values())

    @property
    def ready(self) -> bool:
        """Whether the generator's own weights are loaded (nothing left on ``meta``)."""
        return self._loaded and all(p.device.type != "meta" for p in self.parameters())

    @property
    def weights_version(self) -> int | None:
        """The version stamped when its weights were loaded (:func:`lens_core.text_encoder.weights_version`);
        None before."""
        return weights_version(self) if self._loaded else None

    def _head_weight_module(self):
        return self.encoder.model.embed_tokens if self.lm_head is None else self.lm_head

    # ---- weights ---------------------------------------------------------------------------------------
    def load_weights(self, path=None, device=None) -> "TextGenerator":
        """Load the generator's own modules from the text-encoder checkpoint ``path`` (default: the one the
        encoder was loaded from, ``encoder.lens_checkpoint.path``) onto ``device`` (default: where the encoder's
        embedding is). A GGUF's quantized ``output.weight`` stays quantized. Idempotent; the encoder is never
        modified; on failure the generator stays unloaded. Stamps a new weights version (kept prefix dropped)."""
        from . import checkpoints as ck

        if self.ready:
            return self
        enc = self.encoder
        if path is None:
            path = getattr(getattr(enc, "lens_checkpoint", None), "path", None)
        if path is None:
            raise ValueError("TextGenerator.load_weights: this text encoder was not loaded by lens_core.checkpoints "
                             "(no lens_checkpoint.path); pass path= (the diffusers text_encoder/ folder)")
        if device is None:
            w = enc.model.embed_tokens.weight
            device = w.device if w.device.type != "meta" else torch.device("cpu")
        self.clear_prefix_cache()
        ck.load_text_encoder_parts(self, path, device=device, dtype=enc.model.embed_tokens.weight.dtype,
                                   ops=enc._build.get("ops"))
        self.loaded_from = path
        self._loaded = True
        bump_weights_version(self)
        return self

    def load_state_dict(self, *args, **kwargs):
        out = super().load_state_dict(*args, **kwargs)
        self._loaded = True
        bump_weights_version(self)
        self.clear_prefix_cache()
        return out

    # ---- caches ----------------------------------------------------------------------------------------
    def new_kv_cache(self, batch: int, capacity: int, dtype=None, device=None) -> KVCache:
        """An empty key/value cache for ``capacity`` positions of every layer."""
        enc = self.encoder
        attn = enc.model.layers[0].self_attn
        dtype = dtype or enc.compute_dtype or attn.k_proj.weight.dtype
        return KVCache(self.config.num_hidden_layers, batch, attn.kv_heads, attn.head_dim, capacity, dtype, device)

    def clear_prefix_cache(self):
        """Forget the kept prefix key/values."""
        self._prefix = None

    @property
    def prefix_cache(self):
        """(prefix ids, dtype, device, encoder version, generator version) of the kept prefix, or None."""
        return None if self._prefix is None else self._prefix[0]

    def _prefix_key(self, prefix, cache):
        return (tuple(prefix[0].tolist()), cache.dtype, str(prefix.device), weights_version(self.encoder),
                self.weights_version)

    def prefill_prefix(self, prefix: torch.Tensor, cache: KVCache):
        """Fill ``cache`` with the keys/values of ``prefix [1, P]``: copied from the kept prefix when it is the
        same (ids, dtype, device, weights versions), otherwise computed by one prefill pass and kept (a CPU
        copy, ≈ 32 MB for GPT-OSS-20B's 650-token system prompt in bf16)."""
        p = prefix.shape[1]
        key = self._prefix_key(prefix, cache)
        if self._prefix is not None and self._prefix[0] == key:
            for i, (k, v) in enumerate(zip(*self._prefix[1:])):
                cache.k[i][:, :, :p].copy_(k)
                cache.v[i][:, :, :p].copy_(v)
            cache.length = p
            return
        self._prefix = None
        self.logits_step(prefix, cache)
        # kept in CPU memory (a host's offloading cannot see it; copying it back costs little)
        self._prefix = (key, [k[:, :, :p].to("cpu", copy=True) for k in cache.k],
                        [v[:, :, :p].to("cpu", copy=True) for v in cache.v])

    # ---- forward ---------------------------------------------------------------------------------------
    def logits_step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run ``input_ids [B, t]`` (the tokens at positions ``cache.length …``) through all layers with the
        cache, append their keys/values, and return the fp32 next-token logits ``[B, vocab]`` of the last
        position (final norm + ``lm_head``). The whole prompt in one call (prefill), then one token per call."""
        if not self.ready:
            raise ValueError("text generation needs all decoder layers, model.norm and lm_head: load them first "
                             "with TextGenerator.load_weights() (lens_core.enhance.load_generation_weights)")
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids: expected [B, T] with T >= 1, found {tuple(input_ids.shape)}")
        return self._logits_step(input_ids, cache)

    def prepare(self):
        """Before a generation: own layers share the encoder's decode-time expert cache (if any), and
        ``experts="dequantized"`` banks are expanded."""
        enc = self.encoder
        shared = enc.model.layers[0].mlp.experts.__dict__.get("expert_cache") if len(enc.model.layers) else None
        for layer in self.model.layers.values():
            layer.mlp.experts.expert_cache = shared
        layers = self.decoder_layers()
        for layer in layers:
            if layer.mlp.experts.mode == "dequantized" and layer.mlp.experts.is_packed:
                layer.mlp.experts.dequantize_()
        return layers

    def _logits_step(self, input_ids, cache, layers=None):
        """:meth:`logits_step` without the checks (the generation loop checks once)."""
        enc = self.encoder
        layers = self.prepare() if layers is None else layers
        b, t = input_ids.shape
        start = cache.length
        if start + t > cache.capacity:
            raise ValueError(f"KV cache: {start} + {t} positions exceed its capacity {cache.capacity}")
        dtype = cache.dtype
        x = enc.model.embed_tokens(input_ids).to(dtype)
        cos, sin = enc.rope_tables(t, dtype, x.device, start=start)
        masks = {"full": None, "sliding": None}
        if t > 1:  # prompt: causal (+ window) mask over the keys each layer reads
            q = torch.arange(start, start + t, device=x.device).view(t, 1)
            neg, zero = torch.finfo(dtype).min, torch.zeros((), dtype=dtype, device=x.device)
            k_full = torch.arange(0, start + t, device=x.device).view(1, -1)
            masks["full"] = torch.where(k_full <= q, zero, neg)[None, None]
            w = self.config.sliding_window
            k_win = torch.arange(max(0, start - w + 1), start + t, device=x.device).view(1, -1)
            masks["sliding"] = torch.where((k_win <= q) & (q - k_win < w), zero, neg)[None, None]
        for i, layer in enumerate(layers):
            x = layer.forward_cached(x, cos, sin, cache.k[i], cache.v[i], start, masks)
        cache.length = start + t
        h = self.model.norm(x[:, -1:])
        if self.lm_head is not None:
            logits = self.lm_head(h)
        else:
            logits = F.linear(h, cast_to(enc.model.embed_tokens.weight, h.dtype, h.device))
        return logits[:, -1].float()
