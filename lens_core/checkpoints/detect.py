"""Detection from tensor names: component and prefix, foreign checkpoints, quantization markers, family, variant."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterable

from ..lazy_torch import torch

from ..lazy_torch import LazyModule
from .errors import CheckpointError
from .source import COMPONENT_DIRS, TensorSource


DIT_SIGNATURE = ("transformer_blocks.0.img_mlp.w1.weight", "transformer_blocks.0.attn.norm_added_q.weight")
TE_SIGNATURE = "layers.0.self_attn.sinks"
TE_GGUF_SIGNATURES = ("blk.0.attn_sinks.weight", "blk.0.attn_sinks")   # llama.cpp / unsloth GPT-OSS names
VAE_DIFFUSERS_SIGNATURE = ("decoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight")
VAE_BFL_SIGNATURE = ("decoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight")

# (name pattern, description) of checkpoints that are not Lens components; searched anywhere in a key
FOREIGN = [
    ("input_blocks.0.0.weight", "a Stable Diffusion 1.x/2.x/SDXL UNet checkpoint"),
    ("double_blocks.0.img_attn.qkv.weight", "a FLUX (BFL) transformer checkpoint (double_blocks/single_blocks)"),
    ("joint_blocks.0.", "a Stable Diffusion 3 MMDiT checkpoint"),
    ("transformer_blocks.0.img_mlp.net.0.proj.weight", "a Qwen-Image transformer checkpoint"),
    ("single_transformer_blocks.0.", "a diffusers FLUX transformer checkpoint"),
    ("encoder.block.0.layer.0.SelfAttention", "a T5 text encoder"),
    ("text_model.encoder.layers.0.", "a CLIP text encoder"),
    ("layers.0.self_attn.q_proj.weight", "a decoder-only LLM text encoder without attention sinks (not GPT-OSS)"),
    ("lora_", "a LoRA file"),
    ("lora.", "a LoRA file"),
]


def _foreign(keys) -> str | None:
    for pat, desc in FOREIGN:
        if any(pat in k for k in keys):
            return desc
    return None


def _find_prefix(keys: Iterable[str], suffix: str) -> str | None:
    for k in keys:
        if k.endswith(suffix) and (len(k) == len(suffix) or k[-len(suffix) - 1] == "."):
            return k[: len(k) - len(suffix)]
    return None


@dataclasses.dataclass
class Detection:
    component: str | None         # transformer / text_encoder / vae / None
    prefix: str = ""
    scheme: str = ""              # vae: diffusers / bfl
    description: str = ""


def detect(keys: Iterable[str]) -> Detection:
    """Which Lens component a set of tensor names is (from signature keys), and the prefix to strip."""
    keys = list(keys)
    ks = set(keys)
    p = _find_prefix(keys, DIT_SIGNATURE[0])
    if p is not None and p + DIT_SIGNATURE[1] in ks:
        return Detection("transformer", p, description="a Lens DiT (LensTransformer2DModel)")
    p = _find_prefix(keys, TE_SIGNATURE)
    if p is not None:
        return Detection("text_encoder", p, description="a GPT-OSS text encoder")
    if any(s in ks for s in TE_GGUF_SIGNATURES):
        return Detection("text_encoder", "", "gguf", description="a GPT-OSS text encoder (GGUF names)")
    for signature, scheme in ((VAE_DIFFUSERS_SIGNATURE, "diffusers"), (VAE_BFL_SIGNATURE, "bfl")):
        p = _find_prefix(keys, signature[1])
        if p is not None and p + signature[0] in ks:
            if p + "bn.running_mean" in ks:
                return Detection("vae", p, scheme, f"a FLUX.2 VAE ({'diffusers' if scheme == 'diffusers' else 'BFL/LDM'}"
                                                  f" key names)")
            # a whole SD / SDXL / FLUX.1 checkpoint also holds a VAE (under first_stage_model. / vae.): name the
            # model the rest of the file is, not its VAE
            other = _foreign([k for k in keys if not k.startswith(p)]) if p else None
            if other:
                return Detection(None, description=f"{other} (a full checkpoint; its VAE under '{p}' has no "
                                                   f"FLUX.2 BN statistics either)")
            return Detection(None, p, description="a VAE without the FLUX.2 BN statistics (an SD / SDXL / FLUX.1 "
                                                  "VAE)")
    desc = _foreign(keys)
    if desc:
        return Detection(None, description=desc)
    sample = sorted(keys)[:3]
    return Detection(None, description=f"an unknown checkpoint ({len(keys)} tensors, e.g. {sample})")


COMPONENT_NAMES = {"transformer": "Lens DiT (transformer)", "text_encoder": "GPT-OSS text encoder",
                   "vae": "FLUX.2 VAE"}


def describe(source: TensorSource, det: Detection) -> str:
    """What ``source`` looks like, naming a GGUF file's architecture when the names are not a Lens component."""
    arch = source.architecture
    if arch and det.component is None:
        return f"a GGUF file of architecture {arch!r} ({det.description})"
    return det.description


