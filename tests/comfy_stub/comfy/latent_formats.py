"""Stand-in of comfy.latent_formats: only the base class (attributes of ComfyUI 0.33's; no Flux2 format, so the
node tests exercise the pack's bundled equivalent, which ComfyUI 0.3.64 needs)."""


class LatentFormat:
    scale_factor = 1.0
    latent_channels = 4
    latent_dimensions = 2
    latent_rgb_factors = None
    latent_rgb_factors_bias = None
    latent_rgb_factors_reshape = None
    taesd_decoder_name = None
    spacial_downscale_ratio = 8

    def process_in(self, latent):
        return latent * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor
