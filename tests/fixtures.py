"""Tiny checkpoint writers in the exact real layouts of every Lens checkpoint family.

Each writer derives its weights from the golden tiny models (../shared/golden: ``dit_tiny/transformer``,
``pipeline_tiny/{transformer,text_encoder,vae}``), so a test can compare what a family loads to against the plain
fp32 tiny model. Layout facts: ../shared/docs/checkpoint_formats.md.

Families (``FAMILIES``):

==========================  =======================================================================================
``diffusers``               a whole diffusers folder: model_index.json, transformer/ as fp32 shards + index,
                            text_encoder/ as 3 MXFP4 shards + index, vae/, tokenizer/ (with tokenizer.json),
                            scheduler/
``comfy-dit-bf16``          ``lens_bf16.safetensors``: DiT, diffusers names, no prefix, all BF16
``comfy-dit-mxfp8``         ``lens_mxfp8.safetensors``: block Linears (not img_mod/txt_mod) MXFP8 with E8M0 scales
                            in cuBLAS-tiled order + ``.comfy_quant`` JSON markers; everything else BF16
``comfy-te-nvfp4``          ``gpt_oss_20b_nvfp4.safetensors``: GPT-OSS without ``model.``; experts NVFP4 (U8 data
                            high nibble first, tiled F8_E4M3 block scales, F32 per-expert global scale, comfy_quant)
                            + the embedded ``tokenizer_json`` U8 tensor
``vae-diffusers``           ``flux2-vae.safetensors`` with diffusers names (the Comfy-Org/Lens file)
``vae-bfl``                 ``flux2-vae.safetensors`` with BFL/LDM names (the Klein repos' file)
==========================  =======================================================================================

The NVFP4 encoder re-encodes the golden MXFP4 experts *losslessly*: the golden E8M0 exponents lie in
{121, 122, 123}, so with the per-expert global scale 2^-6 every block scale is an exact E4M3 power of two and the
E2M1 codes are kept. The MXFP8 DiT is a real (lossy) quantization of the fp32 weights with ComfyUI's rule.

Writers use safetensors' ``save_file`` (test-side only); nothing here is imported by lens_core.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil

import torch
from safetensors.torch import load_file, save_file

from lens_core import quant_linear as ql

FAMILIES = ("diffusers", "comfy-dit-bf16", "comfy-dit-mxfp8", "comfy-te-nvfp4", "vae-diffusers", "vae-bfl")

FORMAT_META = {"format": "pt"}


def _golden(golden_dir) -> pathlib.Path:
    return pathlib.Path(golden_dir)


def dit_state_dict(golden_dir, which="dit_tiny") -> dict:
    """fp32 DiT weights: ``dit_tiny`` (with golden io) or ``pipeline`` (the pipeline_tiny transformer)."""
    g = _golden(golden_dir)
    p = g / "dit_tiny" / "transformer" if which == "dit_tiny" else g / "pipeline_tiny" / "transformer"
    return load_file(str(p / "diffusion_pytorch_model.safetensors"))


def dit_config(golden_dir, which="dit_tiny") -> dict:
    g = _golden(golden_dir)
    p = g / "dit_tiny" / "transformer" if which == "dit_tiny" else g / "pipeline_tiny" / "transformer"
    return json.loads((p / "config.json").read_text())


# --------------------------------------------------------------------------------------------------
# diffusers folder
# --------------------------------------------------------------------------------------------------
def _write_sharded(sd: dict, folder: pathlib.Path, stem: str, index_name: str, groups: list[list[str]]):
    """Write ``sd`` as shards ``{stem}-0000i-of-0000N.safetensors`` + a huggingface-style index."""
    n = len(groups)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups, 1):
        name = f"{stem}-{i:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys}
        save_file(part, str(folder / name), metadata=FORMAT_META)
        for k, t in part.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def write_diffusers_folder(out, golden_dir, tokenizer_json, name="Lens-tiny") -> pathlib.Path:
    """A complete diffusers Lens folder ``out/name``: transformer as 2 fp32 shards, text encoder as 3 shards."""
    g = _golden(golden_dir) / "pipeline_tiny"
    root = pathlib.Path(out) / name
    root.mkdir(parents=True)
    shutil.copy(g / "model_index.json", root / "model_index.json")
    for sub in ("scheduler", "vae"):
        shutil.copytree(g / sub, root / sub)
    tok = root / "tokenizer"
    shutil.copytree(g / "tokenizer", tok)
    shutil.copy(tokenizer_json, tok / "tokenizer.json")
    # transformer: fp32 shards split after block 0 (globals + block 0 | block 1)
    tr = root / "transformer"
    tr.mkdir()
    shutil.copy(g / "transformer" / "config.json", tr / "config.json")
    sd = load_file(str(g / "transformer" / "diffusion_pytorch_model.safetensors"))
    first = sorted(k for k in sd if not k.startswith("transformer_blocks.1."))
    second = sorted(k for k in sd if k.startswith("transformer_blocks.1."))
    _write_sharded(sd, tr, "diffusion_pytorch_model", "diffusion_pytorch_model.safetensors.index.json",
                   [first, second])
    # text encoder: 3 shards like the real folder (embeddings + final norm | layers 0-2 | layers 3-5)
    te = root / "text_encoder"
    te.mkdir()
    for f in ("config.json", "generation_config.json"):
        shutil.copy(g / "text_encoder" / f, te / f)
    tsd = te_state_dict(golden_dir)
    glob = sorted(k for k in tsd if not k.startswith("model.layers."))
    lo = sorted(k for k in tsd if k.startswith("model.layers.") and int(k.split(".")[2]) < 3)
    hi = sorted(k for k in tsd if k.startswith("model.layers.") and int(k.split(".")[2]) >= 3)
    _write_sharded(tsd, te, "model", "model.safetensors.index.json", [glob, lo, hi])
    return root


def te_state_dict(golden_dir) -> dict:
    """The golden tiny GPT-OSS in its on-disk MXFP4 layout (``model.`` names), merged over its shards."""
    d = _golden(golden_dir) / "pipeline_tiny" / "text_encoder"
    sd = {}
    for f in sorted(d.glob("model-*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


# --------------------------------------------------------------------------------------------------
# Comfy-Org DiT single files
# --------------------------------------------------------------------------------------------------
def write_comfy_dit_bf16(path, golden_dir, which="dit_tiny", prefix="") -> pathlib.Path:
    """``lens_bf16.safetensors``: the DiT in BF16 with diffusers names (optionally under ``prefix``)."""
    sd = {prefix + k: v.to(torch.bfloat16).contiguous() for k, v in dit_state_dict(golden_dir, which).items()}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def mxfp8_layer_names(sd: dict) -> list[str]:
    """The Linears the tiny MXFP8 file quantizes: every 2-D block weight except img_mod/txt_mod, whose input
    width is a multiple of 32 (the tiny GateMLP w2 has 341 inputs and stays BF16; all real Lens Linears are
    aligned, checkpoint_formats.md §2.3)."""
    out = []
    for k, v in sd.items():
        if k.startswith("transformer_blocks.") and k.endswith(".weight") and v.ndim == 2 \
                and "_mod." not in k and v.shape[1] % 32 == 0:
            out.append(k[: -len(".weight")])
    return sorted(out)


def comfy_quant_tensor(obj: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def write_comfy_dit_mxfp8(path, golden_dir, which="dit_tiny", marker_format="mxfp8") -> tuple[pathlib.Path, dict]:
    """``lens_mxfp8.safetensors``. Returns (path, the fp32 state dict the file encodes exactly).

    ``marker_format`` lets a test write an unknown quantization marker.
    """
    src = dit_state_dict(golden_dir, which)
    layers = set(mxfp8_layer_names(src))
    sd, exact = {}, {}
    for k, v in src.items():
        layer = k[: -len(".weight")] if k.endswith(".weight") else None
        if layer in layers:
            data, e = ql.quantize_mxfp8(v)
            sd[k] = data
            sd[layer + ".weight_scale"] = ql.tile_scales(e)
            sd[layer + ".comfy_quant"] = comfy_quant_tensor({"format": marker_format})
            exact[k] = ql.dequantize_mxfp8(data, e)
        else:
            sd[k] = v.to(torch.bfloat16)
            exact[k] = sd[k].float()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in sd.items()}, str(path))
    return path, exact


def quant_eligible(fmt: str, options: dict, shape) -> bool:
    """Whether ComfyUI's quantizer stores an ``[out, in]`` weight in ``fmt`` with ``options`` (ConvRot needs the
    group size to divide the inputs, W4A4 inputs divisible by 64, W4A8 by 16 and its group size)."""
    out_f, in_f = shape
    g = options.get("convrot_groupsize")
    if (fmt == "int8_tensorwise" and options.get("convrot")) or fmt in ("convrot_w4a4", "asym_w4a8_int8"):
        if in_f % g:
            return False
    if fmt == "convrot_w4a4" and in_f % 64:
        return False
    if fmt == "asym_w4a8_int8" and (in_f % 16 or in_f % options["group_size"]):
        return False
    return True


def write_comfy_dit_quant(path, golden_dir, formats, prefix="", header=False, which="dit_tiny",
                          float_dtype=torch.bfloat16) -> tuple[pathlib.Path, dict]:
    """A ComfyUI quantized DiT file, written the way ComfyUI writes one (comfy-kitchen's quantizers;
    ``layer.weight`` + scales + ``layer.comfy_quant``), every other tensor in ``float_dtype``.

    ``formats``: ``{format: options}`` cycled over the block Linears (not img_mod/txt_mod, as ComfyUI's own
    quantized files keep modulation in bf16) that each format can store; or one ``(format, options)``.
    ``header=True`` lists the layers in the ``_quantization_metadata`` header entry instead of comfy_quant
    tensors. Keys get ``prefix`` (e.g. ``model.diffusion_model.``). Returns (path, {layer: (format, options)})."""
    from lens_core import quant_formats as qf

    if isinstance(formats, tuple):
        formats = {formats[0]: formats[1]}
    cycle = list(formats.items())
    src = dit_state_dict(golden_dir, which)
    sd, layers, i = {}, {}, 0
    for k, v in src.items():
        layer = k[: -len(".weight")] if k.endswith(".weight") else None
        chosen = None
        if layer and layer.startswith("transformer_blocks.") and v.ndim == 2 and "_mod." not in layer:
            for j in range(len(cycle)):
                fmt, opts = cycle[(i + j) % len(cycle)]
                if quant_eligible(fmt, opts, tuple(v.shape)):
                    chosen = (fmt, opts)
                    i += j + 1
                    break
        if chosen is None:
            sd[prefix + k] = v.to(float_dtype)
            continue
        f = qf.get(chosen[0])
        tensors, marker = f.quantize(v.float(), dict(chosen[1]))
        for suffix, t in tensors.items():
            sd[prefix + layer + "." + suffix] = t
        layers[layer] = (chosen[0], dict(chosen[1]), marker)
        if not header:
            sd[prefix + layer + ".comfy_quant"] = qf.marker_tensor(marker)
    md = None
    if header:
        md = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {
            prefix + n: m for n, (_, _, m) in layers.items()}})}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in sd.items()}, str(path), metadata=md)
    return path, {n: (f, o) for n, (f, o, _) in layers.items()}


# --------------------------------------------------------------------------------------------------
# Comfy-Org NVFP4 text encoder
# --------------------------------------------------------------------------------------------------
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _mxfp4_blocks_to_nvfp4(blocks: torch.Tensor, scales: torch.Tensor, global_exp: int = -6):
    """MXFP4 ``[E, out, G, 16]`` (low nibble = even) + E8M0 ``[E, out, G]`` → NVFP4 (U8 ``[E, out, in/2]`` high
    nibble = even, tiled F8_E4M3 ``[E, Rp, Cp]``, F32 ``[E]``), exactly (power-of-two scales)."""
    e, out, g, _ = blocks.shape
    lo = blocks & 0x0F
    hi = blocks >> 4
    codes = torch.stack([lo, hi], dim=-1).reshape(e, out, g * 32)           # element order
    packed = ((codes[..., 0::2] << 4) | codes[..., 1::2]).to(torch.uint8)   # even element in the high nibble
    exps = scales.to(torch.int32) - 127 - global_exp                         # per 32 → two per-16 blocks
    block = torch.pow(2.0, exps.float()).repeat_interleave(2, dim=-1)       # [E, out, in/16]
    fp8 = block.to(torch.float8_e4m3fn)
    if not torch.equal(fp8.float(), block):
        raise AssertionError("block scale not exactly representable in E4M3")
    tiled = ql.tile_scales(fp8.view(torch.uint8)).view(torch.float8_e4m3fn)
    glob = torch.full((e,), 2.0 ** global_exp, dtype=torch.float32)
    return packed, tiled, glob


def write_comfy_te_nvfp4(path, golden_dir, tokenizer_json, embed_tokenizer=True) -> pathlib.Path:
    """``gpt_oss_20b_nvfp4.safetensors`` re-encoded losslessly from the golden tiny MXFP4 encoder."""
    src = te_state_dict(golden_dir)
    sd = {}
    for k, v in src.items():
        name = k[len("model."):] if k.startswith("model.") else k
        if name.endswith(("_proj_blocks", "_proj_scales")):
            continue
        if name.endswith(("gate_up_proj_bias", "down_proj_bias")):
            sd[name.replace("_proj_bias", "_proj.bias")] = v
            continue
        sd[name] = v
    for k in src:
        if k.endswith("_proj_blocks"):
            stem = k[: -len("_blocks")]
            packed, tiled, glob = _mxfp4_blocks_to_nvfp4(src[k], src[stem + "_scales"])
            name = stem[len("model."):]
            sd[name + ".weight"] = packed
            sd[name + ".weight_scale"] = tiled
            sd[name + ".weight_scale_2"] = glob
            sd[name + ".comfy_quant"] = comfy_quant_tensor({"format": "nvfp4", "num_experts": int(packed.shape[0])})
    if embed_tokenizer:
        raw = pathlib.Path(tokenizer_json).read_bytes()
        sd["tokenizer_json"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in sd.items()}, str(path))
    return path


def te_config(golden_dir) -> dict:
    return json.loads((_golden(golden_dir) / "pipeline_tiny" / "text_encoder" / "config.json").read_text())


# --------------------------------------------------------------------------------------------------
# VAE single files
# --------------------------------------------------------------------------------------------------
def vae_state_dict(golden_dir) -> dict:
    return load_file(str(_golden(golden_dir) / "pipeline_tiny" / "vae" / "diffusion_pytorch_model.safetensors"))


def vae_config(golden_dir) -> dict:
    return json.loads((_golden(golden_dir) / "pipeline_tiny" / "vae" / "config.json").read_text())


def _diffusers_vae_key_to_bfl(k: str, levels: int) -> str:
    """checkpoint_formats.md §4.3, diffusers → BFL file names (independent of lens_core.vae on purpose)."""
    import re

    rules = [
        (r"^quant_conv\.", "encoder.quant_conv."),
        (r"^post_quant_conv\.", "decoder.post_quant_conv."),
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.", r"encoder.down.\1.block.\2.nin_shortcut."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    ]
    m = re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", k)
    if m:
        return f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}".replace("conv_shortcut", "nin_shortcut")
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", k)
    if m:
        i = levels - 1 - int(m.group(1))
        if m.group(2) == "upsamplers":
            return f"decoder.up.{i}.upsample.{m.group(4)}"
        return f"decoder.up.{i}.block.{m.group(3)}.{m.group(4)}".replace("conv_shortcut", "nin_shortcut")
    for pat, rep in rules:
        if re.match(pat, k):
            return re.sub(pat, rep, k)
    return k


def write_vae(path, golden_dir, scheme="diffusers") -> pathlib.Path:
    """``flux2-vae.safetensors`` in the diffusers (Comfy-Org/Lens) or BFL/LDM (Klein) naming scheme."""
    sd = vae_state_dict(golden_dir)
    if scheme == "bfl":
        levels = len(vae_config(golden_dir)["block_out_channels"])
        out = {}
        for k, v in sd.items():
            nk = _diffusers_vae_key_to_bfl(k, levels)
            if ".mid.attn_1." in nk and not nk.endswith("norm.weight") and not nk.endswith("norm.bias") \
                    and nk.endswith(".weight"):
                v = v[:, :, None, None]
            out[nk] = v
        sd = out
    elif scheme != "diffusers":
        raise ValueError(f"scheme: expected 'diffusers' or 'bfl', got {scheme!r}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in sd.items()}, str(path))
    return path


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------
def write_truncated(src, dst, keep_fraction=0.6) -> pathlib.Path:
    raw = pathlib.Path(src).read_bytes()
    dst = pathlib.Path(dst)
    dst.write_bytes(raw[: int(len(raw) * keep_fraction)])
    return dst


def write_sd_checkpoint(path) -> pathlib.Path:
    """A tiny file with Stable Diffusion (LDM) UNet/VAE key names."""
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
          "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3),
          "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}
    save_file(sd, str(path))
    return pathlib.Path(path)


def write_flux1_checkpoint(path) -> pathlib.Path:
    """A tiny file with FLUX.1 (BFL) transformer key names."""
    sd = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8), "img_in.weight": torch.zeros(8, 64),
          "single_blocks.0.linear1.weight": torch.zeros(8, 8)}
    save_file(sd, str(path))
    return pathlib.Path(path)


def write_pickle_lookalike(path) -> pathlib.Path:
    """Bytes shaped like a torch.save zip archive (never unpickled; the loader must refuse it by itself)."""
    pathlib.Path(path).write_bytes(b"PK\x03\x04" + b"\x00" * 60 + b"archive/data.pkl")
    return pathlib.Path(path)


# --------------------------------------------------------------------------------------------------
# GGUF files (written with the gguf package's own writer; test-side only)
# --------------------------------------------------------------------------------------------------
GGUF_KEEP = (".bias", ".scale", ".weight_scale", "img_in.", "txt_in.", "time_in.", "final_layer.", "embedding")


def _gguf_writer(path, arch):
    import gguf

    w = gguf.GGUFWriter(str(path), arch or "none")
    if arch is None:      # stable-diffusion.cpp files carry no general.architecture
        del w.kv_data[0]["general.architecture"]
    return w


def _gguf_write(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_q4_k(x: torch.Tensor) -> bytes:
    """A plain Q4_K quantizer (the gguf package has none): per 32 values scale = (max − min)/15 and min, both
    6-bit relative to the super-block's f16 ``d`` / ``dmin``; codes rounded to nearest. Returns the block bytes."""
    import numpy as np

    v = x.detach().double().reshape(-1, 8, 32).numpy()
    lo = np.minimum(v.min(-1), 0.0)
    hi = v.max(-1)
    scale = (hi - lo) / 15
    mins = -lo
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (mins.max(-1) / 63).astype(np.float16)
    dd, dm = d.astype(np.float64)[:, None], dmin.astype(np.float64)[:, None]
    sc = np.clip(np.round(np.divide(scale, dd, out=np.zeros_like(scale), where=dd > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(np.divide(mins, dm, out=np.zeros_like(mins), where=dm > 0)), 0, 63).astype(np.uint8)
    es = (dd * sc)[..., None]
    em = (dm * mn)[..., None]
    q = np.clip(np.round(np.divide(v + em, es, out=np.zeros_like(v), where=es > 0)), 0, 15).astype(np.uint8)
    n = v.shape[0]
    scales = np.zeros((n, 12), np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 15) | ((mn[:, 4:8] & 15) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)       # group g: sub-block 2g low, 2g+1 high
    out = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales, qs], axis=1)
    return out


