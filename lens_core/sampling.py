"""Flow-match sampling for Lens, in composable pieces: model-timestep quantisation, the CFG modes
(:class:`BatchedCFG`, :class:`SplitCFG`, :class:`PositiveOnly`) with the per-token norm rescale, the img2img
start, inpainting (:class:`Inpainting`), the Euler loop over any sigmas (:func:`euler_sample`) and seeded noise.
Schedules (which sigmas to walk) live in :mod:`lens_core.schedules`. Spec: ../shared/docs/lens_dit_spec.md §4, §8.

The public entry point is :func:`sample`; the pipeline (``lens_core.pipeline``) and the ComfyUI LensSampler
node both call it. Everything is in the packed token layout ``[B, S_img, 128]``.
"""
from __future__ import annotations

import inspect

import torch

from .config import check_finite_tensor, check_grid, check_number, check_steps, variant_defaults
from .schedules import (build_sigmas, check_image_tokens, check_sigmas, denoise_sigmas, empirical_mu, run_steps,
                        sigma_schedule, start_index)

__all__ = ["empirical_mu", "sigma_schedule", "denoise_sigmas", "build_sigmas", "check_sigmas", "run_steps",
           "start_index", "scheduler_timesteps", "model_timestep", "model_timesteps", "cfg_combine", "euler_step",
           "make_noise", "prepare_mask", "Guidance", "BatchedCFG", "SplitCFG", "PositiveOnly", "make_guidance",
           "start_latents", "Inpainting", "euler_sample", "sample", "variant_defaults"]

NUM_TRAIN_TIMESTEPS = 1000


# ---------------------------------------------------------------------------------------------------------
# Timesteps (the schedules themselves: lens_core.schedules)


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
# CFG modes: how one step's velocity is formed from the model


def _check_text(features, mask, b, mask_name, what):
    """Text features (list or stacked) and their [B, S] mask must agree with each other and the batch."""
    if mask is None or mask.ndim != 2 or mask.shape[0] != b:
        raise ValueError(f"{mask_name}: expected [B={b}, S] bool, got {None if mask is None else tuple(mask.shape)}")
    if _first(features).shape[:2] != mask.shape:
        raise ValueError(f"{what} features: expected [B, S] = {tuple(mask.shape)} like the mask, got "
                         f"{tuple(_first(features).shape)}")


def _to_run(features, mask, device, dtype):
    return _map(features, lambda f: f.to(device=device, dtype=dtype)), mask.to(device)


class Guidance:
    """A CFG mode: the text inputs on the run device / dtype, and how a step's velocity is formed from them.

    ``velocity(model, latents, t, grid, kwargs)``: ``t`` is the step's 0-dim model timestep (expanded here to
    the rows of each forward), ``kwargs`` extra keywords for the model (``exact``). ``exact``: the DiT mode this
    guidance runs the model in (passed to models that accept it). ``forwards``: model calls per step.
    """

    exact: bool = True
    forwards: int = 1

    def velocity(self, model, latents, t, grid, kwargs) -> torch.Tensor:
        raise NotImplementedError


class BatchedCFG(Guidance):
    """The reference computation: positive and negative as one batch of 2B ([pos; neg], the shorter text
    zero-padded with mask False to a common length), one forward per step, then :func:`cfg_combine` for every
    guidance scale (g = 1 included). With ``exact=True`` it reproduces the official pipeline bit for bit."""

    def __init__(self, pos_features, pos_mask, neg_features, neg_mask, guidance: float, *, device, dtype,
                 exact: bool = True):
        target = max(pos_mask.shape[1], neg_mask.shape[1])
        pf, pm = _pad_text(pos_features, pos_mask, target)
        nf, nm = _pad_text(neg_features, neg_mask, target)
        feats = _zip(pf, nf, lambda p, n: torch.cat([p, n.to(p.device)], dim=0))
        self.features, self.mask = _to_run(feats, torch.cat([pm, nm.to(pm.device)], dim=0), device, dtype)
        self.guidance, self.exact, self.rows = float(guidance), exact, 2 * pos_mask.shape[0]

    def velocity(self, model, latents, t, grid, kwargs):
        out = model(latents.repeat(2, 1, 1), self.features, self.mask, t.expand(self.rows), grid=grid, **kwargs)
        cond, uncond = out.chunk(2)
        return cfg_combine(cond, uncond, self.guidance)


