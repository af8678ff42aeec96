"""DiT loader: diffusers folder/shards, Comfy bf16 / ComfyUI quantized single files (optionally fp8 storage), GGUF."""
from __future__ import annotations

import re

import torch
from torch import nn

from .. import quant_linear as ql
from ..quant_linear import fp8_eligible
from ..upcast import keep_stored_dtype
from .assign import (CheckpointInfo, assign_weights, block_count, checked_config, expect_shapes, gguf_plan,
                     init_empty_weights, layer_tensors, quant_plan, read_stored_bytes, tensor_dims)
from .detect import _expect, detect_variant, dit_family, quant_layers, scaled_fp8_renames, strip_prefix
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


def check_dit_config(source: TensorSource, cfg, quantized=()) -> None:
    """The config against the tensors present, before anything is built (sizes, depth, widths). The weights of
    ``quantized`` layers (packed / padded storage) are checked against the built layers instead (quant_plan)."""
    desc = (f"num_layers={cfg.num_layers}, width={cfg.num_attention_heads}x{cfg.attention_head_dim}, "
            f"enc_hidden_dim={cfg.enc_hidden_dim}")
    found = block_count(source, r"transformer_blocks\.(\d+)\.")
    if found != cfg.num_layers:
        raise CheckpointError(f"{source.origin}: {source.config_path or 'the config'} says num_layers="
                              f"{cfg.num_layers}, the file holds {found} transformer_blocks; the config does not "
                              f"belong to these weights. Fix: use this checkpoint's own config.json (or none)")
    wanted = {
        "img_in.weight": (cfg.width, cfg.in_channels),
        "proj_out.weight": (cfg.out_features, cfg.width),
        "txt_norm.0.weight": (cfg.enc_hidden_dim,),
        "transformer_blocks.0.attn.norm_q.weight": (cfg.attention_head_dim,),
        "transformer_blocks.0.img_mlp.w1.weight": (cfg.mlp_hidden, cfg.width),
    }
    expect_shapes(source, {k: v for k, v in wanted.items() if k[: -len(".weight")] not in quantized}, desc)