def gguf_quantize(t: torch.Tensor, qtype: str):
    """(numpy array for GGUFWriter.add_tensor, raw GGML type) of ``t`` in ``qtype`` (F32, F16, BF16, Q8_0, Q4_K)."""
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    a = t.detach().float().contiguous().numpy()
    if qtype == "F32":
        return a, None
    if qtype == "F16":
        return a.astype(np.float16), None
    if qtype == "BF16":
        return t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16), T.BF16
    if qtype == "Q8_0":
        return gguf.quants.quantize(a, T.Q8_0), T.Q8_0
    if qtype == "Q4_K":
        rows = a.shape[-1] // 256 * 144
        return quantize_q4_k(t).reshape(*a.shape[:-1], rows), T.Q4_K
    raise ValueError(qtype)


def sdcpp_type(name: str, t: torch.Tensor, qtype: str) -> str:
    """The type stable-diffusion.cpp's converter gives a tensor (lora_gguf_reasoner.md §2): the requested type,
    except names it keeps and rows that are not whole blocks, which stay F16."""
    block = {"Q8_0": 32, "Q4_K": 256}.get(qtype, 1)
    if qtype in ("F16", "F32") or any(k in name for k in GGUF_KEEP) or t.shape[-1] % block:
        return "F16" if qtype != "F32" else "F32"
    return qtype


