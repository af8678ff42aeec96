"""Sigma schedules for flow-match sampling, by name, and the checks every schedule passes before a sampler
walks it. Spec: ../shared/docs/lens_dit_spec.md §4 (the official schedule); ComfyUI facts in
../shared/docs/comfyui_integration.md §6.4 and checkpoint_formats.md §5.2 (the native one).

A schedule maps (steps, image tokens) to ``steps + 1`` float32 sigmas on the CPU, from 1 down to 0, strictly
decreasing. Registered schedules (:data:`SCHEDULES`):

- ``official``: the Lens pipeline's (FLUX.2 empirical mu, which depends on the image size and, below 4300
  tokens, on the step count). The default everywhere; reproduces the official pipeline bit for bit.
- ``simple``: what ComfyUI's BasicScheduler / KSampler "simple" gives on a native Lens MODEL
  (``ModelSamplingFlux``: a 10000-entry table of exp(shift) / (exp(shift) + 1/t − 1) at t = k/10000, sampled at
  ``steps`` evenly spaced entries from the top). ``shift`` is that mu; None = the value of the official ComfyUI
  Lens template's ``ModelSamplingFlux`` node (max_shift 1.15, base_shift 0.5) at this image size
  (:func:`model_sampling_flux_shift`); 1.829 = a native Lens MODEL without that node (``supported_models.Lens``).

A schedule name with options is written ``name:value`` (``simple:1.829``), as on the command line
(``--schedule``). Sizes and step counts are bounded by the generation limits of :mod:`lens_core.config`
(at most :data:`~lens_core.config.MAX_STEPS` steps, :data:`MAX_IMAGE_TOKENS` image tokens = MAX_PIXELS / 16²)
before anything is computed, and every result passes :func:`check_sigmas`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable

import numpy as np
import torch

from .config import MAX_PIXELS, MAX_STEPS, check_number, check_steps

__all__ = ["MAX_IMAGE_TOKENS", "Schedule", "SCHEDULES", "register_schedule", "schedule_names", "parse_schedule",
           "format_schedule", "build_sigmas", "check_sigmas", "check_image_tokens", "check_schedule_steps",
           "empirical_mu", "sigma_schedule", "simple_schedule", "model_sampling_flux_shift", "start_index",
           "run_steps", "denoise_sigmas"]

#: Image tokens of the largest generation (MAX_PIXELS / 16², e.g. 2048² → 16384 tokens).
MAX_IMAGE_TOKENS = MAX_PIXELS // 256
#: ComfyUI's ModelSamplingFlux table length (its ``timesteps`` default).
FLUX_TABLE_SIZE = 10000
#: Bound of a ``simple`` schedule's shift (mu, used as e^mu): beyond it the schedule is all ones in float32.
MAX_SHIFT = 10.0


# ---------------------------------------------------------------------------------------------------------
# Argument checks shared by every schedule


def _positive_int(value, name: str, what: str = "") -> int:
    """``value`` as an int >= 1; ValueError "``name`` must be a positive integer``what``, got …" otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer{what}, got {value!r}")
    return int(value)


def check_schedule_steps(steps, name: str = "steps") -> int:
    """``steps`` as an int in [1, MAX_STEPS] (the upper bound: :func:`lens_core.config.check_steps`); ValueError
    otherwise (before anything is allocated)."""
    return check_steps(_positive_int(steps, name), name)


def check_image_tokens(image_seq_len, name: str = "image_seq_len") -> int:
    """The number of image tokens (H/16 · W/16) as an int in [1, MAX_IMAGE_TOKENS] (the message above the limit
    names it in pixels and the fix)."""
    tokens = _positive_int(image_seq_len, name, " (H/16 · W/16 image tokens)")
    if tokens > MAX_IMAGE_TOKENS:
        side = math.isqrt(MAX_PIXELS)
        raise ValueError(f"{name}: expected at most {MAX_IMAGE_TOKENS} image tokens ({side}×{side} pixels, the "
                         f"generation limit), found {tokens}; fix: generate at a bucket size and upscale afterwards")
    return tokens