class SplitCFG(Guidance):
    """The fast CFG: two forwards per step (positive, negative), each without the text columns its mask pads in
    every row (the empty negative runs with no text tokens, an unpadded positive needs no attention mask), then
    :func:`cfg_combine`. Equal to :class:`BatchedCFG` up to float rounding (fp32 ~1e-7)."""

    forwards = 2

    def __init__(self, pos_features, pos_mask, neg_features, neg_mask, guidance: float, *, device, dtype,
                 exact: bool = False):
        self.features, self.mask = _to_run(*_crop_text(pos_features, pos_mask), device, dtype)
        self.neg_features, self.neg_mask = _to_run(*_crop_text(neg_features, neg_mask), device, dtype)
        self.guidance, self.exact, self.rows = float(guidance), exact, pos_mask.shape[0]

    def velocity(self, model, latents, t, grid, kwargs):
        t = t.expand(self.rows)
        cond = model(latents, self.features, self.mask, t, grid=grid, **kwargs)
        uncond = model(latents, self.neg_features, self.neg_mask, t, grid=grid, **kwargs)
        return cfg_combine(cond, uncond, self.guidance)


class PositiveOnly(Guidance):
    """No guidance (CFG 1, fast path): one forward on the positive alone (its all-padding text columns
    dropped); the velocity is the model's output as it is."""

    def __init__(self, pos_features, pos_mask, *, device, dtype, exact: bool = False):
        self.features, self.mask = _to_run(*_crop_text(pos_features, pos_mask), device, dtype)
        self.exact, self.rows = exact, pos_mask.shape[0]

    def velocity(self, model, latents, t, grid, kwargs):
        return model(latents, self.features, self.mask, t.expand(self.rows), grid=grid, **kwargs)


def make_guidance(pos_features, pos_mask, neg_features=None, neg_mask=None, *, cfg: float, exact: bool = True,
                  device, dtype, batch: int | None = None) -> Guidance:
    """The CFG mode :func:`sample` uses: ``exact`` → :class:`BatchedCFG` (every cfg); otherwise
    :class:`PositiveOnly` at cfg == 1 and :class:`SplitCFG` at any other cfg. ``neg_features=None`` = the
    official empty negative (zero features of the positive's shape, all-False mask). Checks that the features
    and masks agree with each other and with the batch (``batch``, default the positive mask's)."""
    b = batch if batch is not None else pos_mask.shape[0] if isinstance(pos_mask, torch.Tensor) else -1
    _check_text(pos_features, pos_mask, b, "pos_mask", "positive")
    pos_mask = pos_mask.bool()
    cfg = float(cfg)
    if not exact and cfg == 1.0:
        return PositiveOnly(pos_features, pos_mask, device=device, dtype=dtype)
    if neg_features is None:
        neg_features, neg_mask = _map(pos_features, torch.zeros_like), torch.zeros_like(pos_mask)
    _check_text(neg_features, neg_mask, b, "neg_mask", "negative")
    mode = BatchedCFG if exact else SplitCFG
    return mode(pos_features, pos_mask, neg_features, neg_mask.bool(), cfg, device=device, dtype=dtype, exact=exact)


# ---------------------------------------------------------------------------------------------------------
# img2img start and inpainting