def write_gguf_dit(path, golden_dir, qtype="F16", which="dit_tiny", arch=None) -> tuple[pathlib.Path, dict]:
    """The tiny DiT as a stable-diffusion.cpp GGUF (no general.architecture, diffusers names). Returns (path,
    {name: GGML type})."""
    w = _gguf_writer(path, arch)
    w.add_uint32("general.alignment", 32)
    types = {}
    for k, v in dit_state_dict(golden_dir, which).items():
        types[k] = sdcpp_type(k, v, qtype)
        data, raw = gguf_quantize(v, types[k])
        w.add_tensor(k, data, raw_dtype=raw)
    _gguf_write(w)
    return pathlib.Path(path), types


def _ggml_mxfp4(blocks: torch.Tensor, scales: torch.Tensor):
    """HF MXFP4 (element 2i in the low nibble of byte i) → GGML type-39 bytes (scale byte, then element j in the
    low nibble of byte j and j + 16 in its high nibble): written here independently of lens_core.ggml."""
    import numpy as np

    b = blocks.numpy()
    codes = np.stack([b & 15, b >> 4], axis=-1).reshape(*b.shape[:-1], 32)
    qs = (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)
    out = np.concatenate([scales.numpy()[..., None], qs], axis=-1)
    return out.reshape(*b.shape[:-2], b.shape[-2] * 17)


