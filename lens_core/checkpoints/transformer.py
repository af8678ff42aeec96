"""DiT loader: diffusers folder/shards, Comfy bf16 or MXFP8 single files (optionally fp8 storage), GGUF files."""
from __future__ import annotations

import re

import torch
from torch import nn

from .. import quant_linear as ql
from ..upcast import keep_stored_dtype
from .assign import (CheckpointInfo, _replace_module, assign_weights, block_count, checked_config, expect_shapes,
                     init_empty_weights, keep_gguf_linears, tensor_dims)
from .detect import _expect, detect_variant, dit_family, quant_layers, strip_prefix
from .errors import CheckpointError
from .source import TensorSource, _dtype_summary, open_source


def dit_config_from_shapes(source: TensorSource) -> dict:
    """The transformer config of a single file without config.json (as ComfyUI derives it)."""
    from ..config import REAL_DIT_CONFIG

    keys = list(source.keys())
    heads_dim = 64
    width, in_channels = tensor_dims(source, "img_in.weight", 2, "the image input projection")
    n_layers = block_count(source, r"transformer_blocks\.(\d+)\.")
    n_txt = len({k for k in keys if re.match(r"txt_norm\.\d+\.weight$", k)})
    if n_txt != 4:
        raise CheckpointError(f"{source.origin}: expected 4 txt_norm.N layers, found {n_txt}")
    cfg = REAL_DIT_CONFIG.to_dict()
    cfg.update(in_channels=in_channels, out_channels=tensor_dims(source, "proj_out.weight", 2, "the output "
                                                                 "projection")[0] // 4,
               num_layers=n_layers, attention_head_dim=heads_dim, num_attention_heads=width // heads_dim,
               inner_dim=width, enc_hidden_dim=tensor_dims(source, "txt_norm.0.weight", 1, "the text norm")[0])
    return cfg


def check_dit_config(source: TensorSource, cfg) -> None:
    """The config against the tensors present, before anything is built (sizes, depth, widths)."""
    desc = (f"num_layers={cfg.num_layers}, width={cfg.num_attention_heads}x{cfg.attention_head_dim}, "
            f"enc_hidden_dim={cfg.enc_hidden_dim}")
    found = block_count(source, r"transformer_blocks\.(\d+)\.")
    if found != cfg.num_layers:
        raise CheckpointError(f"{source.origin}: {source.config_path or 'the config'} says num_layers="
                              f"{cfg.num_layers}, the file holds {found} transformer_blocks; the config does not "
                              f"belong to these weights. Fix: use this checkpoint's own config.json (or none)")
    expect_shapes(source, {
        "img_in.weight": (cfg.width, cfg.in_channels),
        "proj_out.weight": (cfg.out_features, cfg.width),
        "txt_norm.0.weight": (cfg.enc_hidden_dim,),
        "transformer_blocks.0.attn.norm_q.weight": (cfg.attention_head_dim,),
        "transformer_blocks.0.img_mlp.w1.weight": (cfg.mlp_hidden, cfg.width),
    }, desc)