def start_latents(noise, sigma0, init_latents=None, *, dtype, device) -> torch.Tensor:
    """The latents a run starts from at σ0 = ``sigma0`` (the schedule's first value): the noise itself at σ0 = 1
    (text-to-image; ``init_latents`` is not used), else (1 − σ0)·init_latents + σ0·noise computed in fp32 and
    cast to ``dtype`` (img2img; needs the clean packed latents of the noise's shape)."""
    sigma0 = torch.as_tensor(sigma0, dtype=torch.float32).to(device)
    if float(sigma0) >= 1.0:
        return noise.to(device=device, dtype=dtype)
    if init_latents is None or tuple(init_latents.shape) != tuple(noise.shape):
        raise ValueError(f"init_latents: denoise < 1 needs the clean latents of shape {tuple(noise.shape)} (the "
                         f"schedule starts at sigma {float(sigma0):.6g}, below 1), got "
                         f"{None if init_latents is None else tuple(init_latents.shape)}")
    return ((1.0 - sigma0) * init_latents.to(device).float() + sigma0 * noise.to(device).float()).to(dtype)


class Inpainting:
    """Masked denoising (no Lens inpainting model exists): after every step the latents outside ``mask`` are
    replaced by the input latent at the next step's noise level, (1 − σ)·init + σ·noise with the run's noise,
    so that region ends equal to ``init_latents`` (bit for bit where the mask is 0) and the model sees a
    consistent image at every step; the x0 handed to callbacks is the input latent there too.

    ``mask``: the packed [B, S_img, 1] mask of :func:`prepare_mask` (1 = generate anew, 0 = keep);
    ``init_latents`` / ``noise``: packed [B, S_img, 128]. A mask of ones equals plain img2img."""

    def __init__(self, mask, init_latents, noise, *, device):
        b, s_img = noise.shape[0], noise.shape[1]
        if init_latents is None or tuple(init_latents.shape) != tuple(noise.shape):
            raise ValueError(f"init_latents: a mask needs the input latents of shape {tuple(noise.shape)} to keep "
                             f"outside it, got {None if init_latents is None else tuple(init_latents.shape)}")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, s_img, 1):
            raise ValueError(f"mask: expected the packed mask [{b}, {s_img}, 1] (lens_core.sampling.prepare_mask), "
                             f"got {getattr(mask, 'shape', type(mask).__name__)}")
        self.mask = mask.to(device=device, dtype=torch.float32)
        self.init, self.noise = init_latents.to(device).float(), noise.to(device).float()

    def __call__(self, latents, x0, sigma_next):
        """(latents, x0) after a step that ended at ``sigma_next``, with the kept region put back."""
        latents = _masked(latents, (1.0 - sigma_next) * self.init + sigma_next * self.noise, self.mask)
        return latents, torch.lerp(self.init, x0, self.mask)


# ---------------------------------------------------------------------------------------------------------
# The Euler loop and the sampler


def euler_sample(model, latents, sigmas, guidance: Guidance, *, grid, inpainting=None, callback=None):
    """Walk ``sigmas`` (checked by :func:`lens_core.schedules.check_sigmas` first) from ``latents`` (already at
    sigmas[0], in the run dtype on the run device) with Euler steps of the ``guidance`` velocity; returns the
    final latents. ``inpainting``: an :class:`Inpainting` applied after every step; ``callback(step, total,
    latents, x0)`` after every step (x0 = latents − σ·v in fp32; it may raise to interrupt; a returned tensor
    replaces the latents)."""
    device, dtype = latents.device, latents.dtype
    sigmas = check_sigmas(sigmas).to(device)
    t_model = model_timesteps(sigmas, dtype)
    kwargs = {"exact": guidance.exact} if _accepts_exact(model) else {}
    total = sigmas.shape[0] - 1
    for i in range(total):
        v = guidance.velocity(model, latents, t_model[i], grid, kwargs)
        x0 = latents.float() - sigmas[i] * v.float()
        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
        if inpainting is not None:
            latents, x0 = inpainting(latents, x0, sigmas[i + 1])
        if callback is not None:
            replaced = callback(i, total, latents, x0)
            if isinstance(replaced, torch.Tensor):
                latents = replaced.to(device=device, dtype=dtype)
    return latents


