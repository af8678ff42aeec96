"""Tiny LoRA / LoHa / LoKr files in every trainer's real key layout, for the golden tiny DiT's shapes.

Written with safetensors' ``save_file`` (test-side only). Each writer takes the same random factors (a
:class:`Factors` per target) so the same adapter can be written in several formats; the tests compute the
weight deltas themselves (:func:`hand_delta`) independently of lens_core.lora.

Key layouts (lora_gguf_reasoner.md §1.1):
- ``kohya``:      lora_unet_transformer_blocks_0_attn_img_qkv.lora_down.weight / .lora_up.weight / .alpha
- ``videox``:     lora_unet__transformer_blocks_0_attn_img_qkv.…  (double underscore)
- ``onetrainer``: transformer.transformer_blocks.0.attn.img_qkv.lora_down.weight / … / .alpha (LoHa: hada_*)
- ``peft``:       transformer_blocks.0.attn.img_qkv.lora_A.weight / lora_B.weight, alpha only in the
                  ``lora_adapter_metadata`` JSON (diffusers ``save_lora_adapter``)
- ``peft-prefixed``: base_model.model.transformer_blocks.0….lora_A.default.weight (+ metadata)
- ``sceneworks-lokr``: transformer_blocks.0.attn.img_qkv.lokr_w1 / lokr_w2 (or _a/_b), metadata networkType=lokr
- ``lycoris-lokr``: lora_unet_…lokr_w1 / lokr_w2_a / lokr_w2_b + .alpha (LyCORIS meaning of alpha)
"""
from __future__ import annotations

import dataclasses
import json

import torch
from safetensors.torch import save_file

BLOCK_LINEARS = ("attn.img_qkv", "attn.txt_qkv", "attn.to_out.0", "attn.to_add_out", "img_mlp.w1", "img_mlp.w2",
                 "img_mlp.w3", "txt_mlp.w1", "txt_mlp.w2", "txt_mlp.w3", "img_mod.1", "txt_mod.1")


def target_names(model, blocks=None, linears=BLOCK_LINEARS) -> list[str]:
    n = len(model.transformer_blocks)
    return [f"transformer_blocks.{b}.{t}" for b in (range(n) if blocks is None else blocks) for t in linears]


def weight_shape(model, name) -> tuple[int, int]:
    return tuple(model.get_submodule(name).weight.shape)


@dataclasses.dataclass
class Factors:
    kind: str
    t: dict          # role -> fp32 tensor
    alpha: float
    rank: int


def random_factors(model, names, kind="lora", rank=4, alpha=2.0, seed=0, lokr_split=None, scale=0.05):
    """{name: Factors}; LoKr halves w1 [a, b], w2 [out/a, in/b] with (a, b) = ``lokr_split`` (default: 2 and 4, or the
    smallest divisors of out / in)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * scale

    def split(n, want):
        return next(d for d in (want, *range(2, n + 1)) if n % d == 0)

    out = {}
    for name in names:
        o, i = weight_shape(model, name)
        if lokr_split is None and kind.startswith("lokr"):
            a, b = split(o, 2), split(i, 4)
        else:
            a, b = lokr_split or (2, 4)
        if kind == "lora":
            out[name] = Factors(kind, {"up": r(o, rank), "down": r(rank, i)}, alpha, rank)
        elif kind == "loha":
            out[name] = Factors(kind, {"w1a": r(o, rank) * 5, "w1b": r(rank, i) * 5, "w2a": r(o, rank) * 5,
                                       "w2b": r(rank, i) * 5}, alpha, rank)
        elif kind == "lokr":
            out[name] = Factors(kind, {"w1": r(a, b) * 10, "w2": r(o // a, i // b)}, alpha, rank)
        elif kind == "lokr-decomposed":
            out[name] = Factors(kind, {"w1": r(a, b) * 10, "w2a": r(o // a, rank), "w2b": r(rank, i // b)}, alpha,
                                rank)
        else:
            raise ValueError(kind)
    return out


def _kron(a, b):
    """Kronecker product written out (independent of torch.kron): K[i·p + k, j·q + l] = a[i, j]·b[k, l]."""
    m, n = a.shape
    p, q = b.shape
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(m * p, n * q)


def hand_delta(f: Factors, scale: float) -> torch.Tensor:
    """scale · ΔW in fp64 → fp32, computed here from the factors (LoRA, LoHa, LoKr definitions)."""
    t = {k: v.double() for k, v in f.t.items()}
    if f.kind == "lora":
        d = t["up"] @ t["down"]
    elif f.kind == "loha":
        d = (t["w1a"] @ t["w1b"]) * (t["w2a"] @ t["w2b"])
    elif f.kind == "lokr":
        d = _kron(t["w1"], t["w2"])
    else:
        d = _kron(t["w1"], t["w2a"] @ t["w2b"])
    return d * scale


def _flat(name):
    return name.replace(".", "_")


LORA_ROLES = {"kohya": ("lora_up.weight", "lora_down.weight"), "peft": ("lora_B.weight", "lora_A.weight"),
              "peft-default": ("lora_B.default.weight", "lora_A.default.weight")}


def write(path, fmt: str, factors: dict, metadata: dict | None = None):
    """Write ``factors`` in trainer layout ``fmt``; returns the path."""
    sd, md = {}, dict(metadata or {})
    any_f = next(iter(factors.values()))
    for name, f in factors.items():
        if fmt in ("kohya", "videox"):
            base = ("lora_unet__" if fmt == "videox" else "lora_unet_") + _flat(name)
        elif fmt in ("onetrainer", "onetrainer-loha"):
            base = "transformer." + name
        elif fmt == "peft-prefixed":
            base = "base_model.model." + name
        elif fmt == "diffusion-model":
            base = "diffusion_model." + name
        elif fmt == "lycoris-lokr":
            base = "lora_unet_" + _flat(name)
        else:
            base = name
        if f.kind == "lora":
            up, down = LORA_ROLES["peft-default" if fmt == "peft-prefixed" else
                                  "peft" if fmt in ("peft", "diffusion-model") else "kohya"]
            sd[f"{base}.{up}"], sd[f"{base}.{down}"] = f.t["up"], f.t["down"]
        elif f.kind == "loha":
            for role, suffix in (("w1a", "hada_w1_a"), ("w1b", "hada_w1_b"), ("w2a", "hada_w2_a"),
                                 ("w2b", "hada_w2_b")):
                sd[f"{base}.{suffix}"] = f.t[role]
        else:
            for role, suffix in (("w1", "lokr_w1"), ("w2", "lokr_w2"), ("w2a", "lokr_w2_a"), ("w2b", "lokr_w2_b")):
                if role in f.t:
                    sd[f"{base}.{suffix}"] = f.t[role]
        if fmt in ("kohya", "videox", "onetrainer", "onetrainer-loha", "lycoris-lokr"):
            sd[f"{base}.alpha"] = torch.tensor(float(f.alpha))
    if fmt in ("peft", "peft-prefixed", "diffusion-model") and "lora_adapter_metadata" not in md:
        md["lora_adapter_metadata"] = json.dumps({"r": any_f.rank, "lora_alpha": any_f.alpha,
                                                  "target_modules": sorted({n.split(".", 2)[2] for n in factors})})
    if fmt == "sceneworks-lokr":
        md.update(networkType="lokr", rank=str(any_f.rank), alpha=str(any_f.alpha), decomposeFactor="-1",
                  targetModules="img_qkv,txt_qkv,to_out.0,to_add_out")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=md or None)
    return path
