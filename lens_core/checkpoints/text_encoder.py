"""GPT-OSS text-encoder loader: diffusers MXFP4 folders and the Comfy-Org NVFP4 single file."""
from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from .. import checks as chk
from .. import ggml
from ..upcast import keep_stored_dtype
from ..ops import build_planned
from .assign import (CheckpointInfo, assign_weights, block_count, checked_config, expect_shapes, gguf_plan,
                     init_empty_weights, keep_gguf_linears, layer_tensors, quant_plan, read_stored_bytes, tensor_dims)
from .detect import _expect, quant_layers, strip_prefix, te_family
from .errors import CheckpointError
from .source import TensorSource, _dtype_summary, _read_json, open_source


REAL_TE_CONFIG = {
    "num_hidden_layers": 24, "hidden_size": 2880, "head_dim": 64, "num_attention_heads": 64,
    "num_key_value_heads": 8, "intermediate_size": 2880, "num_local_experts": 32, "num_experts_per_tok": 4,
    "experts_per_token": 4, "attention_bias": True, "rms_norm_eps": 1e-5, "sliding_window": 128,
    "swiglu_limit": 7.0, "swiglu_alpha": 1.702, "vocab_size": 201088, "max_position_embeddings": 131072,
    "pad_token_id": 199999, "eos_token_id": 200002, "tie_word_embeddings": False, "model_type": "gpt_oss",
    "initial_context_length": 4096,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                        "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": False},
    "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)],
}
REAL_SELECTED_LAYERS = (5, 11, 17, 23)


def te_config_from_shapes(source: TensorSource) -> dict:
    """The real GPT-OSS-20B config with the sizes that shapes reveal (layers, widths, heads, experts)."""
    cfg = json.loads(json.dumps(REAL_TE_CONFIG))
    n = block_count(source, r"model\.layers\.(\d+)\.")
    vocab, hidden = tensor_dims(source, "model.embed_tokens.weight", 2, "the token embedding")
    hd = cfg["head_dim"]
    experts = tensor_dims(source, "model.layers.0.mlp.router.weight", 2, "the MoE router")[0]
    q = tensor_dims(source, "model.layers.0.self_attn.q_proj.weight", 2, "the query projection")[0]
    k = tensor_dims(source, "model.layers.0.self_attn.k_proj.weight", 2, "the key projection")[0]
    cfg.update(num_hidden_layers=n, hidden_size=hidden, vocab_size=vocab, num_local_experts=experts,
               num_attention_heads=q // hd, num_key_value_heads=k // hd,
               num_experts_per_tok=min(cfg["num_experts_per_tok"], experts),
               layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)])
    return cfg


def check_te_config(source: TensorSource, cfg) -> None:
    """The config against the tensors present, before anything is built."""
    found = block_count(source, r"model\.layers\.(\d+)\.")
    if found != cfg.num_hidden_layers:
        raise CheckpointError(f"{source.origin}: {source.config_path or 'the config'} says num_hidden_layers="
                              f"{cfg.num_hidden_layers}, the file holds {found} layers; the config does not belong "
                              f"to these weights. Fix: use this checkpoint's own config.json (or none)")
    qd, kd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    expect_shapes(source, {
        "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "model.layers.0.self_attn.q_proj.weight": (qd, cfg.hidden_size),
        "model.layers.0.self_attn.k_proj.weight": (kd, cfg.hidden_size),
        "model.layers.0.mlp.router.weight": (cfg.num_local_experts, cfg.hidden_size),
    }, f"hidden_size={cfg.hidden_size}, {cfg.num_attention_heads} heads x {cfg.head_dim}, "
       f"{cfg.num_local_experts} experts")


_NVFP4_RENAMES = ((".weight_scale_2", "_scales_2"), (".weight_scale", "_scales"), (".weight", "_blocks"),
                  (".bias", "_bias"))


