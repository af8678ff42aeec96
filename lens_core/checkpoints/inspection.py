"""``inspect``: what a file or folder is (family, component, variant, dtypes, sizes), nothing loaded."""
from __future__ import annotations

import os

from .detect import detect, detect_variant, dit_family, quant_layers, strip_prefix, te_family
from .errors import CheckpointError
from .source import _dtype_summary, _has_weights, is_diffusers_root, open_source
from .transformer import dit_config_from_shapes


def inspect(path, variant: str | None = None) -> dict:
    """What ``path`` is: family, component, variant, dtypes, tensor count and size (nothing is loaded).

    A diffusers folder returns ``{"family": "diffusers", "components": {name: {...}}, ...}``.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no such file or folder")
    if is_diffusers_root(p):
        comps = {}
        for c in ("transformer", "text_encoder", "vae"):
            try:
                comps[c] = inspect(os.path.join(p, c), variant)
            except (CheckpointError, FileNotFoundError) as exc:
                comps[c] = {"error": str(exc)}
        tok = os.path.join(p, "tokenizer", "tokenizer.json")
        comps["tokenizer"] = ({"path": tok, "size_bytes": os.path.getsize(tok)} if os.path.isfile(tok)
                              else {"error": f"{p}: no tokenizer/tokenizer.json"})
        var, src = detect_variant(p, None, variant)
        return {"path": p, "family": "diffusers", "component": "pipeline", "variant": var, "variant_source": src,
                "components": comps,
                "size_bytes": sum(c.get("size_bytes", 0) for c in comps.values())}
    if os.path.isdir(p) and not _has_weights(p) and os.path.isfile(os.path.join(p, "tokenizer.json")):
        tok = os.path.join(p, "tokenizer.json")
        return {"path": p, "family": "tokenizer", "component": "tokenizer", "size_bytes": os.path.getsize(tok)}
    source = open_source(p)
    try:
        det = detect(source.keys())
        info = {"path": p, "origin": source.origin, "component": det.component,
                "tensors": len(source.keys()), "files": len(source.files),
                "size_bytes": sum(f.size for f in source.files), "dtypes": _dtype_summary(source),
                "metadata_keys": sorted(source.metadata)}
        if det.component is None:
            info.update(family="unknown", looks_like=det.description)
            return info
        src = strip_prefix(source, det.prefix)
        info["prefix"] = det.prefix
        if det.component == "transformer":
            q = quant_layers(src, "transformer")
            info["family"] = dit_family(src, q)
            info["quantized_layers"] = len(q)
            cfg = src.config or dit_config_from_shapes(src)
            info["layers"] = cfg.get("num_layers")
            info["variant"], info["variant_source"] = detect_variant(p, src, variant)
        elif det.component == "text_encoder":
            info["family"] = te_family(src)
            info["embedded_tokenizer"] = "tokenizer_json" in src
            info["quantized_layers"] = len(quant_layers(src, "text_encoder"))
        else:
            info["family"] = ("diffusers-vae" if src.config is not None else "vae-diffusers") \
                if det.scheme == "diffusers" else "vae-bfl"
        return info
    finally:
        source.close()


def format_inspect(info: dict, indent: str = "") -> str:
    """Human-readable lines for :func:`inspect` output."""
    lines = []
    for k, v in info.items():
        if k == "components":
            lines.append(f"{indent}components:")
            for name, sub in v.items():
                lines.append(f"{indent}  {name}:")
                lines.append(format_inspect(sub, indent + "    "))
        elif k == "size_bytes":
            lines.append(f"{indent}size: {v / 1e9:.3f} GB ({v} bytes)")
        else:
            lines.append(f"{indent}{k}: {v}")
    return "\n".join(lines)