def load_transformer(path, dtype=torch.bfloat16, device="cpu", operations=None, config=None,
                     variant: str | None = None, fp8: bool = False, dequantize: bool = False,
                     mxfp8_dequantize: bool = False, dit_class=None, storage: str = "compute",
                     meta: bool = False):
    """A ``LensTransformer`` from any DiT family: diffusers folder/shards, Comfy bf16 file, a ComfyUI quantized
    file (``.comfy_quant`` formats, mixed per layer, markers as tensors or in the ``_quantization_metadata``
    header, bare or ``model.diffusion_model.`` keys; the Comfy-Org MXFP8 files), a GGUF file of the
    stable-diffusion.cpp layout.

    Quantized layers stay quantized (their stored tensors are the resident weights: resident ≈ file size) in the
    storage class the ``operations`` namespace gives for their family (:mod:`lens_core.quant_linear`; a host
    passes its own); ``dequantize=True`` (alias ``mxfp8_dequantize``) loads them as plain Linears in ``dtype``.
    ``dtype`` is the compute/storage dtype of the float weights (fp32 shards are cast tensor by tensor).
    ``fp8=True`` stores the eligible float Linears (not img_mod/txt_mod, not norms) as float8_e4m3fn + row scale.
    ``config`` (dict or LensDiTConfig) overrides config.json / shape-derived values.
    ``dit_class``: the module class to build (a ``LensTransformer`` subclass a host adds its call convention to).
    ``storage="stored"`` (with fp32 ``dtype`` and no host ``operations``): float weights stored as bf16/fp16 stay
    so and are upcast per layer (:mod:`lens_core.upcast`: same numbers, half the memory); ``"compute"`` casts
    every float weight to ``dtype``. ``meta=True`` returns the model exactly as it would be loaded (layers,
    dtypes, ``lens_checkpoint``) with its parameters on ``meta``: nothing beyond the headers is read (sizes for
    :mod:`lens_core.memory`).
    """
    from ..config import LensDiTConfig
    from ..dit import LensTransformer
    from ..ops import build_planned

    if dit_class is not None and not (isinstance(dit_class, type) and issubclass(dit_class, LensTransformer)):
        raise TypeError(f"dit_class: expected a LensTransformer subclass, got {dit_class!r}")
    dit_class = dit_class or LensTransformer
    dequantize = dequantize or mxfp8_dequantize
    source = open_source(path, "transformer")
    det = _expect(source, "transformer")
    source = strip_prefix(source, det.prefix)
    qlayers = quant_layers(source, "transformer", det.prefix)
    renames = scaled_fp8_renames(source)
    if renames is not None:
        source = source.rename(renames)
    family = dit_family(source, qlayers)
    if config is None:
        cfg_dict = source.config if source.config is not None else dit_config_from_shapes(source)
    else:
        cfg_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    cfg = checked_config(lambda: LensDiTConfig.from_dict(cfg_dict), source, "transformer")
    # Comfy-Org MXFP8 files without markers: an F8_E4M3 weight with a weight_scale sibling is an mxfp8 layer
    for k in source.keys():
        if k.endswith(".weight_scale") and k[: -len("_scale")] in source \
                and source.dtype(k[: -len("_scale")]) == "F8_E4M3" and k[: -len(".weight_scale")] not in qlayers:
            qlayers[k[: -len(".weight_scale")]] = {"format": "mxfp8"}
    check_dit_config(source, cfg, qlayers)
    var, var_src = detect_variant(path, source, variant)

    special, consumed, counts = {}, set(), {}
    tensors = layer_tensors(source)

    def plan(probe):
        layers = {}
        for name, mod in probe.named_modules():
            if name in qlayers:
                if not isinstance(mod, nn.Linear):
                    raise CheckpointError(f"{source.origin}: layer {name!r} is marked quantized "
                                          f"({qlayers[name].get('format')}), but the Lens DiT has no Linear there")
                spec = quant_plan(source, name, qlayers[name], mod.out_features, mod.in_features, dtype,
                                  dequantize, special, consumed, tensors)
                counts[spec[0]] = counts.get(spec[0], 0) + 1
                if spec[1] is not None:
                    layers[name] = spec[1]
            elif isinstance(mod, nn.Linear) and name + ".weight" in source:
                g = gguf_plan(source, name, mod)
                if g is not None:
                    layers[name] = g
                    special[name + ".weight"] = read_stored_bytes
                    counts["gguf"] = counts.get("gguf", 0) + 1
                elif fp8 and fp8_eligible(name):
                    layers[name] = ("FP8Linear", {})
                    special[name + ".weight"], special[name + ".weight_scale"] = _fp8_readers(name)
        missing = sorted(set(qlayers) - {n for n, _ in probe.named_modules()})
        if missing:
            raise CheckpointError(f"{source.origin}: quantization markers name {len(missing)} layer(s) the Lens DiT "
                                  f"does not have, e.g. {missing[:3]}; the file is not this model or is corrupt")
        return layers

    with init_empty_weights():
        model = build_planned(lambda ops: dit_class(cfg, operations=ops, device=None, dtype=dtype),
                              operations, plan)
    _check_storage(storage)
    if storage == "stored" and operations is None:
        keep_stored_dtype(model, lambda n: source.dtype(n) if n in source else None, dtype, special)
        model.compute_dtype = dtype
    model.lens_checkpoint = CheckpointInfo(source.origin, "transformer", family, var, var_src, cfg.to_dict(),
                                           {"dtypes": _dtype_summary(source), "quantized_layers": counts,
                                            "mxfp8_layers": counts.get("mxfp8", 0),
                                            "gguf_layers": counts.get("gguf", 0), "fp8": fp8,
                                            "dequantized": bool(dequantize and qlayers)})
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
