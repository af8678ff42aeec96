"""Flow-match sampling for Lens: sigma schedule, model-timestep quantisation, Euler steps, CFG with the
per-token norm rescale, img2img start, seeded noise. Spec: ../shared/docs/lens_dit_spec.md §4 and §8.

The public entry point is :func:`sample`; the pipeline (``lens_core.pipeline``) and the ComfyUI LensSampler
node both call it. Everything is in the packed token layout ``[B, S_img, 128]``.
"""
from __future__ import annotations

import inspect
import math

import numpy as np
import torch

from .config import check_finite_tensor, check_grid, check_number, check_steps, variant_defaults

__all__ = ["empirical_mu", "sigma_schedule", "denoise_sigmas", "scheduler_timesteps", "model_timestep",
           "model_timesteps", "cfg_combine", "euler_step", "make_noise", "start_index", "prepare_mask", "sample",
           "variant_defaults"]

NUM_TRAIN_TIMESTEPS = 1000


# ---------------------------------------------------------------------------------------------------------
# Schedule


def empirical_mu(image_seq_len: int, steps: int) -> float:
    """FLUX.2's empirical shift mu for N_img image tokens and ``steps`` steps (Python float64, spec §4)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    m200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(m200)
    m10 = a1 * image_seq_len + b1
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return float(a * steps + b)


def sigma_schedule(steps: int, image_seq_len: int) -> torch.Tensor:
    """Shifted sigmas [steps + 1] float32 on the CPU, ending with 0 (spec §4 "Schedule").

    Raw sigmas are linspace(1, 1/N, N) in float64 cast to float32; the shift e^mu / (e^mu + (1/σ − 1)) is
    evaluated in float32 with e^mu rounded to float32 first, exactly as the reference scheduler does.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be positive, got {image_seq_len!r}")
    mu = empirical_mu(image_seq_len, steps)
    raw = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    em = np.float32(math.exp(mu))
    shifted = em / (em + (np.float32(1.0) / raw - np.float32(1.0)))
    sig = torch.from_numpy(shifted.astype(np.float32))
    return torch.cat([sig, torch.zeros(1)])


def denoise_sigmas(steps: int, image_seq_len: int, denoise: float = 1.0) -> torch.Tensor:
    """The sigmas a run with ``denoise`` walks: the last round(steps·denoise) steps of the ``steps`` schedule
    (``[steps − start_index(steps, denoise) + 1]`` values ending with 0; all of them for denoise = 1), i.e. what
    :func:`sample` uses for img2img. float32 on the CPU."""
    return sigma_schedule(steps, image_seq_len)[start_index(steps, denoise):]


def scheduler_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The scheduler's timesteps σ·1000 in float32 (without the terminal σ = 0)."""
    return sigmas[:-1].float() * NUM_TRAIN_TIMESTEPS


def model_timestep(sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The DiT timestep for σ (any shape): (σ·1000 in fp32, cast to the latent dtype) / 1000, in that dtype
    (spec §4). bf16: bf16(bf16(σ·1000)/1000), e.g. 0.994191 -> 0.996094; fp32: fp32(fp32(σ·1000)/1000)."""
    return (sigma.float() * NUM_TRAIN_TIMESTEPS).to(dtype) / NUM_TRAIN_TIMESTEPS


def model_timesteps(sigmas: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the DiT receives per step of a schedule (:func:`model_timestep` of every σ but the final 0)."""
    return model_timestep(sigmas[:-1], dtype)


def start_index(steps: int, denoise: float) -> int:
    """First step index for img2img: the last round(steps·denoise) steps of the schedule are run."""
    if not (0.0 < float(denoise) <= 1.0):
        raise ValueError(f"denoise must be in (0, 1], got {denoise!r}")
    return steps - min(steps, int(round(steps * float(denoise))))


# ---------------------------------------------------------------------------------------------------------
# One step


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, guidance: float, dim: int = -1) -> torch.Tensor:
    """uncond + g·(cond − uncond), rescaled per token so its norm over the channels equals ‖cond‖.

    Runs in the tensors' dtype with the reference's rounding points (each op rounded to the model dtype,
    norms accumulated in fp32). Applied for every g (g = 1 is not bit-identical to ``cond``). ``dim`` is the
    channel dimension: -1 for packed tokens [B, S, 128], 1 for ComfyUI latents [B, 128, h, w]. The result is
    homogeneous in (cond, uncond): scaling both by σ (ComfyUI hands x − x0 = σ·v to CFG functions) scales it by σ.
    """
    comb = uncond + guidance * (cond - uncond)
    cond_norm = torch.linalg.vector_norm(cond, dim=dim, keepdim=True)
    comb_norm = torch.linalg.vector_norm(comb, dim=dim, keepdim=True)
    scale = torch.where(comb_norm > 0, cond_norm / comb_norm.clamp_min(1e-12), torch.ones_like(comb_norm))
    return comb * scale


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    """x + (σ_next − σ)·v with the reference rounding: dt is a 0-dim fp32 tensor, so dt·v is formed in v's
    dtype (dt rounded to it first); the sum is fp32 and the result is stored in v's dtype."""
    dt = sigma_next.float() - sigma.float()
    return (latents.float() + dt * velocity).to(velocity.dtype)