def _expect(source: TensorSource, component: str) -> Detection:
    det = detect(source.keys())
    if det.component != component:
        raise CheckpointError(f"{source.origin}: expected a {COMPONENT_NAMES[component]} checkpoint, but this "
                              f"looks like {describe(source, det)}")
    return det


def strip_prefix(source: TensorSource, prefix: str) -> TensorSource:
    if not prefix:
        return source
    return source.rename(lambda k: k[len(prefix):] if k.startswith(prefix) else None)


# ComfyUI ``.comfy_quant`` formats (lens_core.quant_formats has their layouts; the DiT and the text encoder take all)
#: (imported when a marker is read: it needs torch and comfy-kitchen, which ``inspect`` of other files never loads)
qf = LazyModule(__name__.rsplit(".", 2)[0] + ".quant_formats")   # the package as imported (ComfyUI: custom_nodes.<pack>.lens_core)
SCALED_FP8_KEY = "scaled_fp8"     # ComfyUI's older fp8-scaled files (comfy.utils.convert_old_quants)


def _header_layers(source: TensorSource, prefix: str) -> dict:
    md = source.metadata.get("_quantization_metadata")
    if not md:
        return {}
    try:
        found = json.loads(md).get("layers", {})
        if not isinstance(found, dict):
            raise AttributeError
    except (ValueError, AttributeError, RecursionError):
        raise CheckpointError(f"{source.origin}: unreadable _quantization_metadata header entry (expected a JSON "
                              f"object with a 'layers' object); the file is corrupt") from None
    # the header names layers by their key in the file (with the model prefix, e.g. model.diffusion_model.)
    return {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in found.items()}


def quant_layers(source: TensorSource, component: str, prefix: str = "") -> dict[str, dict]:
    """{layer name: marker dict} of a ComfyUI quantized file: ``L.comfy_quant`` tensors, the header entry
    ``_quantization_metadata`` (layer names with ``prefix`` stripped) and the older ``scaled_fp8`` form
    (``L.scale_weight`` → float8_e4m3fn; :func:`scaled_fp8_renames` gives its key renames).

    Every marker is decoded and validated (:func:`lens_core.quant_formats.parse_marker`: small JSON, a known
    format, valid options) — a CheckpointError names the file and the layer otherwise. ``component``
    (``"transformer"`` / ``"text_encoder"``) is the caller's: both take every format, so it selects nothing."""
    layers = _header_layers(source, prefix)
    if SCALED_FP8_KEY in source:
        dt = source.dtype(SCALED_FP8_KEY)
        conf = {"format": "float8_e5m2" if dt == "F8_E5M2" else "float8_e4m3fn"}
        layers.update({k[: -len(".scale_weight")]: dict(conf) for k in source.keys() if k.endswith(".scale_weight")})
    for k in source.keys():
        if k.endswith(".comfy_quant"):
            e = source.entry(k)
            if e.dtype not in ("U8", "I8") or len(e.shape) != 1 or e.nbytes > qf.MAX_MARKER_BYTES:
                raise CheckpointError(f"{source.file_of(k)}: tensor {k!r} expected a 1-D U8 JSON quantization "
                                      f"marker (a small JSON object) of at most {qf.MAX_MARKER_BYTES} bytes, found "
                                      f"{e.dtype}{list(e.shape)}; the file is corrupt or crafted")
            layers[k[: -len(".comfy_quant")]] = source.read(k).view(torch.uint8).numpy().tobytes()
    out = {}
    for name, raw in layers.items():
        try:
            marker = qf.decode_marker(raw, name)
            qf.parse_marker(marker, name)
        except qf.QuantFormatError as exc:
            raise CheckpointError(f"{source.origin}: {exc}") from None
        out[name] = marker
    return out


