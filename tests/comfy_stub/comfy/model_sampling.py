"""Stand-in of comfy.model_sampling: the flow-matching pieces (CONST prediction, the Flux time shift)."""
import math

import torch


def flux_time_shift(mu, sigma, t):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


class CONST:
    def calculate_input(self, sigma, noise):
        return noise

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.reshape(sigma.shape[:1] + (1,) * (model_output.ndim - 1))

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = sigma.reshape(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return sigma * noise + (1.0 - sigma) * latent_image


class ModelSamplingDiscreteFlow(torch.nn.Module):
    def __init__(self, model_config=None):
        super().__init__()
        settings = model_config.sampling_settings if model_config is not None else {}
        self.set_parameters(shift=settings.get("shift", 1.0), multiplier=settings.get("multiplier", 1000))

    def set_parameters(self, shift=1.0, timesteps=1000, multiplier=1000):
        self.shift, self.multiplier = shift, multiplier
        t = torch.arange(1, timesteps + 1, 1) / timesteps
        self.register_buffer("sigmas", shift * t / (1 + (shift - 1) * t))

    def timestep(self, sigma):
        return sigma * self.multiplier


class ModelSamplingFlux(torch.nn.Module):
    def __init__(self, model_config=None):
        super().__init__()
        settings = model_config.sampling_settings if model_config is not None else {}
        self.set_parameters(shift=settings.get("shift", 1.15))

    def set_parameters(self, shift=1.15, timesteps=10000):
        self.shift = shift
        self.register_buffer("sigmas", self.sigma(torch.arange(1, timesteps + 1, 1) / timesteps))

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma

    def sigma(self, timestep):
        return flux_time_shift(self.shift, 1.0, timestep)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return flux_time_shift(self.shift, 1.0, 1.0 - percent)
