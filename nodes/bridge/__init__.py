"""Where lens-nodes touches ComfyUI, one module per concern (the only modules of the pack importing comfy /
folder_paths):

- ``ops``: the comfy.ops layer classes lens_core modules are built with;
- ``devices``: load/offload devices and compute dtypes per model role, intermediate device, interrupts;
- ``handles``: the LENS_TEXT_ENCODER / LENS_VAE types and the sampler's view of the DiT (LensModel);
- ``pack_model``: the pack's DiT as a native MODEL (comfy.model_base subclass, sampling object, call convention);
- ``patchers``: ModelPatcher choice (classic / dynamic VRAM), loads via model management, memory estimates;
- ``folders``: loop-safe model-folder listing and name resolution;
- ``progress``: progress bars, per-step interrupts, latent previews;
- ``lora``: LoRA files as ComfyUI weight adapters / object patches;
- ``native``: ComfyUI's native Lens MODEL sampled the official way;
- ``generation``: the prompt enhancer's generator patcher, loaded together with the text encoder's.

Every lens_core module is built with ``comfy.ops.manual_cast`` layers (weights stay on the offload device and are
cast to the input's device/dtype in forward, which is what lets ComfyUI's lowvram/partial loading work), wrapped
in a ``ModelPatcher`` with the load/offload devices ComfyUI uses for the same role, and loaded with
``load_models_gpu`` right before each use, so loading the text encoder can evict the DiT and vice versa.

The names below are the nodes' interface (``from . import bridge`` then ``bridge.load(...)``).
"""
from .devices import ROLES, check_interrupt, compute_dtype, devices, intermediate_device, soft_empty_cache, \
    to_intermediate
from .folders import DIFFUSERS_MARKER, component_path, model_choices, model_files, resolve_model
from .generation import generator_patcher, load_together
from .handles import LensModel, LensTextEncoder, LensVAE
from .lora import LORA_FOLDER, LORA_KEY, load_lora_file, lora_choices, resolve_lora, with_lora
from .native import native_compute_dtype, native_lens_patcher, native_text_width, official_native_patcher, \
    sample_native
from .ops import operations
from .pack_model import LensDiffusionModel, LensPackModel, build_pack_model, is_pack_model, official_cfg, \
    pack_model_patches, pack_view
from .patchers import DYNAMIC_MAX_FORCED_SHARE, dit_memory, dynamic_vram_plan, enhancer_memory, load, \
    make_patcher, patcher_class, text_encoder_memory
from .progress import StepReporter, TokenReporter, get_previewer, latent_format

__all__ = [
    "ROLES", "check_interrupt", "compute_dtype", "devices", "intermediate_device", "soft_empty_cache",
    "to_intermediate", "DIFFUSERS_MARKER", "component_path", "model_choices", "model_files",
    "resolve_model", "LensModel", "LensTextEncoder", "LensVAE", "LORA_FOLDER", "LORA_KEY", "load_lora_file",
    "lora_choices", "LensDiffusionModel", "LensPackModel", "build_pack_model", "is_pack_model", "official_cfg",
    "pack_model_patches", "pack_view",
    "resolve_lora", "with_lora", "native_compute_dtype", "native_lens_patcher", "native_text_width",
    "official_native_patcher", "sample_native", "operations", "DYNAMIC_MAX_FORCED_SHARE", "dit_memory",
    "dynamic_vram_plan", "enhancer_memory", "load", "make_patcher", "patcher_class", "text_encoder_memory",
    "StepReporter", "TokenReporter", "get_previewer", "latent_format", "generator_patcher",
    "load_together",
]
