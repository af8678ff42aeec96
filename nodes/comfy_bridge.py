"""The one place where lens-nodes touches ComfyUI: devices, ModelPatcher, load_models_gpu, model folders,
progress, previews, interrupts.

Every lens_core module is built with ``comfy.ops.manual_cast`` layers (weights stay on the offload device and
are cast to the input's device/dtype in forward, which is what lets ComfyUI's lowvram/partial loading work),
wrapped in a ``ModelPatcher`` with the load/offload devices ComfyUI uses for the same role, and loaded with
``load_models_gpu`` right before each use, so loading the text encoder can evict the DiT and vice versa.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
import folder_paths

# ---------------------------------------------------------------------------------------------------------
# devices, dtypes, operations

ROLES = ("diffusion", "text_encoder", "vae")


def operations():
    """Layer classes for every lens_core module built inside ComfyUI (always-casting comfy layers)."""
    return comfy.ops.manual_cast


def _role_devices(role: str) -> tuple[torch.device, torch.device]:
    """(load_device, offload_device) ComfyUI uses for a model of this role."""
    if role == "diffusion":
        return mm.get_torch_device(), mm.unet_offload_device()
    if role == "text_encoder":
        return mm.text_encoder_device(), mm.text_encoder_offload_device()
    if role == "vae":
        return mm.vae_device(), mm.vae_offload_device()
    raise ValueError(f"unknown model role {role!r}: expected one of {ROLES}")


devices = _role_devices


def compute_dtype(role: str, load_device) -> torch.dtype:
    """The dtype activations run in: ComfyUI's choice for the role (never fp16 for the DiT: it gives NaNs)."""
    if role == "diffusion":
        dt = mm.unet_dtype(load_device, supported_dtypes=[torch.bfloat16, torch.float32])
    elif role == "vae":
        dt = mm.vae_dtype(load_device, allowed_dtypes=[torch.bfloat16, torch.float32])
    else:   # GPT-OSS runs in bf16 (ComfyUI's own text-encoder default, fp16, is not used for it); fp32 on CPU
        dt = mm.unet_dtype(load_device, supported_dtypes=[torch.bfloat16, torch.float32])
    return dt if dt in (torch.bfloat16, torch.float32) else torch.float32


def intermediate_device() -> torch.device:
    return mm.intermediate_device()


def to_intermediate(t: torch.Tensor) -> torch.Tensor:
    """Node outputs live on ComfyUI's intermediate device (the CPU unless --gpu-only)."""
    return t.to(mm.intermediate_device())


def check_interrupt():
    """Raise ComfyUI's InterruptProcessingException if POST /interrupt was received."""
    mm.throw_exception_if_processing_interrupted()


def soft_empty_cache():
    mm.soft_empty_cache()


# ---------------------------------------------------------------------------------------------------------
# model handles (the LENS_MODEL / LENS_TEXT_ENCODER / LENS_VAE custom types)


def make_patcher(module: torch.nn.Module, role: str, size: int = 0, devices=None):
    load_device, offload_device = devices or _role_devices(role)
    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device,
                                            size=size)


def load(patcher, memory_required: int = 0, minimum_memory_required: int | None = None):
    """Make ComfyUI load ``patcher`` (evicting other models if needed) right before a forward."""
    mm.load_models_gpu([patcher], memory_required=int(memory_required),
                       minimum_memory_required=None if minimum_memory_required is None
                       else int(minimum_memory_required))


@dataclass
class LensModel:
    """LENS_MODEL: the Lens DiT in a ModelPatcher plus what the sampler needs to know about it."""
    patcher: object
    config: object
    variant: str
    dtype: torch.dtype
    path: str

    @property
    def module(self):
        return self.patcher.model

    @property
    def text_width(self) -> int:
        """Width of the stacked text conditioning this DiT accepts (layers × text hidden size)."""
        return self.config.num_text_layers * self.config.enc_hidden_dim


@dataclass
class LensTextEncoder:
    """LENS_TEXT_ENCODER: the GPT-OSS encoder in a ModelPatcher plus its tokenizer."""
    patcher: object
    tokenizer: object
    dtype: torch.dtype
    path: str
    hidden_size: int = 0
    num_layers: int = 4

    @property
    def module(self):
        return self.patcher.model


@dataclass
class LensVAE:
    """LENS_VAE: the FLUX.2 autoencoder in a ModelPatcher."""
    patcher: object
    dtype: torch.dtype
    path: str
    extra: dict = field(default_factory=dict)

    @property
    def module(self):
        return self.patcher.model


# ---------------------------------------------------------------------------------------------------------
# activation-memory estimates handed to load_models_gpu (bytes; deliberately generous)