# ---------------------------------------------------------------------------------------------------------
# Noise


def make_noise(seed: int, batch: int, h: int, w: int, channels: int = 128, start: int = 0) -> torch.Tensor:
    """Seeded standard-normal noise [batch, h·w, channels], fp32 on the CPU (same seed → same noise on any
    device). A bf16 run rounds it to bf16, which equals drawing in bf16 from the same CPU generator.
    ``start``: the rows start..start+batch−1 of the draw for ``start + batch`` images (image k of a batch
    alone: ``make_noise(seed, 1, h, w, start=k)``)."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn((start + batch, h * w, channels), generator=gen, dtype=torch.float32)
    return noise[start:] if start else noise


# ---------------------------------------------------------------------------------------------------------
# Inpainting mask


def prepare_mask(mask, batch: int, h: int, w: int) -> torch.Tensor:
    """A regeneration mask on the latent grid in the packed layout: [batch, h·w, 1] float32 in [0, 1].

    ``mask`` is [H, W], [B, H, W] or [B, 1, H, W] at any resolution (typically the image's pixels; 1 = generate
    anew, 0 = keep the input latent). Like ComfyUI's samplers it is resized to the latent grid bilinearly
    (align_corners=False) and repeated (or cut) to the batch size. Values must be finite and in [0, 1].
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask: expected a tensor [H, W], [B, H, W] or [B, 1, H, W], got {type(mask).__name__}")
    if mask.ndim not in (2, 3, 4) or (mask.ndim == 4 and mask.shape[1] != 1) or 0 in mask.shape:
        raise ValueError(f"mask: expected [H, W], [B, H, W] or [B, 1, H, W] with one channel, got "
                         f"{tuple(mask.shape)}")
    m = mask.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(m).all()) or float(m.min()) < 0.0 or float(m.max()) > 1.0:
        raise ValueError(f"mask: values must be finite and within [0, 1] (1 = regenerate), found the range "
                         f"[{float(m.nan_to_num().min()):g}, {float(m.nan_to_num().max()):g}] or NaN/inf; fix: "
                         f"normalise the mask (e.g. divide 8-bit values by 255)")
    m = m.reshape(-1, 1, m.shape[-2], m.shape[-1])
    if tuple(m.shape[-2:]) != (h, w):
        m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    if m.shape[0] != batch:
        m = m.repeat(-(-batch // m.shape[0]), 1, 1, 1)[:batch]
    return m.reshape(batch, h * w, 1).contiguous()


def _masked(latents, reference, mask):
    """``latents`` where the mask is 1, ``reference`` where it is 0 (linear in between), computed in fp32 with
    ``torch.lerp`` so that both ends are exact: mask 1 keeps the latents' bits, mask 0 gives the reference's."""
    return torch.lerp(reference.float(), latents.float(), mask).to(latents.dtype)


# ---------------------------------------------------------------------------------------------------------
# Text batching helpers (features: list of per-layer [B,S,D] tensors or one stacked [B,S,4D] tensor)


def _map(features, fn):
    if isinstance(features, torch.Tensor):
        return fn(features)
    return [fn(f) for f in features]


def _zip(a, b, fn):
    if isinstance(a, torch.Tensor):
        return fn(a, b)
    return [fn(x, y) for x, y in zip(a, b)]


def _first(features) -> torch.Tensor:
    return features if isinstance(features, torch.Tensor) else features[0]


def _pad_text(features, mask, target):
    cur = mask.shape[1]
    if cur == target:
        return features, mask
    feats = _map(features, lambda f: torch.cat([f, f.new_zeros(f.shape[0], target - cur, f.shape[-1])], 1))
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], target - cur)], dim=1)
    return feats, mask


def _crop_text(features, mask):
    """Drop the text columns that are padding in every row (the trailing all-False ones of ``mask``).

    A masked text token is never a visible key, and its own stream only feeds its own (masked) key and value
    in later blocks, so it cannot reach any valid token: dropping it changes nothing but the summation order
    of the softmax (fp32: ~1e-7). An all-False mask (the empty negative) leaves zero text tokens.
    """
    valid = mask.any(dim=0).nonzero()
    keep = int(valid[-1]) + 1 if valid.numel() else 0
    if keep == mask.shape[1]:
        return features, mask
    return _map(features, lambda f: f[:, :keep]), mask[:, :keep]


