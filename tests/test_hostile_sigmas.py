"""Hostile input to the schedules (issue 25, sigma / denoise items): LensSigmas and lens_core.schedules /
sampling.sample share the pipeline's size and step limits (MAX_PIXELS = 2048², MAX_STEPS = 1000), degenerate
schedules (non-finite, rising, repeated, outside [0, 1], not ending at 0) are refused wherever sigmas enter, and
a denoise too small for one step runs one step (the schedule's last) instead of returning the latent unchanged.

Before: LensSigmas at its declared maximum 16384² returned NaN sigmas, 8192² gave [1, 1, 1, 1, 0], 10⁶² raised a
raw OverflowError and steps 10⁹ allocated until killed; denoise 0.01 × 20 steps ran 0 steps silently. The
unbounded cases run in a child process under a 2 GiB address-space limit (test_hostile_cli.run_limited).
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

from lens_core import sampling as S
from lens_core import schedules as SC
from test_hostile_cli import run_limited
from test_nodes import import_pack, loaded, models_dir, pack, run  # noqa: F401  (fixtures re-exported)

LIMIT_MESSAGE = "expected at most 4.19 MP (2048×2048; the official Lens sizes are the 1024/1440 buckets)"


def test_lens_sigmas_and_core_schedules_refuse_unbounded_requests():
    """Each case must end in its one-line ValueError, before any allocation of its size (2 GiB limit)."""
    code = r"""
