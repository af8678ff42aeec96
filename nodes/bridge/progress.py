"""Progress bars, interrupts and latent previews of the pack's own sampler and prompt enhancer."""
from __future__ import annotations

import comfy.latent_formats
import comfy.utils

from .devices import check_interrupt

# FLUX.2 latent -> RGB factors (32 latent channels x RGB) and bias, as ComfyUI's Flux2 latent format uses them
# (checkpoint_formats.md §5.4). Apply to the BN-normalised latent after the 2x2 unpatchify.
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


class _BundledFlux2(comfy.latent_formats.LatentFormat):
    """FLUX.2 latent format for a ComfyUI without ``latent_formats.Flux2`` (0.3.64): 128 channels at 1/16.
    That ComfyUI's previewer cannot unpatchify, so the 32 RGB factors are spread over the 4 sub-pixel channels of
    each (index c·4 + p1·2 + p2): the preview is the 2×2 average at latent resolution. The MODEL's latent format
    (what KSampler previews with) and LensSampler's previews use this same class."""
    latent_channels = 128
    spacial_downscale_ratio = 16
    latent_rgb_factors = [[v / 4 for v in row] for row in FLUX2_RGB_FACTORS for _ in range(4)]
    latent_rgb_factors_bias = FLUX2_RGB_BIAS


# ComfyUI's Flux2 latent format when this ComfyUI has it, else the bundled equivalent
FLUX2_FORMAT = getattr(comfy.latent_formats, "Flux2", _BundledFlux2)


def latent_format():
    """An instance of :data:`FLUX2_FORMAT`."""
    return FLUX2_FORMAT()


def get_previewer(load_device):
    """ComfyUI's previewer for :func:`latent_format` honouring --preview-method (none by default), or None: the
    one KSampler uses for the pack's MODEL."""
    import latent_preview

    return latent_preview.get_previewer(load_device, latent_format())


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


class TokenReporter:
    """Per-token callback of lens_core.enhance.generate: interrupt check every token, ComfyUI progress bar
    every ``every`` tokens (a batch of tokens per update keeps the websocket traffic low)."""

    def __init__(self, total: int, every: int = 16):
        self.pbar = comfy.utils.ProgressBar(total)
        self.every = every
        self.done = 0

    def __call__(self, done, total):
        check_interrupt()
        self.done = done
        if done % self.every == 0 or done == total:
            self.pbar.update_absolute(done, total)

    def finish(self):
        self.pbar.update_absolute(self.pbar.total, self.pbar.total)