def _accepts_exact(model) -> bool:
    try:
        return "exact" in inspect.signature(model.forward if hasattr(model, "forward") else model).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------
# The sampler


def _check_text(features, mask, b, mask_name, what):
    """Text features (list or stacked) and their [B, S] mask must agree with each other and the batch."""
    if mask is None or mask.ndim != 2 or mask.shape[0] != b:
        raise ValueError(f"{mask_name}: expected [B={b}, S] bool, got {None if mask is None else tuple(mask.shape)}")
    if _first(features).shape[:2] != mask.shape:
        raise ValueError(f"{what} features: expected [B, S] = {tuple(mask.shape)} like the mask, got "
                         f"{tuple(_first(features).shape)}")


@torch.no_grad()
def sample(model, noise, pos_features, pos_mask, neg_features=None, neg_mask=None, *, grid, steps, cfg,
           denoise=1.0, init_latents=None, callback=None, exact=True, dtype=None, device=None, mask=None):
    """Denoise ``noise`` [B, S_img, 128] into final latents [B, S_img, 128] (run dtype, on ``device``).

    Arguments:
        model: a :class:`~lens_core.dit.LensTransformer` or any callable
            ``model(hidden_states, text_features, text_mask, timestep, grid=grid)`` returning the velocity.
        noise: the initial latents for text-to-image (e.g. :func:`make_noise`), packed [B, S_img, 128]; like
            the official ``latents=`` it is only moved and cast to the run dtype.
        pos_features / pos_mask: positive text features (list of 4 [B, S, D] or stacked [B, S, 4D]) and the
            [B, S] bool mask (True = valid).
        neg_features / neg_mask: negative features and mask, or ``None`` for the empty negative prompt,
            which is zero features of the positive's shape with an all-False mask (spec §4). A negative of a
            different length is zero-padded (mask False) to a common length.
        grid: (H/16, W/16); steps: number of steps of the schedule; cfg: guidance scale (applied for every
            value with the per-token norm rescale, spec §4).
        denoise / init_latents: img2img. With ``denoise`` < 1 the full ``steps`` schedule is built and only
            its last round(steps·denoise) steps are run, starting at σ_s = sigmas[steps − that]; the start
            latent is x = (1 − σ_s)·init_latents + σ_s·noise (computed in fp32, then cast), where
            ``init_latents`` is the clean packed latent [B, S_img, 128]. With ``denoise`` = 1,
            ``init_latents`` is ignored and the run starts from ``noise`` (σ = 1).
        callback: ``callback(step, total, latents, x0)`` after every step (step 0-based among the ``total``
            steps run; ``latents`` the new latents, ``x0`` the predicted clean latent x − σ·v, fp32). It may
            raise to interrupt; if it returns a tensor, that tensor replaces the latents.
        exact: True (default) = the reference computation: CFG always as one batch of 2 ([pos; neg]), the
            DiT in its reference-exact mode; reproduces the official pipeline bit for bit. False = the fast
            path: at cfg == 1 a single forward on the positive only (no uncond pass); otherwise two forwards
            (positive, negative), each without the text columns its mask pads in every row (the empty
            negative runs with no text tokens at all, and an unpadded positive needs no attention mask);
            the DiT in its fast mode. Differences are at bf16 rounding level (tests/test_sampling.py measures
            them; fp32 ~1e-7).
        dtype: run dtype (default: ``model.dtype`` if it exists, else float32). device: default the
            model's parameter device (else ``noise.device``).
        mask: inpainting (the general masked-denoising method; no Lens inpainting model exists). A packed
            [B, S_img, 1] mask from :func:`prepare_mask` (1 = generate anew, 0 = keep); needs
            ``init_latents`` at any ``denoise``. After every step the latents outside the mask are replaced by
            the input latent at the next step's noise level, (1 − σ)·init + σ·noise with the same noise, so the
            region outside the mask ends equal to ``init_latents`` (bit for bit where the mask is 0) and the
            model sees a consistent image at every step. A mask of ones equals plain img2img.
    """
    region, mask = mask, None           # ``mask`` (the inpainting region) is ``region`` below
    if not isinstance(noise, torch.Tensor) or noise.ndim != 3:
        raise ValueError(f"noise: expected packed latents [B, S_img, 128], got "
                         f"{getattr(noise, 'shape', type(noise).__name__)}")
    b, s_img, _ = noise.shape
    gh, gw = check_grid(grid, s_img)
    steps = check_steps(steps)
    cfg = check_number(cfg, "cfg", fix="use a finite guidance scale (Lens 5, Turbo 1)")
    check_finite_tensor(noise, "noise")
    for name, feats in (("positive features", pos_features), ("negative features", neg_features)):
        for f in ([] if feats is None else [feats] if isinstance(feats, torch.Tensor) else feats):
            check_finite_tensor(f, name)
    if init_latents is not None:
        check_finite_tensor(init_latents, "init_latents")
    if dtype is None:
        dtype = getattr(model, "dtype", None)
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    if device is None:
        param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        device = param.device if param is not None and param.device.type != "meta" else noise.device
    device = torch.device(device)
    _check_text(pos_features, pos_mask, b, "pos_mask", "positive")
    pos_mask = pos_mask.bool()
    guidance = float(cfg)
    single = (not exact) and guidance == 1.0

    if not single and neg_features is None:
        neg_features = _map(pos_features, torch.zeros_like)
        neg_mask = torch.zeros_like(pos_mask)
    if not single:
        _check_text(neg_features, neg_mask, b, "neg_mask", "negative")
        neg_mask = neg_mask.bool()
    split = (not exact) and not single  # fast CFG: two forwards, each without its masked-out text tail
    if single or split:
        feats, mask = _crop_text(pos_features, pos_mask)
    else:
        target = max(pos_mask.shape[1], neg_mask.shape[1])
        pf, pm = _pad_text(pos_features, pos_mask, target)
        nf, nm = _pad_text(neg_features, neg_mask, target)
        feats = _zip(pf, nf, lambda p, n: torch.cat([p, n.to(p.device)], dim=0))
        mask = torch.cat([pm, nm.to(pm.device)], dim=0)
    feats = _map(feats, lambda f: f.to(device=device, dtype=dtype))
    mask = mask.to(device)
    if split:
        neg_feats, neg_mask = _crop_text(neg_features, neg_mask)
        neg_feats = _map(neg_feats, lambda f: f.to(device=device, dtype=dtype))
        neg_mask = neg_mask.to(device)

    sigmas = sigma_schedule(steps, s_img).to(device)
    t_model = model_timesteps(sigmas, dtype)
    first = start_index(steps, denoise)
    latents = noise.to(device=device, dtype=dtype)
    if first > 0:
        if init_latents is None or tuple(init_latents.shape) != tuple(noise.shape):
            raise ValueError(f"init_latents: denoise < 1 needs the clean latents of shape {tuple(noise.shape)}, "
                             f"got {None if init_latents is None else tuple(init_latents.shape)}")
        s0 = sigmas[first]
        latents = ((1.0 - s0) * init_latents.to(device).float() + s0 * noise.to(device).float()).to(dtype)

    keep = None
    if region is not None:
        if init_latents is None or tuple(init_latents.shape) != tuple(noise.shape):
            raise ValueError(f"init_latents: a mask needs the input latents of shape {tuple(noise.shape)} to keep "
                             f"outside it, got {None if init_latents is None else tuple(init_latents.shape)}")
        if not isinstance(region, torch.Tensor) or tuple(region.shape) != (b, s_img, 1):
            raise ValueError(f"mask: expected the packed mask [{b}, {s_img}, 1] (lens_core.sampling.prepare_mask), "
                             f"got {getattr(region, 'shape', type(region).__name__)}")
        region = region.to(device=device, dtype=torch.float32)
        keep = (init_latents.to(device).float(), noise.to(device).float())

    kwargs = {"exact": exact} if _accepts_exact(model) else {}
    total = steps - first
    rows = b if single or split else 2 * b
    for n, i in enumerate(range(first, steps)):
        t = t_model[i].expand(rows)
        if split:
            cond = model(latents, feats, mask, t, grid=(gh, gw), **kwargs)
            uncond = model(latents, neg_feats, neg_mask, t, grid=(gh, gw), **kwargs)
            v = cfg_combine(cond, uncond, guidance)
        elif single:
            v = model(latents, feats, mask, t, grid=(gh, gw), **kwargs)
        else:
            cond, uncond = model(latents.repeat(2, 1, 1), feats, mask, t, grid=(gh, gw), **kwargs).chunk(2)
            v = cfg_combine(cond, uncond, guidance)
        x0 = latents.float() - sigmas[i] * v.float()
        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
        if keep is not None:
            s_next = sigmas[i + 1]
            latents = _masked(latents, (1.0 - s_next) * keep[0] + s_next * keep[1], region)
            x0 = torch.lerp(keep[0], x0, region)
        if callback is not None:
            replaced = callback(n, total, latents, x0)
            if isinstance(replaced, torch.Tensor):
                latents = replaced.to(device=device, dtype=dtype)
    return latents
