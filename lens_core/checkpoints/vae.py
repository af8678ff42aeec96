"""VAE loader: diffusers ``vae/`` folders and single FLUX.2 VAE files (diffusers or BFL naming)."""
from __future__ import annotations

import torch

from .assign import CheckpointInfo, assign_weights, checked_config, init_empty_weights
from .errors import CheckpointError
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
    # the VAE is small (336 MB fp32): read it whole (cast on read), then map the names in one go; a file far
    # bigger than any FLUX.2 VAE is refused before anything is read
    total = source.nbytes()
    if total > MAX_VAE_BYTES:
        raise CheckpointError(f"{source.origin}: expected a FLUX.2 VAE (about 336 MB in fp32), found "
                              f"{total / 1e9:.1f} GB of tensors under VAE names; this is not a Lens VAE file")
    tensors = {k: source.read(k, None if not _is_float_st(source.dtype(k)) else dtype) for k in source.keys()}
    try:
        tensors = vae_mod.prepare_vae_state_dict(tensors)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{source.origin}: the tensors do not form a FLUX.2 VAE ({str(exc)[:300]}); the "
                              f"file is corrupt or another model's VAE. Fix: use flux2-vae.safetensors or the Lens "
                              f"vae/ folder") from None
    inferred = checked_config(lambda: vae_mod.infer_vae_config(tensors), source, "vae")
    if config is not None:
        cfg = config if isinstance(config, vae_mod.VAEConfig) else \
            checked_config(lambda: vae_mod.VAEConfig.from_dict(dict(config)), source, "vae")
    elif source.config is not None:
        cfg = checked_config(lambda: vae_mod.VAEConfig.from_dict(source.config), source, "vae")
    else:
        cfg = inferred
    _check_vae(source, cfg, inferred, tensors)
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


MAX_VAE_BYTES = 4 << 30
_SHAPE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "dec_channels", "layers_per_block",
                 "latent_channels", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


def _check_vae(source, cfg, inferred, tensors):
    """The config against the tensors (before the model is built), the FLUX.2 latent size, and finite BN
    statistics (NaN or a negative variance would decode every latent to a black or NaN image)."""
    where = source.config_path or "the config"
    for field in _SHAPE_FIELDS:
        if getattr(cfg, field) != getattr(inferred, field):
            raise CheckpointError(f"{source.origin}: {where} says {field}={getattr(cfg, field)}, the tensors give "
                                  f"{getattr(inferred, field)}; the config does not belong to these weights. Fix: "
                                  f"use this checkpoint's own config.json (or none)")
    if cfg.latent_channels != 32:
        raise CheckpointError(f"{source.origin}: expected a FLUX.2 VAE with 32 latent channels (Lens latents are "
                              f"32x2x2 = 128 channels), found {cfg.latent_channels}; this VAE belongs to another "
                              f"model family. Fix: use flux2-vae.safetensors or the Lens vae/ folder")
    for name in ("bn.running_mean", "bn.running_var"):
        t = tensors.get(name)
        if t is not None and (not bool(torch.isfinite(t).all()) or (name.endswith("var") and bool((t < 0).any()))):
            raise CheckpointError(f"{source.origin}: tensor {name!r} expected finite values"
                                  f"{' >= 0' if name.endswith('var') else ''}, found NaN/inf or negative ones; the "
                                  f"file is corrupt. Fix: download it again")


def _is_float_st(name: str) -> bool:
    return name in ("F64", "F32", "F16", "BF16")
