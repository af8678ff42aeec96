"""Stand-in of ComfyUI's latent_preview: the Latent2RGB previewer (signatures of ComfyUI 0.3.64)."""
import torch
from PIL import Image

from comfy.cli_args import args

MAX_PREVIEW_RESOLUTION = args.preview_size


def preview_to_image(latent_image):
    """[H, W, 3] in -1..1 -> PIL image."""
    pixels = ((latent_image + 1.0) / 2.0).clamp(0, 1).mul(0xFF).to(device="cpu", dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


class LatentPreviewer:
    def decode_latent_to_preview(self, x0):
        pass

    def decode_latent_to_preview_image(self, preview_format, x0):
        return ("JPEG", self.decode_latent_to_preview(x0), MAX_PREVIEW_RESOLUTION)


class Latent2RGBPreviewer(LatentPreviewer):
    def __init__(self, latent_rgb_factors, latent_rgb_factors_bias=None):
        self.latent_rgb_factors = torch.tensor(latent_rgb_factors, device="cpu").transpose(0, 1)
        self.latent_rgb_factors_bias = None if latent_rgb_factors_bias is None else \
            torch.tensor(latent_rgb_factors_bias, device="cpu")

    def decode_latent_to_preview(self, x0):
        w = self.latent_rgb_factors.to(dtype=x0.dtype, device=x0.device)
        b = None if self.latent_rgb_factors_bias is None else \
            self.latent_rgb_factors_bias.to(dtype=x0.dtype, device=x0.device)
        return preview_to_image(torch.nn.functional.linear(x0[0].movedim(0, -1), w, bias=b))


def get_previewer(device, latent_format):
    if args.preview_method.value == "none" or latent_format.latent_rgb_factors is None:
        return None
    return Latent2RGBPreviewer(latent_format.latent_rgb_factors, latent_format.latent_rgb_factors_bias)
