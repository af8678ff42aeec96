"""ComfyUI node layer of lens-nodes (thin: no maths; everything computes in lens_core).

Imported as a subpackage of the pack (``<pack>.nodes``), so lens_core is reached relatively
(``from ..lens_core import ...``); ``bridge`` (nodes/bridge/) is the only package that imports ComfyUI.
"""
from .conditioning import LensTextEncode
from .errors import with_readable_errors
from .enhance import LensPromptEnhance
from .latents import LensEmptyLatent, LensVAEDecode, LensVAEEncode
from .loaders import LensCheckpointLoader, LensModelLoader, LensTextEncoderLoader, LensVAELoader
from .lora import LensLoraLoader
from .sampling import LensSampler
from .sigmas import LensNoise, LensSigmas

NODE_CLASS_MAPPINGS = {
    "LensModelLoader": LensModelLoader,
    "LensTextEncoderLoader": LensTextEncoderLoader,
    "LensVAELoader": LensVAELoader,
    "LensCheckpointLoader": LensCheckpointLoader,
    "LensTextEncode": LensTextEncode,
    "LensEmptyLatent": LensEmptyLatent,
    "LensSampler": LensSampler,
    "LensVAEDecode": LensVAEDecode,
    "LensVAEEncode": LensVAEEncode,
    "LensLoraLoader": LensLoraLoader,
    "LensPromptEnhance": LensPromptEnhance,
    "LensSigmas": LensSigmas,
    "LensNoise": LensNoise,
}

# the pack's own error classes reach ComfyUI's UI as one readable line (see errors.py)
for _cls in NODE_CLASS_MAPPINGS.values():
    with_readable_errors(_cls)

NODE_DISPLAY_NAME_MAPPINGS = {
    "LensModelLoader": "Lens Model Loader",
    "LensTextEncoderLoader": "Lens Text Encoder Loader (GPT-OSS)",
    "LensVAELoader": "Lens VAE Loader (FLUX.2)",
    "LensCheckpointLoader": "Lens Checkpoint Loader (diffusers folder)",
    "LensTextEncode": "Lens Text Encode",
    "LensEmptyLatent": "Lens Empty Latent",
    "LensSampler": "Lens Sampler",
    "LensVAEDecode": "Lens VAE Decode",
    "LensVAEEncode": "Lens VAE Encode",
    "LensLoraLoader": "Lens LoRA Loader",
    "LensPromptEnhance": "Lens Prompt Enhance (reasoner)",
    "LensSigmas": "Lens Sigmas (official schedule)",
    "LensNoise": "Lens Noise (pipeline seed)",
}