def _to_hf_te_name(k: str) -> str:
    """Comfy NVFP4 names (no ``model.``; ``experts.<proj>.weight`` …) → the names of ``LensTextEncoder``
    (``model.`` prefix; ``experts.<proj>_blocks/_scales/_scales_2/_bias``, quant.PackedExperts fmt "nvfp4")."""
    if k == "tokenizer_json" or k.startswith(("model.", "lm_head.")):
        return k
    k = "model." + k
    m = re.match(r"(.*\.mlp\.experts\.(?:gate_up|down)_proj)(\.\w+)$", k)
    if m:
        for old, new in _NVFP4_RENAMES:
            if m.group(2) == old:
                return m.group(1) + new
    return k


def _nvfp4_scale_reader(source, name, device):
    """Un-tile one NVFP4 bank's per-expert E4M3 block scales ``[E, Rp, Cp]`` → ``[E, out, in/16]``."""
    from ..quant import NVFP4_BLOCK, untile_block_scales

    e, rows, half = source.shape(name[: -len("_scales")] + "_blocks")
    stored = source.read(name, None, "cpu")
    if stored.dtype != torch.float8_e4m3fn:
        stored = stored.view(torch.float8_e4m3fn)
    return untile_block_scales(stored, rows, half * 2 // NVFP4_BLOCK).contiguous().to(device)


def load_text_encoder(path, dtype=torch.bfloat16, device="cpu", operations=None, config=None,
                      selected_layers=None, experts: str = "packed", storage: str = "compute", meta: bool = False):
    """A ``LensTextEncoder`` from the diffusers MXFP4 ``text_encoder/`` (folder, index or whole diffusers folder),
    the Comfy-Org NVFP4 single file or a GPT-OSS GGUF (:func:`gguf_te_source`). Experts stay packed (dequantized per call) unless
    ``experts="dequantized"``. ``selected_layers`` defaults to the transformer config's
    ``selected_layer_index`` of a diffusers folder, else the real (5, 11, 17, 23). ``storage`` and ``meta``: as
    :func:`lens_core.checkpoints.load_transformer` (bf16 attention/embedding/norms kept bf16 under fp32 compute;
    the model as it would be loaded, parameters on ``meta``, nothing read).
    """
    from .. import text_encoder as te_mod

    source = open_source(path, "text_encoder")
    det = _expect(source, "text_encoder")
    source = strip_prefix(source, det.prefix)
    family = te_family(source)
    qlayers = quant_layers(source, "text_encoder", det.prefix)
    special = {}
    if det.scheme == "gguf":
        source, special, gguf_consumed = gguf_te_source(source, dtype)
    else:
        source, gguf_consumed = source.rename(_to_hf_te_name), set()
    if config is None:
        cfg_dict = source.config if source.config is not None else te_config_from_shapes(source)
        if det.scheme == "gguf":
            cfg_dict = gguf_te_config(source, cfg_dict)
    else:
        cfg_dict = dict(config)
    cfg = checked_config(lambda: te_mod.TextEncoderConfig.from_dict(cfg_dict), source, "text_encoder")
    check_te_config(source, cfg)
    if selected_layers is None:
        selected_layers = _selected_layers_near(path) or REAL_SELECTED_LAYERS
    try:
        selected_layers = te_mod._validate_selected(selected_layers, cfg.num_hidden_layers)
    except ValueError as exc:
        raise CheckpointError(f"{source.origin}: {exc} (this encoder has {cfg.num_hidden_layers} layers; the "
                              f"transformer config's selected_layer_index must name 4 of them)") from None
    kwargs = dict(selected_layers=tuple(selected_layers), operations=operations, device=None, dtype=dtype,
                  experts=experts)
    if family == "comfy-te-nvfp4":
        kwargs["expert_format"] = "nvfp4"
    # ComfyUI quantized Linears / token table (fp8 attention, int8 ConvRot embedding …), under the encoder's names;
    # the expert banks' own nvfp4 markers are the packed banks (lens_core.quant.PackedExperts)
    for n, m in qlayers.items():
        if re.search(r"\.mlp\.experts\.(gate_up|down)_proj$", n) and m.get("format") != "nvfp4":
            raise CheckpointError(f"{source.origin}: expert bank {n!r} is marked {m.get('format')!r}; expert banks "
                                  f"load as NVFP4 (Comfy-Org gpt_oss_20b_nvfp4), MXFP4 (diffusers) or GGUF MXFP4")
    if det.scheme != "gguf":
        qlayers = {_to_hf_te_name(n + ".weight")[: -len(".weight")]: m for n, m in qlayers.items()
                   if not re.search(r"\.mlp\.experts\.(gate_up|down)_proj$", n)}
    consumed = set(gguf_consumed)
    tensors = layer_tensors(source)

    def plan(probe):
        layers = {}
        for name, mod in probe.named_modules():
            if name in qlayers:
                if isinstance(mod, nn.Linear):
                    out_f, in_f, kind = mod.out_features, mod.in_features, "Linear"
                elif isinstance(mod, nn.Embedding):
                    out_f, in_f, kind = mod.num_embeddings, mod.embedding_dim, "Embedding"
                else:
                    raise CheckpointError(f"{source.origin}: layer {name!r} is marked quantized, but the text "
                                          f"encoder has no Linear or Embedding there")
                entry = quant_plan(source, name, qlayers[name], out_f, in_f, dtype, False, special, consumed,
                                   tensors, kind)[1]
                layers[name] = entry
            elif det.scheme == "gguf" and not probe.is_unused_key(name + ".weight"):
                g = gguf_plan(source, name, mod)
                if g is not None:
                    layers[name] = g
                    special[name + ".weight"] = read_stored_bytes
        # markers on layers the encoder does not build (past the last selected layer, lm_head) are not loaded
        names = {n for n, _ in probe.named_modules()}
        missing = sorted(n for n in set(qlayers) - names if not probe.is_unused_key(n + ".weight"))
        if missing:
            raise CheckpointError(f"{source.origin}: quantization markers name {len(missing)} layer(s) the text "
                                  f"encoder does not have, e.g. {missing[:3]}; the file is not this model")
        return layers

    with init_empty_weights():
        model = build_planned(lambda ops: te_mod.LensTextEncoder(cfg, **dict(kwargs, operations=ops)), operations,
                              plan)
    # layers after the last selected one, lm_head and the final norm are never used for features
    consumed |= {k for k in source.keys() if model.is_unused_key(k)}
    special.update({k: _nvfp4_scale_reader for k in source.keys()
                    if family == "comfy-te-nvfp4" and k.endswith("_proj_scales") and k not in consumed})
    from .transformer import _check_storage

    _check_storage(storage)
    if storage == "stored" and operations is None and experts == "packed":
        keep_stored_dtype(model, lambda n: source.dtype(n) if n in source else None, dtype, special)
    model.lens_checkpoint = CheckpointInfo(source.origin, "text_encoder", family, None, "", cfg_dict,
                                           {"dtypes": _dtype_summary(source),
                                            "selected_layers": list(selected_layers),
                                            "embedded_tokenizer": "tokenizer_json" in source})
    if meta:
        source.close()
        return model.eval()
    assign_weights(model, source, device, "text_encoder", special, consumed)
    model.eval()
    te_mod.bump_weights_version(model)       # new weights: what was kept for the old ones is not reused
    source.close()
    return model


GENERATION_FIX = ("load the text encoder from the diffusers text_encoder/ folder of microsoft/Lens, Lens-Turbo or "
                  "Lens-Base (13.8 GB, it has lm_head.weight and model.norm.weight) and use that one for the prompt "
                  "enhancer; the feature encoder itself works with this file")


def load_text_encoder_parts(holder: nn.Module, path, device="cpu", dtype=None, ops=None):
    """Load every tensor of ``holder`` — a module whose state-dict keys are text-encoder checkpoint names
    (``model.layers.N.*``, ``model.norm.*``, ``lm_head.*``: a :class:`lens_core.generator.TextGenerator`), built
    on ``meta`` — from the text-encoder checkpoint ``path``, cast to their dtype, onto ``device``. ``dtype``: what
    a GGUF's dequantized tensors become (default: the holder's first float parameter's). A Linear a GGUF stores
    quantized (``output.weight`` = lm_head) is replaced in ``holder`` by a GGUFLinear (built with ``ops``, the
    encoder's layer operations). A checkpoint without these
    tensors (the Comfy-Org NVFP4 file has no ``lm_head`` / final norm) raises CheckpointError naming the file to
    use; nothing outside ``holder`` is read or changed."""
    names = list(holder.state_dict())
    if dtype is None:
        dtype = next((p.dtype for p in holder.parameters() if p.is_floating_point()), torch.float32)
    source = open_source(path, "text_encoder")
    try:
        det = _expect(source, "text_encoder")
        # lm_head sits beside the "model." body (HF layout): keep it while stripping the detected prefix
        outer = det.prefix[: -len("model.")] if det.prefix.endswith("model.") else det.prefix
        source = source.rename(lambda k: k[len(det.prefix):] if k.startswith(det.prefix) else
                               k[len(outer):] if k.startswith(outer + "lm_head.") else None)
        family = te_family(source)
        quant_layers(source, "text_encoder")
        gguf_special, gguf_consumed = {}, set()
        if det.scheme == "gguf":     # llama.cpp names (output.weight = lm_head), MXFP4 banks read as stored
            source, gguf_special, gguf_consumed = gguf_te_source(source, dtype)
        else:
            source = source.rename(_to_hf_te_name)
        missing = [n for n in names if n not in source]
        if family == "comfy-te-nvfp4":   # its scales are read through the un-tiling reader, not by name
            missing = [n for n in missing if not n.endswith("_proj_scales")]
        if missing:
            raise CheckpointError(f"{source.origin}: text generation (the prompt enhancer) needs {len(missing)} "
                                  f"tensor(s) this {family} checkpoint does not have, e.g. {missing[:3]}"
                                  + ("; the Comfy-Org gpt_oss_20b_nvfp4.safetensors carries no lm_head"
                                     if family == "comfy-te-nvfp4" else "") + f". Fix: {GENERATION_FIX}")
        special = {n: _nvfp4_scale_reader for n in names if family == "comfy-te-nvfp4" and n.endswith("_proj_scales")}
        blocks = {n[: -len("_scales")] + "_blocks" for n in special}
        special.update({n: r for n, r in gguf_special.items() if n in names})
        extra = blocks | {n for n in gguf_consumed if n.rsplit(".", 1)[0] + ".gate_up_proj_blocks" in names}
        wanted = set(names) | extra
        part = source.rename(lambda k: k if k in wanted else None)
        if det.scheme == "gguf":     # Linears stored quantized stay quantized (GGUFLinear), as in the encoder
            special.update(keep_gguf_linears(holder, part, dtype, ops))
        assign_weights(holder, part, device, "text_encoder", special, extra - set(names))
    finally:
        source.close()
    return holder


def _selected_layers_near(path) -> list | None:
    """``selected_layer_index`` of the transformer config in the same diffusers folder, if any."""
    path = os.path.abspath(os.fspath(path))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    for root in (folder, os.path.dirname(folder)):
        cfg = os.path.join(root, "transformer", "config.json")
        if os.path.isfile(cfg):
            value = _read_json(cfg).get("selected_layer_index")
            if value is None:
                return None
            try:
                return list(chk.int_list(value, "selected_layer_index", 0, 255, cfg, 1, 16))
            except ValueError as exc:
                raise CheckpointError(f"{exc}. Fix: restore the transformer config.json of this model") from None
    return None


# --------------------------------------------------------------------------------------------------
# GPT-OSS GGUF (llama.cpp / unsloth / ggml-org names)
# --------------------------------------------------------------------------------------------------
_GGUF_TE_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_GGUF_TE_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_sinks.weight": "self_attn.sinks", "attn_sinks": "self_attn.sinks",
    "ffn_gate_inp.weight": "mlp.router.weight", "ffn_gate_inp.bias": "mlp.router.bias",
    "ffn_down_exps.weight": "mlp.experts.down_proj_blocks", "ffn_down_exps.bias": "mlp.experts.down_proj_bias",
    # gate and up are separate (or fused, gate rows then up rows); the encoder's bank interleaves them
    "ffn_gate_exps.weight": "mlp.experts.gate_up_proj_blocks", "ffn_gate_exps.bias": "mlp.experts.gate_up_proj_bias",
    "ffn_up_exps.weight": "mlp.experts.gguf_up_proj", "ffn_up_exps.bias": "mlp.experts.gguf_up_proj_bias",
    "ffn_gate_up_exps.weight": "mlp.experts.gate_up_proj_blocks",
    "ffn_gate_up_exps.bias": "mlp.experts.gate_up_proj_bias",
}