def write_gguf_te(path, golden_dir, fused=False, float_type="BF16", folder=None,
                  embed_type="BF16") -> pathlib.Path:
    """The golden tiny GPT-OSS (or the diffusers-style ``folder``, e.g. :func:`write_gptoss_lm`'s) as a llama.cpp /
    unsloth GGUF (``gpt-oss`` architecture, ``blk.N.*`` names, MXFP4 experts with gate/up de-interleaved, separate
    or fused ``ffn_gate_up_exps``; ``lm_head`` → ``output.weight``, final norm → ``output_norm.weight``)."""
    import gguf

    if folder is None:
        cfg, src = te_config(golden_dir), te_state_dict(golden_dir)
    else:
        folder = pathlib.Path(folder)
        cfg, src = json.loads((folder / "config.json").read_text()), {}
        for f in sorted(folder.glob("model*.safetensors")):
            src.update(load_file(str(f)))
    w = _gguf_writer(path, "gpt-oss")
    a = "gpt-oss."
    w.add_uint32(a + "block_count", cfg["num_hidden_layers"])
    w.add_uint32(a + "context_length", cfg["max_position_embeddings"])
    w.add_uint32(a + "embedding_length", cfg["hidden_size"])
    w.add_uint32(a + "feed_forward_length", cfg["intermediate_size"])
    w.add_uint32(a + "attention.head_count", cfg["num_attention_heads"])
    w.add_uint32(a + "attention.head_count_kv", cfg["num_key_value_heads"])
    w.add_uint32(a + "attention.key_length", cfg["head_dim"])
    w.add_uint32(a + "attention.value_length", cfg["head_dim"])
    w.add_float32(a + "rope.freq_base", cfg["rope_parameters"]["rope_theta"])
    w.add_float32(a + "attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.add_uint32(a + "expert_count", cfg["num_local_experts"])
    w.add_uint32(a + "expert_used_count", cfg["num_experts_per_tok"])
    w.add_uint32(a + "attention.sliding_window", cfg["sliding_window"])
    w.add_string(a + "rope.scaling.type", "yarn")
    w.add_float32(a + "rope.scaling.factor", cfg["rope_parameters"]["factor"])
    w.add_uint32(a + "rope.scaling.original_context_length",
                 cfg["rope_parameters"]["original_max_position_embeddings"])
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"] * 30)       # a long string array, as real files have
    T = gguf.GGMLQuantizationType
    simple = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.router": "ffn_gate_inp"}
    norms = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
             "self_attn.sinks": "attn_sinks.weight"}

    def put(name, t, qtype=float_type):
        data, raw = gguf_quantize(t, qtype)
        w.add_tensor(name, data, raw_dtype=raw)

    for k, v in src.items():
        if k == "model.embed_tokens.weight":
            put("token_embd.weight", v, embed_type)
        elif k == "model.norm.weight":
            put("output_norm.weight", v, "F32")
        elif k == "lm_head.weight":
            put("output.weight", v)
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for hf, gg in norms.items():
            put(b + gg, src[p + hf], "F32")
        for hf, gg in simple.items():
            put(f"{b}{gg}.weight", src[f"{p}{hf}.weight"])
            put(f"{b}{gg}.bias", src[f"{p}{hf}.bias"], "F32")
        e = p + "mlp.experts."
        gu_b, gu_s = src[e + "gate_up_proj_blocks"], src[e + "gate_up_proj_scales"]
        gate = _ggml_mxfp4(gu_b[:, 0::2], gu_s[:, 0::2])
        up = _ggml_mxfp4(gu_b[:, 1::2], gu_s[:, 1::2])
        bias = src[e + "gate_up_proj_bias"]
        if fused:
            import numpy as np

            w.add_tensor(b + "ffn_gate_up_exps.weight", np.concatenate([gate, up], axis=1), raw_dtype=T.MXFP4)
            put(b + "ffn_gate_up_exps.bias", torch.cat([bias[:, 0::2], bias[:, 1::2]], dim=-1), "F32")
        else:
            w.add_tensor(b + "ffn_gate_exps.weight", gate, raw_dtype=T.MXFP4)
            w.add_tensor(b + "ffn_up_exps.weight", up, raw_dtype=T.MXFP4)
            put(b + "ffn_gate_exps.bias", bias[:, 0::2], "F32")
            put(b + "ffn_up_exps.bias", bias[:, 1::2], "F32")
        w.add_tensor(b + "ffn_down_exps.weight", _ggml_mxfp4(src[e + "down_proj_blocks"], src[e + "down_proj_scales"]),
                     raw_dtype=T.MXFP4)
        put(b + "ffn_down_exps.bias", src[e + "down_proj_bias"], "F32")
    _gguf_write(w)
    return pathlib.Path(path)


