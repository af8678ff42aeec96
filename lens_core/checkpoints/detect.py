"""Detection from tensor names: component and prefix, foreign checkpoints, quantization markers, family, variant."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterable

from ..lazy_torch import torch

from .errors import CheckpointError
from .source import TensorSource


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


QUANT_FORMATS = {"transformer": ("mxfp8",), "text_encoder": ("nvfp4",)}


MAX_MARKER_BYTES = 1 << 16


def quant_layers(source: TensorSource, component: str) -> dict[str, dict]:
    """{layer name: marker dict} from ``L.comfy_quant`` tensors and a header ``_quantization_metadata``.

    Raises CheckpointError for a format this component does not support (naming the file and layer).
    """
    layers = {}
    md = source.metadata.get("_quantization_metadata")
    if md:
        try:
            found = json.loads(md).get("layers", {})
            if not isinstance(found, dict):
                raise AttributeError
            layers.update(found)
        except (ValueError, AttributeError, RecursionError):
            raise CheckpointError(f"{source.origin}: unreadable _quantization_metadata header entry (expected a JSON "
                                  f"object with a 'layers' object); the file is corrupt") from None
    for k in source.keys():
        if k.endswith(".comfy_quant"):
            e = source.entry(k)
            if e.dtype not in ("U8", "I8") or len(e.shape) != 1 or e.nbytes > MAX_MARKER_BYTES:
                raise CheckpointError(f"{source.file_of(k)}: tensor {k!r} expected a 1-D U8 JSON quantization "
                                      f"marker of at most {MAX_MARKER_BYTES} bytes, found {e.dtype}{list(e.shape)}")
            raw = source.read(k)
            try:
                layers[k[: -len(".comfy_quant")]] = json.loads(bytes(raw.view(torch.uint8).tolist()).decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise CheckpointError(f"{source.file_of(k)}: tensor {k!r} is not a JSON quantization marker") \
                    from None
    allowed = QUANT_FORMATS.get(component, ())
    for name, m in layers.items():
        fmt = m.get("format") if isinstance(m, dict) else None
        if fmt not in allowed:
            raise CheckpointError(f"{source.origin}: layer {name!r} carries the quantization marker format "
                                  f"{fmt!r}, which this loader does not know; supported for the "
                                  f"{COMPONENT_NAMES[component]}: {list(allowed) or 'none'}")
    return layers


def _is_gguf(source: TensorSource) -> bool:
    return any(hasattr(f, "read_bytes") for f in source.files)


def dit_family(source: TensorSource, qlayers: dict) -> str:
    if _is_gguf(source):
        return "gguf-dit"
    if qlayers or any(source.dtype(k) == "F8_E4M3" for k in source.keys() if k.endswith(".weight")):
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
    p = os.path.abspath(os.fspath(path))
    for part in reversed(p.split(os.sep)):
        v = _variant_from_text(part)
        if v:
            return v, "path name"
    return "lens", "default (no variant hint found)"


def _variant_from_text(text: str) -> str | None:
    t = text.lower()
    if re.search(r"lens[-_ ]?turbo|turbo", t):
        return "turbo"
    if re.search(r"lens[-_ ]?base", t):
        return "base"
    if re.search(r"(^|[^a-z])lens([^a-z]|$)", t):
        return "lens"
    return None