def check_sigmas(sigmas, name: str = "sigmas") -> torch.Tensor:
    """A schedule a sampler can walk, as a contiguous float32 CPU tensor: 1-D, 2 … MAX_STEPS + 1 values, finite,
    within [0, 1] (flow matching), strictly decreasing (no repeated sigma: a step of length 0 wastes a model
    call) and ending at 0 (a schedule cut before 0, e.g. by SplitSigmas, would return a noisy latent).
    ValueError naming ``name``, what was expected and what was found."""
    if not isinstance(sigmas, torch.Tensor):
        raise ValueError(f"{name}: expected a 1-D tensor of sigmas, found {type(sigmas).__name__}")
    if sigmas.ndim != 1 or not 2 <= sigmas.shape[0] <= MAX_STEPS + 1:
        raise ValueError(f"{name}: expected a 1-D tensor of 2 … {MAX_STEPS + 1} sigmas (1 … {MAX_STEPS} steps), "
                         f"found shape {tuple(sigmas.shape)}")
    if not sigmas.is_floating_point():
        raise ValueError(f"{name}: expected floating-point sigmas, found {sigmas.dtype}")
    s = sigmas.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name}: expected finite values, found NaN/inf at step(s) "
                         f"{(~torch.isfinite(s)).nonzero().flatten().tolist()[:8]}; fix: a smaller size, fewer steps "
                         f"or a smaller shift")
    lo, hi = float(s.min()), float(s.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name}: expected flow-match sigmas within [0, 1], found the range [{lo:g}, {hi:g}]; fix: "
                         f"use a schedule made for a flow model (LensSigmas, or BasicScheduler on a Lens MODEL)")
    if float(s[-1]) != 0.0:
        raise ValueError(f"{name}: expected a schedule that ends at 0, found {float(s[-1]):g} last; a sampler stopping "
                         f"there returns a noisy latent; fix: pass the whole schedule (not the first half of a "
                         f"SplitSigmas)")
    steps = s[1:] - s[:-1]
    if bool((steps >= 0).any()):
        i = int((steps >= 0).nonzero()[0])
        what = "repeats" if float(s[i + 1]) == float(s[i]) else "rises to"
        raise ValueError(f"{name}: expected strictly decreasing sigmas, found sigma[{i}] = {float(s[i]):.9g} and "
                         f"sigma[{i + 1}] {what} {float(s[i + 1]):.9g} (a degenerate schedule: a step of length 0 or "
                         f"backwards); fix: fewer steps, a smaller shift, or another scheduler")
    return s


# ---------------------------------------------------------------------------------------------------------
# official


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
    """The official shifted sigmas [steps + 1] float32 on the CPU, ending with 0 (spec §4 "Schedule").

    Raw sigmas are linspace(1, 1/N, N) in float64 cast to float32; the shift e^mu / (e^mu + (1/σ − 1)) is
    evaluated in float32 with e^mu rounded to float32 first, exactly as the reference scheduler does.
    ``steps`` ≤ MAX_STEPS and ``image_seq_len`` ≤ MAX_IMAGE_TOKENS are checked first.
    """
    steps = check_schedule_steps(steps)
    image_seq_len = check_image_tokens(image_seq_len)
    mu = empirical_mu(image_seq_len, steps)
    raw = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    em = np.float32(math.exp(mu))
    shifted = em / (em + (np.float32(1.0) / raw - np.float32(1.0)))
    sig = torch.from_numpy(shifted.astype(np.float32))
    return torch.cat([sig, torch.zeros(1)])


# ---------------------------------------------------------------------------------------------------------
# simple (ComfyUI's native Lens sampling: ModelSamplingFlux + the "simple" scheduler)


