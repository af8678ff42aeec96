"""LoRA / LoHa / LoKr through the ModelPatcher's own patch mechanisms: lens_core.lora reads the file and computes
factors and scales; here they become ComfyUI weight adapters (weight patches, or weight wrappers on quantized
layers)."""
from __future__ import annotations

import os

import folder_paths

from .folders import folder_roots, model_files

LORA_FOLDER = "loras"
LORA_KEY = "lens_loras"         # model_options entry: ((LoRA file name, strength), ...) applied, in order
LORA_EXTENSIONS = (".safetensors", ".sft")
_LORA_CACHE: dict = {}
_LORA_CACHE_SIZE = 8


def lora_choices() -> list[str]:
    """LoRA files of models/loras (and the extra paths' loras folders), listed loop-safely (a symlink loop in
    the folder must not hang the node list)."""
    return model_files(LORA_FOLDER, LORA_EXTENSIONS, diffusers=False) or ["(no LoRA files found)"]


def resolve_lora(name: str) -> str:
    p = folder_paths.get_full_path(LORA_FOLDER, name)
    if p is None:
        raise FileNotFoundError(f"LoRA {name!r} not found: expected a .safetensors file in "
                                f"{folder_roots(LORA_FOLDER)}; put it there and refresh the node list")
    return p


def _lens_lora():
    from ...lens_core import lora
    return lora


def load_lora_file(path: str):
    """The normalised adapter of ``path`` (read once; re-read when the file changes)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key not in _LORA_CACHE:
        while len(_LORA_CACHE) >= _LORA_CACHE_SIZE:
            _LORA_CACHE.pop(next(iter(_LORA_CACHE)))
        _LORA_CACHE[key] = _lens_lora().load_lora(path)
    return _LORA_CACHE[key]


def _comfy_weight_adapter(patch):
    """ComfyUI's own LoRA / LoHa / LoKr weight-adapter object for a lens_core.lora.HostPatch."""
    import comfy.weight_adapter as wa
    cls = {"lora": wa.LoRAAdapter, "loha": wa.LoHaAdapter, "lokr": wa.LoKrAdapter}[patch.kind]
    return cls(set(), patch.factors)


def with_lora(model, path: str, strength: float):
    """A clone of the pack's MODEL (a ModelPatcher whose ``model.diffusion_model`` is the pack's DiT) with the
    adapter added as ComfyUI weight adapters: float layers as weight patches (ComfyUI merges them when it loads
    the weights, from its backup, and unpatches them), quantized layers as weight wrappers (applied to the
    dequantized weight at each call, the layer stays quantized: :mod:`.quant`); keys carry ComfyUI's
    ``diffusion_model.`` prefix. The shared base module is never modified in place."""
    from .quant import per_call_patch

    lo = _lens_lora()
    adapter = load_lora_file(path)
    patches, per_call = lo.host_patches(model.model.diffusion_model, adapter, strength)
    patcher = model.clone()
    for p in patches:
        patcher.add_patches({"diffusion_model." + p.key: _comfy_weight_adapter(p)}, p.strength)
    for p in per_call:
        key = "diffusion_model." + p.key
        patcher.add_weight_wrapper(key, per_call_patch(key, _comfy_weight_adapter(p), p.strength))
    patcher.model_options[LORA_KEY] = tuple(patcher.model_options.get(LORA_KEY, ())) + \
        ((adapter.name, float(strength)),)
    return patcher
