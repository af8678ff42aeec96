"""The pack's own model types: LENS_MODEL / LENS_TEXT_ENCODER / LENS_VAE, each a ModelPatcher plus what the
nodes need to know about the model inside."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LensModel:
    """LENS_MODEL: the Lens DiT in a ModelPatcher plus what the sampler needs to know about it."""
    patcher: object
    config: object
    variant: str
    dtype: torch.dtype
    path: str
    loras: tuple = ()            # ((file name, strength), ...) applied through this patcher, in order

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