def model_sampling_flux_shift(image_seq_len: int, max_shift: float = 1.15, base_shift: float = 0.5) -> float:
    """The shift (mu) ComfyUI's ModelSamplingFlux node sets for an image of ``image_seq_len`` tokens (W·H/16²):
    the line through (256 tokens, base_shift) and (4096 tokens, max_shift), in float64. The official ComfyUI
    Lens templates use 1.15 / 0.5 (1024²: 1.15, 1440²: 1.82776)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return float(image_seq_len) * slope + (base_shift - slope * 256)


def _flux_table(shift: float) -> torch.Tensor:
    """ModelSamplingFlux's sigma table: σ(t) = e^shift / (e^shift + (1/t − 1)) at t = k/10000, k = 1 … 10000,
    float32, with the rounding points of ComfyUI's torch expression (a Python float divided by a tensor is a
    reciprocal times that float; e^shift enters the float32 ops as a rounded scalar)."""
    em = math.exp(shift)
    t = torch.arange(1, FLUX_TABLE_SIZE + 1, 1) / FLUX_TABLE_SIZE
    return torch.reciprocal(em + (torch.reciprocal(t) - 1)) * em


def simple_schedule(steps: int, image_seq_len: int, shift: float | None = None) -> torch.Tensor:
    """ComfyUI's "simple" schedule on a native Lens MODEL: ``steps`` entries of the ModelSamplingFlux table taken
    every 10000/steps entries from its top (σ = 1), then 0; float32 on the CPU. ``shift`` None = the official
    ComfyUI Lens template's ModelSamplingFlux(1.15, 0.5) at this size; 1.829 = a native Lens MODEL as loaded."""
    steps = check_schedule_steps(steps)
    image_seq_len = check_image_tokens(image_seq_len)
    if shift is None:
        shift = model_sampling_flux_shift(image_seq_len)
    shift = check_number(shift, "shift", 0.0, MAX_SHIFT, "the ModelSamplingFlux shift (mu) of a Lens model: "
                                                         "1.829 as loaded, 1.15 … 1.83 from the templates")
    table = _flux_table(shift)
    stride = len(table) / steps
    picked = [float(table[-(1 + int(k * stride))]) for k in range(steps)]
    return torch.tensor(picked + [0.0], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A named schedule: ``sigmas(steps, image_seq_len, shift)`` → float32 [steps + 1] (``shift`` is passed
    only to schedules with ``takes_shift``)."""

    name: str
    description: str
    sigmas: Callable[..., torch.Tensor]
    takes_shift: bool = False


SCHEDULES: dict[str, Schedule] = {}


def register_schedule(schedule: Schedule) -> Schedule:
    """Add a schedule to :data:`SCHEDULES` (names are lower-case words without ':')."""
    if not schedule.name or ":" in schedule.name or schedule.name != schedule.name.lower():
        raise ValueError(f"schedule name {schedule.name!r}: expected a lower-case name without ':'")
    SCHEDULES[schedule.name] = schedule
    return schedule


register_schedule(Schedule("official", "the official Lens pipeline's (FLUX.2 empirical mu for this size and step "
                                       "count)", lambda steps, tokens: sigma_schedule(steps, tokens)))
register_schedule(Schedule("simple", "ComfyUI's native Lens sampling: ModelSamplingFlux + the \"simple\" "
                                     "scheduler (simple = the official template's shift at this size; "
                                     "simple:1.829 = a native Lens MODEL without ModelSamplingFlux)",
                           simple_schedule, takes_shift=True))


def schedule_names() -> list[str]:
    """Registered names, ``official`` first."""
    return list(SCHEDULES)


def parse_schedule(spec, name: str = "schedule") -> tuple[str, float | None]:
    """``"official"``, ``"simple"`` or ``"simple:1.829"`` → (registered name, shift or None); ValueError naming
    ``name`` for an unknown schedule, a shift given to a schedule without one, or a shift that is not a number."""
    if not isinstance(spec, str):
        raise ValueError(f"{name}: expected a schedule name ({', '.join(SCHEDULES)}), found {type(spec).__name__}")
    key, sep, value = spec.strip().partition(":")
    key = key.strip().lower()
    if key not in SCHEDULES:
        raise ValueError(f"{name}: unknown schedule {spec!r}; expected one of {schedule_names()} (simple:SHIFT for "
                         f"a fixed shift)")
    if not sep:
        return key, None
    if not SCHEDULES[key].takes_shift:
        raise ValueError(f"{name} {spec!r}: the {key} schedule takes no shift; fix: {key!r} alone")
    try:
        shift = float(value)
    except ValueError:
        raise ValueError(f"{name} {spec!r}: expected {key}:SHIFT with a number, e.g. {key}:1.829") from None
    return key, check_number(shift, f"{name} shift", 0.0, MAX_SHIFT, "e.g. 1.829 (a native Lens MODEL)")


def format_schedule(schedule: str, shift: float | None = None) -> str:
    """The spec string of (name, shift): ``"simple:1.829"``, or the bare name without a shift."""
    return schedule if shift is None else f"{schedule}:{shift!r}"


def build_sigmas(schedule, steps: int, image_seq_len: int, denoise: float = 1.0, shift: float | None = None,
                 name: str = "schedule") -> torch.Tensor:
    """The sigmas a run walks: schedule ``schedule`` (a name or ``name:shift`` spec) for ``steps`` steps at
    ``image_seq_len`` image tokens, cut to its last :func:`run_steps` steps for ``denoise`` < 1 (img2img).
    Checked (:func:`check_sigmas`); float32 on the CPU."""
    key, spec_shift = parse_schedule(schedule, name)
    shift = spec_shift if shift is None else shift
    entry = SCHEDULES[key]
    if shift is not None and not entry.takes_shift:
        raise ValueError(f"{name}: the {key} schedule takes no shift, found shift {shift!r}; fix: no shift (0 = "
                         f"auto in LensSigmas), or a schedule that takes one ({[k for k, v in SCHEDULES.items() if v.takes_shift]})")
    full = entry.sigmas(steps, image_seq_len, shift) if entry.takes_shift else entry.sigmas(steps, image_seq_len)
    return check_sigmas(full, f"{key} schedule ({steps} steps, {image_seq_len} image tokens)")[
        start_index(steps, denoise):]


# ---------------------------------------------------------------------------------------------------------
# denoise: how much of a schedule an img2img run walks


def run_steps(steps: int, denoise: float) -> int:
    """Steps an img2img run with ``denoise`` walks: round(steps·denoise), at least 1 (a denoise too small for one
    step runs the schedule's last step, the smallest change the schedule can make), at most ``steps``."""
    if isinstance(denoise, bool) or not isinstance(denoise, numbers.Real) or not 0.0 < float(denoise) <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise!r}; fix: 1 = text-to-image, less keeps more of "
                         f"the input image (e.g. 0.35)")
    return max(1, min(steps, int(round(steps * float(denoise)))))


def start_index(steps: int, denoise: float) -> int:
    """First step index for img2img: the last :func:`run_steps` steps of the schedule are run."""
    return steps - run_steps(steps, denoise)


def denoise_sigmas(steps: int, image_seq_len: int, denoise: float = 1.0) -> torch.Tensor:
    """The official sigmas a run with ``denoise`` walks: the last :func:`run_steps` steps of the ``steps``
    schedule (``[run_steps + 1]`` values ending with 0; all of them for denoise = 1). float32 on the CPU."""
    return build_sigmas("official", steps, image_seq_len, denoise)