def gguf_te_name(key: str) -> str:
    """GGUF GPT-OSS tensor name → the ``LensTextEncoder`` name (unknown names are returned unchanged)."""
    if key in _GGUF_TE_GLOBAL:
        return _GGUF_TE_GLOBAL[key]
    m = re.match(r"blk\.(\d+)\.(.+)$", key)
    if m and m.group(2) in _GGUF_TE_LAYER:
        return f"model.layers.{int(m.group(1))}.{_GGUF_TE_LAYER[m.group(2)]}"
    return key


def gguf_te_source(source: TensorSource, dtype):
    """(renamed source, special readers, consumed names) for a GPT-OSS GGUF: the MXFP4 expert tensors (GGML type
    39) go into the packed expert bank as they are stored (nibbles re-ordered, gate/up rows interleaved back,
    nothing dequantized); every other tensor keeps its stored type (quantized Linears stay quantized)."""
    km, fused = {}, {}
    for k, v in source.keymap.items():
        nk = gguf_te_name(k)
        if nk in km:
            raise CheckpointError(f"{source.origin}: tensors {k!r} and another one both map to {nk!r}; "
                                  f"corrupt or unknown GGUF layout")
        km[nk] = v
        if nk.endswith("gate_up_proj_blocks"):
            fused[nk[: -len("gate_up_proj_blocks")]] = "gate_up_exps" in k
    special, consumed = {}, set()
    for prefix, is_fused in fused.items():
        km[prefix + "gate_up_proj_scales"] = km[prefix + "gate_up_proj_blocks"]
        if prefix + "down_proj_blocks" in km:
            km[prefix + "down_proj_scales"] = km[prefix + "down_proj_blocks"]
        readers = _gguf_bank_readers(prefix, is_fused, dtype)
        for name in ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias", "down_proj_blocks",
                     "down_proj_scales"):
            special[prefix + name] = readers
        if not is_fused:
            consumed |= {prefix + "gguf_up_proj", prefix + "gguf_up_proj_bias"}
    return TensorSource(source.files, km, source.origin, source.config, source.config_path), special, consumed


