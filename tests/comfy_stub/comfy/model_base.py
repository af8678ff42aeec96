"""Stand-in of comfy.model_base: ModelType and the part of BaseModel a custom model class builds on (a model
config, its latent format and sampling object, ``diffusion_model`` set by the subclass, dtype helpers)."""
from enum import Enum

import torch

from . import model_sampling as ms


class ModelType(Enum):
    EPS = 1
    V_PREDICTION = 2
    FLOW = 6
    FLUX = 8


class BaseModel(torch.nn.Module):
    def __init__(self, model_config, model_type=ModelType.EPS, device=None, unet_model=None):
        super().__init__()
        if not model_config.unet_config.get("disable_unet_model_creation", False):
            raise NotImplementedError("the stand-in builds no diffusion model: set disable_unet_model_creation")
        self.latent_format = model_config.latent_format
        self.model_config = model_config
        self.manual_cast_dtype = model_config.manual_cast_dtype
        self.device = device
        self.current_patcher = None
        self.model_type = model_type
        sampling = ms.ModelSamplingFlux if model_type == ModelType.FLUX else ms.ModelSamplingDiscreteFlow

        class ModelSampling(sampling, ms.CONST):
            pass

        self.model_sampling = ModelSampling(model_config)
        self.adm_channels = 0
        self.concat_keys = ()
        self.memory_usage_factor = model_config.memory_usage_factor

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        dtype = self.get_dtype_inference()
        xc = self.model_sampling.calculate_input(sigma, x).to(dtype)
        context = None if c_crossattn is None else c_crossattn.to(dtype)
        t = self.model_sampling.timestep(t).float()
        out = self.diffusion_model(xc, t, context=context, control=control, transformer_options=transformer_options,
                                   **kwargs).float()
        return self.model_sampling.calculate_denoised(sigma, out, x)

    def extra_conds(self, **kwargs):
        return {}

    def get_dtype(self):
        return self.diffusion_model.dtype

    def get_dtype_inference(self):
        return self.manual_cast_dtype if self.manual_cast_dtype is not None else self.get_dtype()

    def memory_required(self, input_shape, cond_shapes={}):
        return 0