@torch.no_grad()
def sample(model, noise, pos_features, pos_mask, neg_features=None, neg_mask=None, *, grid, cfg, steps=None,
           denoise=1.0, sigmas=None, init_latents=None, callback=None, exact=True, dtype=None, device=None,
           mask=None):
    """Denoise ``noise`` [B, S_img, 128] into final latents [B, S_img, 128] (run dtype, on ``device``): checks
    every input, then :func:`make_guidance` + :func:`start_latents` + :class:`Inpainting` + :func:`euler_sample`.

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
        grid: (H/16, W/16); cfg: guidance scale (applied for every value with the per-token norm rescale,
            spec §4).
        steps / denoise: the official schedule (:func:`lens_core.schedules.sigma_schedule`) for ``steps`` steps;
            with ``denoise`` < 1 only its last round(steps·denoise) steps (at least one) are run (img2img).
        sigmas: instead of ``steps``/``denoise``, the exact sigmas to walk (any registered schedule,
            :func:`lens_core.schedules.build_sigmas`, or a ComfyUI SIGMAS): 1-D, strictly decreasing, within
            [0, 1], ending at 0, at most MAX_STEPS steps. A first sigma below 1 means img2img.
        init_latents: img2img. When the walked schedule starts at σ_s < 1, the start latent is
            x = (1 − σ_s)·init_latents + σ_s·noise (computed in fp32, then cast), where ``init_latents`` is the
            clean packed latent [B, S_img, 128]. From σ = 1, ``init_latents`` is ignored (except with ``mask``).
        callback: ``callback(step, total, latents, x0)`` after every step (step 0-based among the ``total``
            steps run; ``latents`` the new latents, ``x0`` the predicted clean latent x − σ·v, fp32). It may
            raise to interrupt; if it returns a tensor, that tensor replaces the latents.
        exact: True (default) = :class:`BatchedCFG` with the DiT in its reference-exact mode; reproduces the
            official pipeline bit for bit. False = the fast path: :class:`PositiveOnly` at cfg == 1, otherwise
            :class:`SplitCFG`; the DiT in its fast mode. Differences are at bf16 rounding level
            (tests/test_sampling.py measures them; fp32 ~1e-7).
        dtype: run dtype (default: ``model.dtype`` if it exists, else float32). device: default the
            model's parameter device (else ``noise.device``).
        mask: inpainting (:class:`Inpainting`): a packed [B, S_img, 1] mask from :func:`prepare_mask`
            (1 = generate anew, 0 = keep); needs ``init_latents`` at any ``denoise``.
    """
    if not isinstance(noise, torch.Tensor) or noise.ndim != 3:
        raise ValueError(f"noise: expected packed latents [B, S_img, 128], got "
                         f"{getattr(noise, 'shape', type(noise).__name__)}")
    b, s_img, _ = noise.shape
    gh, gw = check_grid(grid, s_img)
    if sigmas is None:
        if steps is None:
            raise ValueError("sample: expected steps (the official schedule) or sigmas (any schedule), got neither")
        sigmas = build_sigmas("official", check_steps(steps), check_image_tokens(s_img, "noise (image tokens)"),
                              denoise)
    else:
        if steps is not None or denoise != 1.0:
            raise ValueError(f"sample: sigmas replace steps and denoise (the sigmas are the steps walked), got steps="
                             f"{steps!r}, denoise={denoise!r} as well; fix: pass sigmas alone, or steps/denoise alone")
        check_image_tokens(s_img, "noise (image tokens)")
        sigmas = check_sigmas(sigmas)
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
    guidance = make_guidance(pos_features, pos_mask, neg_features, neg_mask, cfg=cfg, exact=exact, device=device,
                             dtype=dtype, batch=b)
    latents = start_latents(noise, sigmas[0], init_latents, dtype=dtype, device=device)
    inpainting = None if mask is None else Inpainting(mask, init_latents, noise, device=device)
    return euler_sample(model, latents, sigmas, guidance, grid=(gh, gw), inpainting=inpainting, callback=callback)