def _gguf_bank_readers(prefix: str, fused: bool, dtype):
    cache = {}

    def expert_type(source, key):
        qtype = source.quant_type(key) if key in source else None
        if qtype != "MXFP4":
            found = source.dtype(key) if key in source else "missing"
            raise CheckpointError(f"{source.file_of(key) if key in source else source.origin}: expert tensor "
                                  f"{key!r} is {found}; only MXFP4 experts (GGML type 39, as in the unsloth / "
                                  f"ggml-org GPT-OSS GGUFs) are supported")

    def bank(source, proj, device):
        if proj == "down_proj":
            parts = [prefix + "down_proj_blocks"]
        else:
            parts = [prefix + "gate_up_proj_blocks"] + ([] if fused else [prefix + "gguf_up_proj"])
        for p in parts:
            expert_type(source, p)
        shapes = [source.shape(p) for p in parts]
        if len(shapes) == 2 and shapes[0] != shapes[1]:
            raise CheckpointError(f"{source.origin}: gate {list(shapes[0])} and up {list(shapes[1])} expert banks "
                                  f"of {prefix!r} differ in shape")
        e, rows, cols = shapes[0]
        g = cols // 32
        if proj == "down_proj":
            blocks, scales = ggml.mxfp4_to_hf(source.read_bytes(parts[0], "cpu"), rows, cols)
            return {"blocks": blocks, "scales": scales}
        half = rows if not fused else rows // 2
        if fused and rows % 2:
            raise CheckpointError(f"{source.origin}: fused gate/up bank {parts[0]!r} has an odd row count {rows}")
        blocks = torch.empty(e, 2 * half, g, 16, dtype=torch.uint8)
        scales = torch.empty(e, 2 * half, g, dtype=torch.uint8)
        stored = [source.read_bytes(p, "cpu") for p in parts]
        for i in range(e):      # one expert at a time keeps the temporaries small
            for j, which in enumerate((0, 1)):
                data = stored[j][i] if not fused else stored[0][i, which * half:(which + 1) * half]
                b, s = ggml.mxfp4_to_hf(data, half, cols)
                blocks[i, which::2] = b
                scales[i, which::2] = s
        del stored
        return {"blocks": blocks, "scales": scales}

    def bias(source, device):
        key = prefix + "gate_up_proj_bias"
        if fused:
            b = source.read(key, dtype, "cpu")
            half = b.shape[-1] // 2
            gate, up = b[..., :half], b[..., half:]
        else:
            gate, up = source.read(key, dtype, "cpu"), source.read(prefix + "gguf_up_proj_bias", dtype, "cpu")
        return torch.stack([gate, up], dim=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1]).to(device)

    def read(source, name, device):
        leaf = name[len(prefix):]
        if leaf == "gate_up_proj_bias":
            return bias(source, device)
        proj, which = leaf.rsplit("_", 1)
        if proj not in cache:
            cache[proj] = bank(source, proj, device)
        t = cache[proj].pop(which)
        if not cache[proj]:
            del cache[proj]
        return t.to(device)

    return read


