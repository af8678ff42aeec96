"""VAE loader: diffusers ``vae/`` folders and single FLUX.2 VAE files (diffusers or BFL naming)."""
from __future__ import annotations

import torch

from .assign import CheckpointInfo, assign_weights, init_empty_weights
from .detect import _expect, strip_prefix
from .source import DictSource, open_source


def load_vae(path, dtype=torch.float32, device="cpu", operations=None, config=None):
    """A ``LensVAE`` from a diffusers ``vae/`` folder, a whole diffusers folder, or a single
    ``flux2-vae.safetensors`` in the diffusers or BFL naming. ``config`` overrides config.json / the real FLUX.2
    config (shape-derived widths)."""
    from .. import vae as vae_mod

    source = open_source(path, "vae")
    det = _expect(source, "vae")
    source = strip_prefix(source, det.prefix)
    # the VAE is small (336 MB fp32): read it whole (cast on read), then map the names in one go
    tensors = {k: source.read(k, None if not _is_float_st(source.dtype(k)) else dtype) for k in source.keys()}
    tensors = vae_mod.prepare_vae_state_dict(tensors)
    if config is not None:
        cfg = config if isinstance(config, vae_mod.VAEConfig) else vae_mod.VAEConfig.from_dict(dict(config))
    elif source.config is not None:
        cfg = vae_mod.VAEConfig.from_dict(source.config)
    else:
        cfg = vae_mod.infer_vae_config(tensors)
    with init_empty_weights():
        model = vae_mod.LensVAE(cfg, operations=operations, device=None, dtype=dtype)
    family = ("diffusers-vae" if source.config is not None else "vae-diffusers") if det.scheme == "diffusers" \
        else "vae-bfl"
    origin = source.origin
    source.close()
    assign_weights(model, DictSource(tensors, origin), device, "vae")
    model.eval()
    model.lens_checkpoint = CheckpointInfo(origin, "vae", family, None, "", cfg.to_dict(), {"scheme": det.scheme})
    return model


def _is_float_st(name: str) -> bool:
    return name in ("F64", "F32", "F16", "BF16")