def dit_memory(config, batch: int, image_tokens: int, text_tokens: int, dtype: torch.dtype) -> int:
    tokens = batch * (image_tokens + text_tokens)
    width = config.width
    per_token = width * 12 + config.mlp_hidden * 3          # qkv/attn/out + gated MLP temporaries
    attn = batch * config.num_attention_heads * (image_tokens + text_tokens) ** 2
    return int((tokens * per_token + attn) * torch.finfo(dtype).bits // 8 * 1.5)


def text_encoder_memory(batch: int, tokens: int, hidden: int, dtype: torch.dtype) -> int:
    return int(batch * tokens * max(hidden, 1) * 64 * torch.finfo(dtype).bits // 8)


def vae_memory(batch: int, height: int, width: int, dtype: torch.dtype) -> int:
    # the decoder's widest activations are ~128 channels at full resolution, a few alive at once
    return int(batch * height * width * 128 * 6 * torch.finfo(dtype).bits // 8)


# ---------------------------------------------------------------------------------------------------------
# model folders: single files (folder_paths lists) + diffusers folders found under the same folders

DIFFUSERS_MARKER = "model_index.json"


def _folder_roots(folder: str) -> list[str]:
    try:
        return folder_paths.get_folder_paths(folder)
    except KeyError:
        return []


MAX_LISTING_DEPTH = 12


def _walk(root: str):
    """(relative dir, subdir names, file names) below ``root``, following symlinks but entering every real folder
    once (symlink loops and repeated links are skipped) and at most MAX_LISTING_DEPTH levels deep; unreadable
    folders are skipped. Termination does not depend on the folder's contents."""
    seen = set()
    stack = [("", 0)]
    while stack:
        rel, depth = stack.pop()
        cur = os.path.join(root, rel) if rel else root
        try:
            st = os.stat(cur)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            with os.scandir(cur) as it:
                entries = list(it)
        except OSError:
            continue
        dirs, files = [], []
        for e in entries:
            try:
                (dirs if e.is_dir() else files if e.is_file() else []).append(e.name)
            except OSError:
                continue
        dirs = sorted(d for d in dirs if not d.startswith("."))
        yield rel, dirs, sorted(files)
        if depth < MAX_LISTING_DEPTH:
            stack.extend((f"{rel}/{d}" if rel else d, depth + 1) for d in reversed(dirs))


def _listing(folder: str) -> tuple[list[str], list[str]]:
    """(diffusers folders, loose .safetensors files) below ``folder``'s roots, as relative '/' paths.

    Diffusers folders are pipeline roots (model_index.json) and stand-alone component folders (config.json next
    to *.safetensors); their own shards and sub-components are not listed as files."""
    folders, files = set(), []
    for root in _folder_roots(folder):
        if not os.path.isdir(root):
            continue
        inside = []                    # folders already taken as diffusers folders (skip what is below them)
        for rel, _dirs, names in _walk(root):
            if any(rel == d or rel.startswith(d + "/") for d in inside):
                continue
            is_pipeline = DIFFUSERS_MARKER in names
            is_component = "config.json" in names and any(n.endswith(".safetensors") for n in names)
            if (is_pipeline or is_component) and rel:
                folders.add(rel)
                inside.append(rel)
                continue
            files += [f"{rel}/{n}" if rel else n for n in names if n.lower().endswith((".safetensors", ".sft"))]
    return sorted(folders), sorted(set(files))


def model_folders(folder: str) -> list[str]:
    """Relative paths of diffusers folders below ``folder``'s roots (see :func:`_listing`)."""
    return _listing(folder)[0]


def model_files(folder: str) -> list[str]:
    """safetensors files of ``folder`` that are not part of a diffusers folder."""
    return _listing(folder)[1]


def model_choices(*folders: str, files: bool = True, dirs: bool = True, dir_folders: tuple = ()) -> list[str]:
    """Combo entries: files of ``folders`` and diffusers folders of ``folders + dir_folders``."""
    out = []
    for f in folders:
        if files:
            out += model_files(f)
    if dirs:
        for f in tuple(folders) + tuple(dir_folders):
            out += [d for d in model_folders(f) if d not in out]
    return out or ["(no Lens files found)"]


def resolve_model(name: str, *folders: str) -> str:
    """Absolute path of a combo entry (file or folder) searched in ``folders``; FileNotFoundError naming
    the folders searched otherwise."""
    for folder in folders:
        for root in _folder_roots(folder):     # folders first: get_full_path warns about symlinked folders
            cand = os.path.join(root, os.path.relpath(os.path.join(os.sep, name), os.sep))
            if os.path.isdir(cand):
                return cand
        p = folder_paths.get_full_path(folder, name)
        if p is not None:
            return p
    searched = [r for f in folders for r in _folder_roots(f)]
    raise FileNotFoundError(f"{name!r} not found: expected a file or diffusers folder in {searched}; "
                            f"put the model there (see the README table) and refresh the node list")


def component_path(path: str, component: str) -> str:
    """``path/component`` when ``path`` is a diffusers pipeline root that has that component."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, DIFFUSERS_MARKER)):
        sub = os.path.join(path, component)
        if not os.path.isdir(sub):
            raise FileNotFoundError(f"{path} is a diffusers pipeline folder without a {component}/ folder; "
                                    f"expected {sub}")
        return sub
    return path


# ---------------------------------------------------------------------------------------------------------
# progress + latent previews


# FLUX.2 latent -> RGB factors (32 latent channels x RGB) and bias, as ComfyUI's Flux2 latent format uses them
# (checkpoint_formats.md §5.4). Applied to the BN-normalised latent after the 2x2 unpatchify.
FLUX2_RGB_FACTORS = [
    [0.0058, 0.0113, 0.0073], [0.0495, 0.0443, 0.0836], [-0.0099, 0.0096, 0.0644], [0.2144, 0.3009, 0.3652],
    [0.0166, -0.0039, -0.0054], [0.0157, 0.0103, -0.0160], [-0.0398, 0.0902, -0.0235], [-0.0052, 0.0095, 0.0109],
    [-0.3527, -0.2712, -0.1666], [-0.0301, -0.0356, -0.0180], [-0.0107, 0.0078, 0.0013], [0.0746, 0.0090, -0.0941],
    [0.0156, 0.0169, 0.0070], [-0.0034, -0.0040, -0.0114], [0.0032, 0.0181, 0.0080], [-0.0939, -0.0008, 0.0186],
    [0.0018, 0.0043, 0.0104], [0.0284, 0.0056, -0.0127], [-0.0024, -0.0022, -0.0030], [0.1207, -0.0026, 0.0065],
    [0.0128, 0.0101, 0.0142], [0.0137, -0.0072, -0.0007], [0.0095, 0.0092, -0.0059], [0.0000, -0.0077, -0.0049],
    [-0.0465, -0.0204, -0.0312], [0.0095, 0.0012, -0.0066], [0.0290, -0.0034, 0.0025], [0.0220, 0.0169, -0.0048],
    [-0.0332, -0.0457, -0.0468], [-0.0085, 0.0389, 0.0609], [-0.0076, 0.0003, -0.0043], [-0.0111, -0.0460, -0.0614],
]
FLUX2_RGB_BIAS = [-0.0329, -0.0718, -0.0851]


def _latent_formats():
    import comfy.latent_formats
    return comfy.latent_formats


def _bundled_format_class():
    base = _latent_formats().LatentFormat

    class LensFlux2LatentFormat(base):
        """Bundled equivalent of ComfyUI's Flux2 latent format for ComfyUI versions that lack it."""
        latent_channels = 128
        spacial_downscale_ratio = 16
        latent_rgb_factors = FLUX2_RGB_FACTORS
        latent_rgb_factors_bias = FLUX2_RGB_BIAS
        taesd_decoder_name = "taef2_decoder"

    return LensFlux2LatentFormat


def latent_format():
    """ComfyUI's Flux2 latent format when this ComfyUI has it, else the bundled equivalent."""
    lf = _latent_formats()
    if hasattr(lf, "Flux2"):
        return lf.Flux2()
    return _bundled_format_class()()


def _preview_method() -> str:
    from comfy.cli_args import args
    return getattr(getattr(args, "preview_method", None), "value", "none")


class _Unpatchified:
    """ComfyUI's Latent2RGB previewer applied to the 2×2-unpatchified FLUX.2 latent [1,32,2h,2w] (what the
    Flux2 latent format of newer ComfyUI does itself)."""

    def __init__(self, previewer):
        self.previewer = previewer

    def decode_latent_to_preview_image(self, preview_format, x0):
        from ..lens_core.vae import unpatchify
        return self.previewer.decode_latent_to_preview_image(preview_format, unpatchify(x0[:1]))


def get_previewer(load_device):
    """A previewer honouring --preview-method (none by default), or None: ComfyUI's own for its Flux2 latent
    format when present, else its Latent2RGB previewer with the bundled factors after the 2×2 unpatchify."""
    import latent_preview

    if _preview_method() == "none":
        return None
    fmt = latent_format()
    if hasattr(_latent_formats(), "Flux2"):
        return latent_preview.get_previewer(load_device, fmt)
    return _Unpatchified(latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias))


class StepReporter:
    """Per-step callback for lens_core.sampling: interrupt check, ProgressBar update, latent preview.

    ``to_image_latent(x0)`` turns the sampler's x0 (packed tokens) into a [B,128,h,w] latent for previews.
    """

    def __init__(self, total: int, load_device, to_image_latent, node_id=None):
        self.pbar = comfy.utils.ProgressBar(total, node_id=node_id) if node_id is not None \
            else comfy.utils.ProgressBar(total)
        self.previewer = get_previewer(load_device)
        self.to_image_latent = to_image_latent
        self.steps_seen = 0

    def __call__(self, step, total, latents, x0):
        check_interrupt()
        preview = None
        if self.previewer is not None and x0 is not None:
            preview = self.previewer.decode_latent_to_preview_image("JPEG", self.to_image_latent(x0))
        self.steps_seen += 1
        self.pbar.update_absolute(step + 1, total, preview)


# ---------------------------------------------------------------------------------------------------------
# ComfyUI's native Lens MODEL (comfy.model_base.Lens, ComfyUI 0.33+) sampled the official way


def native_lens_patcher(model, where: str):
    """``model`` if it is the ModelPatcher of a native Lens model; ValueError naming what it is and the fix."""
    try:
        import comfy.model_base
    except ImportError:         # a ComfyUI stand-in without model classes
        cls = None
    else:
        cls = getattr(comfy.model_base, "Lens", None)
    inner = getattr(model, "model", None)
    if cls is None:
        raise ValueError(f"{where}: got a {type(inner).__name__ if inner is not None else type(model).__name__} "
                         f"MODEL, but this ComfyUI has no native Lens model (comfy.model_base.Lens, ComfyUI 0.33 "
                         f"or newer). Fix: load the Lens DiT with LensModelLoader, or update ComfyUI")
    if not isinstance(inner, cls) or not hasattr(model, "clone"):
        raise ValueError(f"{where}: the model input is a {type(inner if inner is not None else model).__name__} "
                         f"model, expected Lens. Fix: load a Lens DiT with LensModelLoader or the native "
                         f"UNETLoader (lens_bf16 / lens_turbo_bf16)")
    return model


def native_compute_dtype(patcher) -> torch.dtype:
    """The dtype the native model's DiT computes in (its manual-cast dtype, else its weight dtype)."""
    m = patcher.model
    if hasattr(m, "get_dtype_inference"):
        return m.get_dtype_inference()
    return getattr(m, "manual_cast_dtype", None) or m.get_dtype()


def native_text_width(patcher) -> int:
    """Width of the stacked text conditioning the native Lens DiT accepts (its txt_in input features)."""
    return int(patcher.model.diffusion_model.txt_in.in_features)


def official_native_patcher(patcher, timestep_fn, cfg_fn=None):
    """A clone of a native Lens ModelPatcher that samples like the official pipeline.

    ``timestep_fn(sigma)`` gives the timestep the DiT receives (its model_sampling's ``timestep``; the Euler
    step and x0 still use σ itself); ``cfg_fn(cond, uncond, scale)`` replaces ComfyUI's linear CFG and gets
    x − x0 = σ·v of both passes in the [B,128,h,w] layout (None keeps ComfyUI's CFG, e.g. at CFG 1). Everything
    else (LoRA and other weight patches, wrappers, transformer_options, memory management) is the patcher's own.
    """
    import comfy.model_sampling

    m = patcher.clone()
    current = m.get_model_object("model_sampling")

    class LensOfficialSampling(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
        def timestep(self, sigma):
            return timestep_fn(sigma)

    sampling = LensOfficialSampling(m.model.model_config)
    shift = getattr(current, "shift", None)
    if shift is not None:
        sampling.set_parameters(shift=shift)
    m.add_object_patch("model_sampling", sampling)
    if cfg_fn is not None:
        m.set_model_sampler_cfg_function(lambda args: cfg_fn(args["cond"], args["uncond"], args["cond_scale"]))
    return m


def sample_native(patcher, noise, sigmas, positive, negative, cfg, latent_image, seed, callback=None,
                  noise_mask=None):
    """ComfyUI's own sampling path (comfy.sample.sample_custom: conds, load_models_gpu, model wrappers, its
    inpainting with ``noise_mask``) with ComfyUI's Euler sampler on the given ``sigmas``; ``callback(step, x0, x,
    total)`` per step."""
    import comfy.sample
    import comfy.samplers

    sampler = comfy.samplers.sampler_object("euler")
    return comfy.sample.sample_custom(patcher, noise, float(cfg), sampler, sigmas, positive, negative, latent_image,
                                      noise_mask=noise_mask, callback=callback,
                                      disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=int(seed))