def _md_number(source, key, kind, lo, hi):
    """A GGUF metadata number, validated (finite, in [lo, hi]); None when absent."""
    v = source.metadata.get(key)
    if v is None:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or isinstance(v, int))
    if not ok or not (lo <= v <= hi):       # NaN fails both comparisons
        raise CheckpointError(f"{source.origin}: GGUF metadata {key} = {v!r}; expected a {kind.__name__} in "
                              f"[{lo}, {hi}]")
    return kind(v)


def gguf_te_config(source: TensorSource, cfg: dict) -> dict:
    """The shape-derived config completed from the GGUF ``gpt-oss.*`` metadata (what shapes cannot tell)."""
    cfg = json.loads(json.dumps(cfg))
    a = "gpt-oss."
    used = _md_number(source, a + "expert_used_count", int, 1, cfg["num_local_experts"])
    if used is not None:
        cfg["num_experts_per_tok"] = cfg["experts_per_token"] = used
    window = _md_number(source, a + "attention.sliding_window", int, 1, 1 << 24)
    if window is not None:
        cfg["sliding_window"] = window
    eps = _md_number(source, a + "attention.layer_norm_rms_epsilon", float, 1e-12, 1e-1)
    if eps is not None:
        cfg["rms_norm_eps"] = eps
    head_dim = _md_number(source, a + "attention.key_length", int, 1, 4096)
    if head_dim is not None and head_dim != cfg["head_dim"]:
        q, k = source.shape("model.layers.0.self_attn.q_proj.weight")[0], \
            source.shape("model.layers.0.self_attn.k_proj.weight")[0]
        if q % head_dim or k % head_dim:
            raise CheckpointError(f"{source.origin}: attention.key_length {head_dim} does not divide the q/k "
                                  f"widths {q}/{k}")
        cfg.update(head_dim=head_dim, num_attention_heads=q // head_dim, num_key_value_heads=k // head_dim)
    rope = cfg["rope_parameters"]
    for key, field in (("rope.freq_base", "rope_theta"), ("rope.scaling.factor", "factor")):
        v = _md_number(source, a + key, float, 1e-6, 1e12)
        if v is not None:
            rope[field] = v
    ctx = _md_number(source, a + "rope.scaling.original_context_length", int, 1, 1 << 24)
    if ctx is not None:
        rope["original_max_position_embeddings"] = ctx
    down = "model.layers.0.mlp.experts.down_proj_blocks"
    if down in source:
        cfg["intermediate_size"] = source.shape(down)[-1]
    return cfg
