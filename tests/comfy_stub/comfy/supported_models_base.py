"""Stand-in of comfy.supported_models_base.BASE (the model-config attributes a model class reads)."""
import torch

from . import latent_formats


class BASE:
    unet_config = {}
    unet_extra_config = {"num_heads": -1, "num_head_channels": 64}
    sampling_settings = {}
    latent_format = latent_formats.LatentFormat
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    memory_usage_factor = 2.0
    manual_cast_dtype = None
    custom_operations = None
    optimizations = {"fp8": False}

    def __init__(self, unet_config):
        self.unet_config = unet_config.copy()
        self.sampling_settings = self.sampling_settings.copy()
        self.latent_format = self.latent_format()
        self.optimizations = self.optimizations.copy()
        for x in self.unet_extra_config:
            self.unet_config[x] = self.unet_extra_config[x]

    def set_inference_dtype(self, dtype, manual_cast_dtype, device=None):
        self.unet_config["dtype"] = dtype
        self.manual_cast_dtype = manual_cast_dtype