import json, sys, torch
sys.path.insert(0, "tests")
from test_nodes import import_pack
from lens_core import schedules as SC, sampling as S
node = import_pack().NODE_CLASS_MAPPINGS["LensSigmas"]()
cases = {
    "16384": lambda: node.get_sigmas(16384, 16384, 20, 1.0, "lens"),
    "8192": lambda: node.get_sigmas(8192, 8192, 20, 1.0, "lens"),
    "1e62": lambda: node.get_sigmas(10 ** 62, 10 ** 62, 20, 1.0, "lens"),
    "steps": lambda: node.get_sigmas(1024, 1024, 10 ** 9, 1.0, "lens"),
    "latent_8192": lambda: node.get_sigmas(16, 16, 20, 1.0, "lens",
                                           latent={"samples": torch.zeros(1, 128, 1, 1).expand(1, 128, 512, 512)}),
    "native_latent_8192": lambda: node.get_sigmas(16, 16, 20, 1.0, "lens",
                                                  latent={"samples": torch.zeros(1, 4, 1, 1).expand(1, 4, 1024, 1024)}),
    "shift": lambda: node.get_sigmas(1024, 1024, 20, 1.0, "lens", schedule="simple", shift=1e30),
    "core_tokens_16384sq": lambda: SC.sigma_schedule(20, 16384 * 16384 // 256),
    "core_tokens_8192sq": lambda: SC.sigma_schedule(20, 8192 * 8192 // 256),
    "core_tokens_1e62": lambda: SC.sigma_schedule(20, 10 ** 62),
    "core_steps": lambda: SC.sigma_schedule(10 ** 9, 24),
    "core_simple_steps": lambda: SC.simple_schedule(10 ** 9, 24),
    "core_simple_shift": lambda: SC.simple_schedule(4, 24, 1e300),
    "sample_tokens": lambda: S.sample(lambda *a, **k: a[0], torch.zeros(1, 1, 1).expand(1, 8192 * 8192 // 256, 128),
                                      torch.zeros(1, 2, 8), torch.ones(1, 2, dtype=torch.bool),
                                      grid=(512, 512), steps=4, cfg=1.0),
}
out = {}
for name, fn in cases.items():
    try:
        r = fn()
        out[name] = "no error: " + repr(r)[:200]
    except ValueError as exc:
        out[name] = str(exc)
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""
    r = run_limited(["-c", code], text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    side = "expected an integer in [16, 8192], found"
    assert got["16384"].startswith(f"LensSigmas height: {side} 16384; fix: use the image size"), got["16384"]
    assert got["8192"] == f"LensSigmas size 8192×8192 = 67.11 MP: {LIMIT_MESSAGE}; fix: generate at a bucket " \
                          f"size (aspect + base 1024/1440) and upscale afterwards"
    assert got["1e62"].startswith(f"LensSigmas height: {side} {10 ** 62}"), got["1e62"]
    assert got["steps"] == ("LensSigmas steps: expected an integer in [0, 1000], found 1000000000; fix: 0 = the "
                            "variant's default; Lens uses 20, Turbo 4, Base 50 steps")
    assert got["latent_8192"].startswith(f"LensSigmas latent 8192×8192 = 67.11 MP: {LIMIT_MESSAGE}")
    assert got["native_latent_8192"].startswith(f"LensSampler latent 8192×8192 = 67.11 MP: {LIMIT_MESSAGE}")
    assert got["shift"].startswith("LensSigmas shift: expected a finite number in [0.0, 10.0], found 1e+30")
    tokens = "image_seq_len: expected at most 16384 image tokens (2048×2048 pixels, the generation limit), found"
    assert got["core_tokens_16384sq"].startswith(f"{tokens} 1048576; fix:"), got["core_tokens_16384sq"]
    assert got["core_tokens_8192sq"].startswith(f"{tokens} 262144; fix:")
    assert got["core_tokens_1e62"].startswith(f"{tokens} {10 ** 62}; fix:")
    steps = "steps: expected an integer in [1, 1000], found 1000000000; fix: Lens uses 20, Turbo 4, Base 50 steps"
    assert got["core_steps"] == got["core_simple_steps"] == steps
    assert got["core_simple_shift"].startswith("shift: expected a finite number in [0.0, 10.0], found 1e+300")
    assert got["sample_tokens"].startswith("noise (image tokens): expected at most 16384 image tokens")


def test_lens_sigmas_within_the_limits():
    """The largest size and step count it accepts give a proper schedule (2048², 1000 steps; 8192×512)."""
    node = import_pack().NODE_CLASS_MAPPINGS["LensSigmas"]()
    for w, h in ((2048, 2048), (8192, 512), (16, 16)):
        for schedule in ("official", "simple"):
            (sig,) = node.get_sigmas(w, h, 1000, 1.0, "lens", schedule=schedule)
            assert sig.shape == (1001,) and torch.isfinite(sig).all() and sig[0] == 1 and sig[-1] == 0
            assert bool((sig[1:] < sig[:-1]).all()), (w, h, schedule)
    (sig,) = node.get_sigmas(1440, 1440, 4, 1.0, "lens", schedule="simple", shift=1.829)
    assert torch.equal(sig, SC.simple_schedule(4, 8100, 1.829))
    with pytest.raises(ValueError, match=r"LensSigmas schedule: the official schedule takes no shift, found shift "
                                         r"1.5; fix"):
        node.get_sigmas(1024, 1024, 4, 1.0, "lens", schedule="official", shift=1.5)
    with pytest.raises(ValueError, match=r"LensSigmas schedule: unknown schedule 'karras'"):
        node.get_sigmas(1024, 1024, 4, 1.0, "lens", schedule="karras")
    with pytest.raises(ValueError, match=r"LensSigmas steps: expected an integer in \[0, 1000\], found 'x'"):
        node.get_sigmas(1024, 1024, "x", 1.0, "lens")
    with pytest.raises(ValueError, match=r"denoise must be in \(0, 1\], got None"):
        node.get_sigmas(1024, 1024, 4, None, "lens")


DEGENERATE = {
    "nan": (torch.tensor([1.0, float("nan"), 0.0]), r"expected finite values, found NaN/inf at step\(s\) \[1\]"),
    "inf": (torch.tensor([float("inf"), 0.5, 0.0]), r"expected finite values, found NaN/inf at step\(s\) \[0\]"),
    "rising": (torch.tensor([0.5, 0.8, 0.0]), r"expected strictly decreasing sigmas, found sigma\[0\] = 0.5 and "
                                              r"sigma\[1\] rises to 0.800000012"),
    "repeated": (torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]), r"expected strictly decreasing sigmas, found sigma\[0\] = 1 "
                                                       r"and sigma\[1\] repeats 1 \(a degenerate"),
    "above_one": (torch.tensor([14.6, 3.0, 0.0]), r"expected flow-match sigmas within \[0, 1\], found the range "
                                                  r"\[0, 14.6\]"),
    "negative": (torch.tensor([1.0, -0.5, 0.0]), r"expected flow-match sigmas within \[0, 1\], found "
                                                r"the range \[-0.5, 1\]"),
    "not_ending_at_0": (torch.tensor([1.0, 0.6, 0.3]), r"expected a schedule that ends at 0, found 0.3 last"),
    "one_value": (torch.tensor([1.0]), r"expected a 1-D tensor of 2 … 1001 sigmas \(1 … 1000 steps\), found shape "
                                       r"\(1,\)"),
    "two_d": (torch.ones(2, 3), r"expected a 1-D tensor of 2 … 1001 sigmas .*, found shape \(2, 3\)"),
    "too_long": (torch.linspace(1, 0, 1002), r"expected a 1-D tensor of 2 … 1001 sigmas .*, found shape \(1002,\)"),
    "integer": (torch.tensor([1, 0]), r"expected floating-point sigmas, found torch.int64"),
    "list": ([1.0, 0.0], r"expected a 1-D tensor of sigmas, found list"),
}


@pytest.mark.parametrize("name", sorted(DEGENERATE))
def test_degenerate_schedules_are_refused(name):
    sigmas, message = DEGENERATE[name]
    with pytest.raises(ValueError, match=rf"^sigmas: {message}"):
        SC.check_sigmas(sigmas)
    noise, feats, mask = torch.zeros(1, 4, 128), torch.zeros(1, 2, 8), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"^sigmas: {message}"):
        S.sample(lambda x, *a, **k: x, noise, feats, mask, grid=(2, 2), cfg=1.0, sigmas=sigmas)


def _lens_model():
    bridge = sys.modules[import_pack().NODE_CLASS_MAPPINGS["LensSampler"].__module__].bridge
    return bridge.LensModel(patcher=None, config=None, variant="lens", dtype=torch.float32, path="")


def test_lens_sampler_sigmas_input_is_checked():
    """The SIGMAS input is checked before anything loads (the model here has no patcher: reaching the load
    would fail differently); denoise < 1 beside it and an img2img schedule on an empty latent are refused."""
    sampler = import_pack().NODE_CLASS_MAPPINGS["LensSampler"]()
    empty = {"samples": torch.zeros(1, 128, 4, 6)}
    for name in ("nan", "repeated", "above_one", "not_ending_at_0"):
        sigmas, message = DEGENERATE[name]
        with pytest.raises(ValueError, match=rf"^LensSampler sigmas: {message}"):
            sampler.sample(_lens_model(), None, None, empty, 0, 0, 5.0, 1.0, sigmas=sigmas)
    with pytest.raises(ValueError, match=r"^LensSampler: denoise 0.5 with a sigmas input"):
        sampler.sample(_lens_model(), None, None, empty, 0, 0, 5.0, 0.5, sigmas=SC.sigma_schedule(4, 24))
    with pytest.raises(ValueError, match=r"^LensSampler: the connected sigmas start at 0.\d+ < 1, which is img2img "
                                         r"and needs an input image latent"):
        sampler.sample(_lens_model(), None, None, empty, 0, 0, 5.0, 1.0, sigmas=SC.sigma_schedule(4, 24)[2:])
    with pytest.raises(ValueError, match=r"^LensSampler: denoise 0.5 < 1 is img2img and needs an input image latent"):
        sampler.sample(_lens_model(), None, None, empty, 0, 4, 5.0, 0.5)


# --- denoise too small for one step ------------------------------------------------------------------------------


def test_denoise_too_small_for_one_step_runs_one_step():
    """Decision (README "What the pack refuses"): round(steps·denoise) steps, at least one. 0.01 × 20 runs the
    schedule's last step (σ 0.25 → 0 at 24 tokens), the smallest change the schedule can make."""
    assert SC.run_steps(20, 0.01) == 1 and SC.start_index(20, 0.01) == 19
    assert SC.run_steps(20, 0.35) == 7 and SC.run_steps(20, 1.0) == 20 and SC.run_steps(1, 0.01) == 1
    full = SC.sigma_schedule(20, 24)
    assert torch.equal(S.denoise_sigmas(20, 24, 0.01), full[19:])
    (sig,) = import_pack().NODE_CLASS_MAPPINGS["LensSigmas"]().get_sigmas(96, 64, 20, 0.01, "lens")
    assert torch.equal(sig, full[19:]) and sig.shape == (2,)
    init, noise = torch.full((1, 24, 128), 0.25), S.make_noise(3, 1, 4, 6)
    calls = []
    out = S.sample(lambda x, *a, **k: calls.append(1) or x - init, noise, [torch.zeros(1, 2, 8)] * 4,
                   torch.ones(1, 2, dtype=torch.bool), grid=(4, 6), steps=20, cfg=1.0, denoise=0.01,
                   init_latents=init, exact=False)
    s19 = full[19]
    start = (1 - s19) * init + s19 * noise              # the img2img start at sigma[19], one Euler step to 0
    assert len(calls) == 1 and torch.allclose(out, start - s19 * (start - init), atol=1e-6)
    assert not torch.allclose(out, init, atol=1e-3)
    for bad in (0.0, -0.1, 1.5, float("nan"), None, "0.5", True):
        with pytest.raises(ValueError, match=r"denoise must be in \(0, 1\], got"):
            SC.run_steps(20, bad)


def test_lens_sampler_at_the_denoise_minimum_changes_the_latent(pack, loaded):  # noqa: F811
    """LensSampler at the node minimum denoise 0.01 × 20 steps: one DiT forward, and the latent changes."""
    model = loaded["model"]
    (cond,) = run(pack, "LensTextEncode", text_encoder=loaded["te"], text="a cube")
    image = {"samples": torch.randn(1, 128, 4, 6, generator=torch.Generator().manual_seed(0))}
    forwards = []
    handle = model.module.register_forward_hook(lambda m, args, out: forwards.append(out.shape[0]))
    try:
        (out,) = run(pack, "LensSampler", model=model, positive=cond, negative=cond, latent_image=image, seed=1,
                     steps=20, cfg=1.0, denoise=0.01)
    finally:
        handle.remove()
    assert forwards == [1]
    assert not torch.equal(out["samples"], image["samples"])
    sigma = float(SC.sigma_schedule(20, 24)[19])
    print(f"denoise 0.01 × 20 steps: one step from sigma {sigma:.4f}, rel change "
          f"{((out['samples'] - image['samples']).norm() / image['samples'].norm()).item():.3g}")


def test_pipeline_at_the_denoise_minimum_runs_one_step(pipeline_dir):
    from lens_core.pipeline import LensPipeline

    pipe = LensPipeline.from_pretrained(pipeline_dir, dtype=torch.float32, device="cpu")
    seen = []
    res = pipe("a cube", image=torch.zeros(1, 3, 64, 96), denoise=0.01, steps=20, cfg=1.0,
               callback=lambda step, total, lat, x0: seen.append((step, total)))
    assert seen == [(0, 1)] and res.parameters["denoise"] == 0.01