def scaled_fp8_renames(source: TensorSource):
    """The key renames of an older ``scaled_fp8`` file (``.scale_weight`` → ``.weight_scale``, ``.scale_input`` →
    ``.input_scale``; the ``scaled_fp8`` marker dropped), or None for other files."""
    if SCALED_FP8_KEY not in source:
        return None

    def rename(k):
        if k == SCALED_FP8_KEY:
            return None
        for old, new in ((".scale_weight", ".weight_scale"), (".scale_input", ".input_scale")):
            if k.endswith(old):
                return k[: -len(old)] + new
        return k
    return rename


def _is_gguf(source: TensorSource) -> bool:
    return any(hasattr(f, "read_bytes") for f in source.files)


def dit_family(source: TensorSource, qlayers: dict) -> str:
    """``comfy-dit-<format>`` for a ComfyUI quantized file (``comfy-dit-mxfp8`` for the Comfy-Org MXFP8 files,
    also without markers; ``comfy-dit-mixed`` when layers use several formats), gguf-dit, diffusers or bf16."""
    if _is_gguf(source):
        return "gguf-dit"
    formats = {m.get("format") for m in qlayers.values()}
    if len(formats) > 1:
        return "comfy-dit-mixed"
    if formats:
        return "comfy-dit-" + formats.pop()
    if any(source.dtype(k) == "F8_E4M3" for k in source.keys() if k.endswith(".weight")):
        return "comfy-dit-mxfp8"
    if source.config is not None or len(source.files) > 1:
        return "diffusers-transformer"
    return "comfy-dit-bf16"


NVFP4_TE_SUFFIX = "mlp.experts.gate_up_proj.weight"


def te_family(source: TensorSource) -> str:
    if _is_gguf(source):
        return "gguf-text-encoder"
    if any(k.endswith(NVFP4_TE_SUFFIX) for k in source.keys()):
        return "comfy-te-nvfp4"
    if any(k.endswith("gate_up_proj_blocks") for k in source.keys()):
        return "diffusers-text-encoder-mxfp4"
    return "text-encoder-dense"


def detect_variant(path, source: TensorSource | None = None, override: str | None = None) -> tuple[str, str]:
    """(variant, how it was decided): caller override, then metadata/config text, then the path name."""
    from ..config import variant_name

    if override:
        return variant_name(override), "caller"
    texts = []
    if source is not None:
        texts += [f"{k}={v}" for k, v in source.metadata.items() if isinstance(v, str) and len(v) < 4096
                  and k != "_quantization_metadata"]
        if source.config:
            texts += [str(source.config.get(k, "")) for k in ("_name_or_path", "variant", "_lens_variant")]
    for t in texts:
        v = _variant_from_text(t)
        if v:
            return v, "metadata/config"
    for part in variant_path_names(path):
        v = _variant_from_text(part)
        if v:
            return v, "path name"
    return "lens", "default (no variant hint found)"


def variant_path_names(path) -> list[str]:
    """The path names that may tell the variant, nearest first: the file's name, its folder's name and, when
    that folder is a diffusers component folder (``transformer/`` …, or the model folder holds
    ``model_index.json``), the model folder's name — for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<hash>``) the repository folder's. Never folders further up: a grand-parent
    called ``turbo-experiments`` says nothing about the file."""
    p = os.path.abspath(os.fspath(path))
    names = []
    folder = p
    if not os.path.isdir(p):
        names.append(os.path.basename(p))
        folder = os.path.dirname(p)
    names.append(os.path.basename(folder))
    parent = os.path.dirname(folder)
    component_folder = os.path.basename(folder) in COMPONENT_DIRS.values()
    if component_folder or os.path.isfile(os.path.join(parent, "model_index.json")):
        names.append(os.path.basename(parent))
        folder, parent = parent, os.path.dirname(parent)
    if os.path.basename(parent) == "snapshots" and os.path.basename(os.path.dirname(parent)).startswith("models--"):
        names.append(os.path.basename(os.path.dirname(parent)))
    return names


def _variant_from_text(text: str) -> str | None:
    t = text.lower()
    if re.search(r"lens[-_ ]?turbo|turbo", t):
        return "turbo"
    if re.search(r"lens[-_ ]?base", t):
        return "base"
    if re.search(r"(^|[^a-z])lens([^a-z]|$)", t):
        return "lens"
    return None
