"""Stand-in of ComfyUI's latent_preview: the Latent2RGB previewer (signatures of ComfyUI 0.33)."""
import torch
from PIL import Image

from comfy.cli_args import args

MAX_PREVIEW_RESOLUTION = args.preview_size


def preview_to_image(latent_image, do_scale=True):
    """[H, W, 3] in -1..1 (``do_scale``) or 0..1 -> PIL image."""
    scaled = (latent_image + 1.0) / 2.0 if do_scale else latent_image
    pixels = scaled.clamp(0, 1).mul(0xFF).to(device="cpu", dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


class LatentPreviewer:
    def decode_latent_to_preview(self, x0):
        pass

    def decode_latent_to_preview_image(self, preview_format, x0):
        return ("JPEG", self.decode_latent_to_preview(x0), MAX_PREVIEW_RESOLUTION)


class Latent2RGBPreviewer(LatentPreviewer):
    """First sample of x0 [B, C, h, w] -> RGB by a per-channel linear map (rows of factors = channels)."""

    def __init__(self, latent_rgb_factors, latent_rgb_factors_bias=None, latent_rgb_factors_reshape=None):
        self.reshape = latent_rgb_factors_reshape          # optional x0 -> x0 re-layout before the linear map
        self.rgb_from_channels = torch.as_tensor(latent_rgb_factors, dtype=torch.float32)      # [C, 3]
        self.rgb_offset = (torch.zeros(3) if latent_rgb_factors_bias is None
                           else torch.as_tensor(latent_rgb_factors_bias, dtype=torch.float32))

    def decode_latent_to_preview(self, x0):
        if self.reshape is not None:
            x0 = self.reshape(x0)
        sample = x0[0].float().cpu()                                                         # [C, h, w]
        rgb = torch.einsum("chw,cr->hwr", sample, self.rgb_from_channels) + self.rgb_offset
        return preview_to_image(rgb)


def get_previewer(device, latent_format):
    if args.preview_method.value == "none" or latent_format.latent_rgb_factors is None:
        return None
    return Latent2RGBPreviewer(latent_format.latent_rgb_factors, latent_format.latent_rgb_factors_bias,
                               getattr(latent_format, "latent_rgb_factors_reshape", None))