def _mxfp8_scale_reader(rows, cols):
    def read(source, name, device):
        stored = source.read(name, torch.uint8 if source.dtype(name) == "U8" else None, "cpu")
        stored = stored.view(torch.uint8)
        return ql.untile_scales(stored, rows, cols // ql.MXFP8_BLOCK).contiguous().to(device)
    return read


def load_transformer(path, dtype=torch.bfloat16, device="cpu", operations=None, config=None,
                     variant: str | None = None, fp8: bool = False, mxfp8_dequantize: bool = False,
                     storage: str = "compute", meta: bool = False):
    """A ``LensTransformer`` from any DiT family (diffusers folder/shards, Comfy bf16 or mxfp8 file, GGUF file of
    the stable-diffusion.cpp layout: Comfy/diffusers names, quantized Linears kept quantized).

    ``dtype`` is the compute/storage dtype of the float weights (fp32 shards are cast tensor by tensor).
    ``fp8=True`` stores eligible Linears (not img_mod/txt_mod, not norms) as float8_e4m3fn + row scale.
    MXFP8 layers stay MXFP8 (dequantized per call) unless ``mxfp8_dequantize=True``.
    ``config`` (dict or LensDiTConfig) overrides config.json / shape-derived values.
    ``storage="stored"`` (with fp32 ``dtype`` and no host ``operations``): float weights stored as bf16/fp16 stay
    so and are upcast per layer (:mod:`lens_core.upcast`: same numbers, half the memory); ``"compute"`` casts
    every float weight to ``dtype``. ``meta=True`` returns the model exactly as it would be loaded (layers,
    dtypes, ``lens_checkpoint``) with its parameters on ``meta``: nothing beyond the headers is read (sizes for
    :mod:`lens_core.memory`).
    """
    from ..config import LensDiTConfig
    from ..dit import LensTransformer

    source = open_source(path, "transformer")
    det = _expect(source, "transformer")
    source = strip_prefix(source, det.prefix)
    qlayers = quant_layers(source, "transformer")
    family = dit_family(source, qlayers)
    if config is None:
        cfg_dict = source.config if source.config is not None else dit_config_from_shapes(source)
    else:
        cfg_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    cfg = checked_config(lambda: LensDiTConfig.from_dict(cfg_dict), source, "transformer")
    check_dit_config(source, cfg)
    var, var_src = detect_variant(path, source, variant)

    # layers stored as MXFP8: a weight_scale sibling + fp8 weight (with or without a comfy_quant marker)
    mx = {k[: -len(".weight_scale")] for k in source.keys() if k.endswith(".weight_scale")
          and source.dtype(k[: -len("_scale")]) == "F8_E4M3"}
    missing_scale = [n for n in qlayers if n not in mx]
    if missing_scale:
        raise CheckpointError(f"{source.origin}: layer(s) {missing_scale[:3]} are marked mxfp8 but have no "
                              f"F8_E4M3 weight + weight_scale pair")
    with init_empty_weights():
        model = LensTransformer(cfg, operations=operations, device=None, dtype=dtype)
    # GGUF: quantized Linears stay in their GGML type (GGUFLinear); F16/F32 tensors are cast like safetensors
    special, consumed = keep_gguf_linears(model, source, dtype), set()
    for name, mod in list(model.named_modules()):
        if name in mx:
            want = (mod.out_features, mod.in_features) if isinstance(mod, nn.Linear) else None
            if tuple(source.shape(name + ".weight")) != want:
                raise CheckpointError(f"{source.origin}: MXFP8 layer {name!r} has weight shape "
                                      f"{list(source.shape(name + '.weight'))}, the model expects "
                                      f"{list(want) if want else 'no quantized layer there'}")
            out_f, in_f = want
            rows, cols = out_f, in_f
            if mxfp8_dequantize:
                special[name + ".weight"] = _mxfp8_dequant_reader(name, rows, cols, dtype)
                consumed.add(name + ".weight_scale")
                continue
            has_bias = (name + ".bias") in source
            new = ql.MXFP8Linear(in_f, out_f, bias=has_bias, device="meta", dtype=dtype)
            _replace_module(model, name, new)
            special[name + ".weight_scale"] = _mxfp8_scale_reader(rows, cols)
        elif fp8 and isinstance(mod, nn.Linear) and ql.fp8_eligible(name) and (name + ".weight") in source:
            new = ql.FP8Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta",
                               dtype=dtype)
            _replace_module(model, name, new)
            special[name + ".weight"], special[name + ".weight_scale"] = _fp8_readers(name)
    _check_storage(storage)
    if storage == "stored" and operations is None:
        keep_stored_dtype(model, lambda n: source.dtype(n) if n in source else None, dtype, special)
        model.compute_dtype = dtype
    model.lens_checkpoint = CheckpointInfo(source.origin, "transformer", family, var, var_src, cfg.to_dict(),
                                           {"dtypes": _dtype_summary(source), "mxfp8_layers": len(mx),
                                            "gguf_layers": sum(isinstance(m, ql.GGUFLinear) for m in model.modules()),
                                            "fp8": fp8})
    if meta:
        source.close()
        return model.eval()
    assign_weights(model, source, device, "transformer", special, consumed)
    model.eval()
    source.close()
    return model


def _check_storage(storage):
    if storage not in ("compute", "stored"):
        raise ValueError(f"storage: expected 'compute' (cast weights to the run dtype) or 'stored' (keep bf16/fp16 "
                         f"weights, upcast per layer), found {storage!r}")


def _mxfp8_dequant_reader(layer, rows, cols, dtype):
    def read(source, name, device):
        w = source.read(name)
        s = source.read(layer + ".weight_scale").view(torch.uint8)
        s = ql.untile_scales(s, rows, cols // ql.MXFP8_BLOCK)
        return ql.dequantize_mxfp8(w, s, dtype).to(device)
    return read


def _fp8_readers(layer):
    """(weight reader, scale reader) for one fp8-stored Linear: the weight is quantized row-wise once, on
    whichever of the two is assigned first."""
    parts = {}

    def quantized(source, device, which):
        if not parts:
            data, scale = ql.quantize_fp8_rowwise(source.read(layer + ".weight", torch.float32))
            parts.update(weight=data, scale=scale)
        return parts.pop(which).to(device)

    return (lambda source, name, device: quantized(source, device, "weight"),
            lambda source, name, device: quantized(source, device, "scale"))