# Random GPT-OSS causal LM (text generation / the prompt enhancer)
# --------------------------------------------------------------------------------------------------
def gptoss_lm_config(vocab=300, hidden=64, layers=4, heads=4, kv_heads=2, head_dim=32, experts=4, top_k=2,
                     window=5, tie=False) -> dict:
    """A transformers-style GPT-OSS ``config.json`` (MXFP4 quantization_config, yarn rope, alternating
    sliding/full layers) for a tiny random model."""
    return {
        "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "dtype": "float32",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "num_local_experts": experts, "num_experts_per_tok": top_k, "experts_per_token": top_k,
        "sliding_window": window, "attention_bias": True, "rms_norm_eps": 1e-5, "swiglu_limit": 7.0,
        "tie_word_embeddings": tie, "max_position_embeddings": 131072, "initial_context_length": 4096,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                            "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": False},
        "pad_token_id": 0, "eos_token_id": 1,
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
    }


def write_gptoss_lm(folder, seed=0, dtype=torch.float32, eos=(1,), shards=2, **cfg_kw) -> pathlib.Path:
    """A random GPT-OSS causal LM as a diffusers ``text_encoder/`` folder: config.json, generation_config.json,
    ``model-0000i-of-0000N.safetensors`` + index, experts in the real MXFP4 layout (``*_blocks [E, out, G, 16]``
    low nibble first, E8M0 ``*_scales``), ``lm_head`` untied unless ``tie=True``. Loadable by transformers'
    ``GptOssForCausalLM.from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True))``."""
    from lens_core.benchmarks.te import random_gptoss_state_dict

    cfg = gptoss_lm_config(**cfg_kw)
    sd = random_gptoss_state_dict(cfg, seed=seed, dtype=dtype, scales=(121, 124))
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    groups = [keys[k::shards] for k in range(shards)]
    _write_sharded(sd, folder, "model", "model.safetensors.index.json", groups)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": list(eos), "pad_token_id": 0, "do_sample": True}, indent=1))
    return folder
