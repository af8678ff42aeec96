"""``inspect``: what a file or folder is (family, component, variant, dtypes, sizes), nothing loaded."""
from __future__ import annotations

import os
import re

from .. import checks as chk
from ..jsonfile import read_json_object
from .detect import describe, detect, detect_variant, dit_family, quant_layers, strip_prefix, te_family
from .errors import CheckpointError
from .safetensors import SafetensorsFile
from .source import TensorSource, _dtype_summary, _has_weights, is_diffusers_root, open_source
from .shapes import block_count


def inspect(path, variant: str | None = None) -> dict:
    """What ``path`` is: family, component, variant, dtypes, tensor count and size (nothing is loaded).

    A diffusers folder returns ``{"family": "diffusers", "components": {name: {...}}, ...}``.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise chk.missing_path(p)
    if is_diffusers_root(p):
        comps = {}
        for c in ("transformer", "text_encoder", "vae"):
            try:
                comps[c] = inspect(os.path.join(p, c), variant)
            except (CheckpointError, FileNotFoundError) as exc:
                comps[c] = {"error": str(exc)}
        tok = os.path.join(p, "tokenizer", "tokenizer.json")
        comps["tokenizer"] = (inspect_tokenizer(tok) if os.path.isfile(tok)
                              else {"error": f"{p}: no tokenizer/tokenizer.json"})
        var, src = detect_variant(p, None, variant)
        return {"path": p, "family": "diffusers", "component": "pipeline", "variant": var, "variant_source": src,
                "components": comps,
                "size_bytes": sum(c.get("size_bytes", 0) for c in comps.values())}
    if os.path.isdir(p) and not _has_weights(p) and os.path.isfile(os.path.join(p, "tokenizer.json")):
        return dict(inspect_tokenizer(os.path.join(p, "tokenizer.json")), path=p)
    if os.path.isfile(p) and p.lower().endswith(".json"):
        return _inspect_json(p, variant)
    shard = _shard_of(p)
    if shard is not None:
        return shard
    return _inspect_source(p, variant)


def _inspect_source(p: str, variant) -> dict:
    """inspect() of a weights file, shard index or component folder."""
    source = open_source(p)
    try:
        det = detect(source.keys())
        info = {"path": p, "origin": source.origin, "component": det.component,
                "tensors": len(source.keys()), "files": len(source.files),
                "size_bytes": sum(f.size for f in source.files), "dtypes": _dtype_summary(source),
                "metadata_keys": sorted(source.metadata)}
        versions = {f.version for f in source.files if hasattr(f, "read_bytes")}
        if versions:     # GGUF: container version, architecture (None for stable-diffusion.cpp files)
            info.update(format=f"GGUF v{max(versions)}", architecture=source.architecture,
                        gguf_quantized_tensors=sum(source.quant_type(k) is not None for k in source.keys()))
            info["metadata_keys"] = len(source.metadata)
        if det.component is None:
            info.update(family="unknown", looks_like=describe(source, det))
            if info["looks_like"] == "a LoRA file" and len(source.files) == 1:
                info.update(inspect_lora(source.files[0].path))
            return info
        src = strip_prefix(source, det.prefix)
        info["prefix"] = det.prefix
        if det.component == "transformer":
            q = quant_layers(src, "transformer", det.prefix)
            info["family"] = dit_family(src, q)
            info["quantized_layers"] = len(q)
            info["quantization"] = layer_groups(src, q)
            info["layers"] = (src.config.get("num_layers") if src.config else
                              block_count(src, r"transformer_blocks\.(\d+)\."))
            info["variant"], info["variant_source"] = detect_variant(p, src, variant)
        elif det.component == "text_encoder":
            info["family"] = te_family(src)
            info["embedded_tokenizer"] = "tokenizer_json" in src
            q = quant_layers(src, "text_encoder", det.prefix)
            info["quantized_layers"] = len(q)
            if q:
                info["quantization"] = layer_groups(src, q)
        else:
            info["family"] = ("diffusers-vae" if src.config is not None else "vae-diffusers") \
                if det.scheme == "diffusers" else "vae-bfl"
        return info
    finally:
        source.close()


def inspect_lora(path: str) -> dict:
    """A LoRA / LoHa / LoKr file: for which model, in which trainer's format, its ranks, scales and targets.

    The file is read with :func:`lens_core.lora.load_lora` (a LoRA is small; its factors give the ranks), which
    needs PyTorch: the only ``inspect`` that imports it. A LoRA of another model is named (``for``)."""
    try:
        from .. import lora as lo
    except ImportError as exc:       # no PyTorch: the header description above is all there is
        return {"lora": f"details need PyTorch ({exc})"}
    try:
        adapter = lo.load_lora(path)
    except (ValueError, OSError) as exc:
        return {"family": "lora", "component": "lora", "for": "not the Lens DiT", "looks_like": str(exc)}
    ranks, kinds, layers, scales = {}, {}, {}, set()
    for name, t in adapter.targets.items():
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
        f = t.factors
        rank = (f["down"].shape[0] if t.kind == "lora" else f["w1b"].shape[0] if t.kind == "loha" else
                max(f[k].shape[0] for k in ("w1b", "w2b") if k in f) if any(k in f for k in ("w1b", "w2b"))
                else None)
        ranks[rank] = ranks.get(rank, 0) + 1
        scales.add(round(float(t.scale), 6))
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", name)
        layer = m.group(2) if m else name
        layers.setdefault(layer, set()).add(int(m.group(1)) if m else -1)
    blocks = sorted({b for bs in layers.values() for b in bs if b >= 0})
    return {"family": "lora", "component": "lora", "for": "the Lens DiT (Lens, Lens-Turbo, Lens-Base)",
            "lora_format": adapter.format, "kinds": kinds,
            "rank": (next(iter(ranks)) if len(ranks) == 1 else {str(r): n for r, n in sorted(ranks.items(),
                                                                                             key=str)}),
            "scale": sorted(scales)[0] if len(scales) == 1 else sorted(scales),
            "targets": len(adapter.targets),
            "blocks": (f"{len(blocks)} of the transformer blocks ({blocks[0]}…{blocks[-1]})" if blocks else "none"),
            "target_layers": {k: len(v) for k, v in sorted(layers.items())},
            "unmatched_keys": len(adapter.unmatched)}


_BLOCK_RE = re.compile(r"^(?:model\.)?(?:transformer_blocks|layers|blk)\.\d+\.")


def layer_groups(source: TensorSource, qlayers: dict) -> dict:
    """``{layer group: {storage: count}}`` for the 2-D weights of a file: a group is a layer name without its block
    index (``attn.img_qkv`` for every ``transformer_blocks.N.attn.img_qkv``), the storage its ``.comfy_quant``
    format (``int8_tensorwise+convrot``), its GGUF type or its dtype (``BF16``)."""
    groups = {}
    for k in source.keys():
        if not k.endswith(".weight") or len(source.shape(k)) < 2:
            continue
        layer = k[: -len(".weight")]
        m = qlayers.get(layer)
        if m is not None:
            kind = m.get("format", "?") + ("+convrot" if m.get("convrot") or m.get("params", {}).get("convrot")
                                            else "")
        else:
            qt = source.quant_type(k) if hasattr(source, "quant_type") and k in source.keymap else None
            kind = qt or source.dtype(k)
        group = _BLOCK_RE.sub("", layer)
        groups.setdefault(group, {})
        groups[group][kind] = groups[group].get(kind, 0) + 1
    return dict(sorted(groups.items()))


_SHARD_RE = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")


def inspect_tokenizer(path: str) -> dict:
    """A tokenizer.json: its model type and vocabulary size, and whether it is the o200k_harmony tokenizer Lens
    needs (the 97-token preamble check of :func:`lens_core.prompt.load_tokenizer`)."""
    from .. import prompt

    data = read_json_object(path, "tokenizer.json", CheckpointError)
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    vocab = model.get("vocab")
    added = data.get("added_tokens") if isinstance(data.get("added_tokens"), list) else []
    info = {"path": path, "family": "tokenizer", "component": "tokenizer", "size_bytes": os.path.getsize(path),
            "tokenizer_model": model.get("type"),
            "vocab_size": (len(vocab) if isinstance(vocab, (dict, list)) else 0) + len(added)}
    try:
        prompt.load_tokenizer(path)
        info["lens_preamble"] = "ok (o200k_harmony: the Lens template is 97 tokens)"
    except (ValueError, OSError) as exc:
        info["lens_preamble"] = f"wrong: {exc}"
    return info


def _inspect_json(path: str, variant) -> dict:
    """A .json file: a shard index (inspected as the checkpoint it indexes), a tokenizer.json, or a config."""
    data = read_json_object(path, "JSON file", CheckpointError)
    if "weight_map" in data:
        return _inspect_source(path, variant)
    if isinstance(data.get("model"), dict) and ("added_tokens" in data or "pre_tokenizer" in data):
        return inspect_tokenizer(path)
    what = data.get("_class_name") or (data.get("architectures") or [None])[0] or data.get("model_type")
    if what is not None or "_diffusers_version" in data:
        return {"path": path, "family": "config", "component": None, "size_bytes": os.path.getsize(path),
                "describes": what,
                "looks_like": f"a model configuration ({what}), not weights; inspect its folder or its "
                              f".safetensors files"}
    raise CheckpointError(f"{path}: expected a shard index (*.safetensors.index.json with 'weight_map'), a "
                          f"tokenizer.json or a model config.json, found a JSON object with keys "
                          f"{sorted(data)[:12]}")


def _shard_of(path: str) -> dict | None:
    """A ``name-0000k-of-0000n.safetensors`` file: the checkpoint it is part of (through the index beside it)
    plus this shard's own tensors and size; None for a file that is not a numbered shard."""
    m = _SHARD_RE.search(os.path.basename(path))
    if m is None or not os.path.isfile(path):
        return None
    k, n = int(m.group(1)), int(m.group(2))
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    own = SafetensorsFile(path)
    part = {"path": path, "shard": f"{k} of {n}", "shard_tensors": len(own.entries), "shard_size_bytes": own.size,
            "shard_dtypes": _dtype_summary(TensorSource([own], {e: (own, e) for e in own.entries}, path, None, None))}
    own.close()
    for index in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors.index.json")):
        ipath = os.path.join(folder, index)
        try:
            wm = read_json_object(ipath, "shard index", CheckpointError).get("weight_map")
        except CheckpointError:
            continue
        if isinstance(wm, dict) and name in wm.values():
            whole = _inspect_source(ipath, None)
            return dict(part, index=ipath, **{k2: v for k2, v in whole.items() if k2 != "path"})
    if n == 1:
        return None
    return dict(part, component=None, family="unknown",
                looks_like=f"shard {k} of {n} of a sharded checkpoint whose index (*.safetensors.index.json "
                           f"listing {name}) is missing from {folder}; inspect the index or the folder")


def format_inspect(info: dict, indent: str = "") -> str:
    """Human-readable lines for :func:`inspect` output."""
    lines = []
    for k, v in info.items():
        if k == "components":
            lines.append(f"{indent}components:")
            for name, sub in v.items():
                lines.append(f"{indent}  {name}:")
                lines.append(format_inspect(sub, indent + "    "))
        elif k == "quantization":
            lines.append(f"{indent}quantization (layer group: storage x count):")
            for group, kinds in v.items():
                lines.append(f"{indent}  {group}: " + ", ".join(f"{kind} x{n}" for kind, n in kinds.items()))
        elif k in ("size_bytes", "shard_size_bytes"):
            lines.append(f"{indent}{k.replace('_bytes', '')}: {v / 1e9:.3f} GB ({v} bytes)")
        else:
            lines.append(f"{indent}{k}: {v}")
    return "\n".join(lines)
