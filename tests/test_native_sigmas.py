"""LensSigmas / LensNoise (the official schedule and the pipeline's noise for native SamplerCustom graphs) and
LensSampler's refusal of non-Lens MODELs, against the comfy stand-in (or the real comfy when importable).
The native-model numbers are in tests/test_comfyui_native.py (marked comfyui)."""
from __future__ import annotations

import pytest
import torch

from lens_core import sampling as S
from lens_core.config import aspect_buckets, pack_latents
from test_nodes import import_pack


@pytest.fixture(scope="module")
def N():
    return import_pack().NODE_CLASS_MAPPINGS


BUCKETS = [(base, label, hw) for base in (1024, 1440) for label, hw in aspect_buckets(base).items()]


@pytest.mark.parametrize("base,label,hw", BUCKETS, ids=[f"{b}-{lab}" for b, lab, _ in BUCKETS])
def test_sigmas_equal_the_official_schedule(N, base, label, hw):
    h, w = hw
    node = N["LensSigmas"]()
    lat = N["LensEmptyLatent"]().generate(label, base, 1024, 1024, 1)[0]
    native_empty = {"samples": torch.zeros(1, 4, h // 8, w // 8), "downscale_ratio_spacial": 8}
    for steps in (4, 20, 50):
        full = S.sigma_schedule(steps, (h // 16) * (w // 16))
        for denoise, first in ((1.0, 0), (0.6, steps - round(steps * 0.6)), (0.35, steps - round(steps * 0.35))):
            (sig,) = node.get_sigmas(w, h, steps, denoise, "lens")
            assert sig.dtype == torch.float32 and torch.equal(sig, full[first:]), (steps, denoise)
            # the size taken from a Lens latent or an empty native EmptyLatentImage latent instead
            assert torch.equal(node.get_sigmas(16, 16, steps, denoise, "lens", latent=lat)[0], full[first:])
            assert torch.equal(node.get_sigmas(16, 16, steps, denoise, "lens", latent=native_empty)[0], full[first:])


def test_sigmas_spec_values_and_variant_defaults(N):
    node = N["LensSigmas"]()
    # 1024² at 20 steps (spec §4 table): step 17 is 0.613825 (native template: 0.358)
    sig = node.get_sigmas(1024, 1024, 20, 1.0, "lens")[0]
    assert sig.shape == (21,) and sig[0] == 1 and sig[-1] == 0
    assert abs(sig[17].item() - 0.613825) < 5e-7
    for variant, steps in (("lens", 20), ("turbo", 4), ("base", 50)):
        assert torch.equal(node.get_sigmas(1440, 1440, 0, 1.0, variant)[0], S.sigma_schedule(steps, 8100))


def test_sigmas_bad_input(N):
    node = N["LensSigmas"]()
    with pytest.raises(ValueError, match=r"LensSigmas: width must be a positive multiple of 16 pixels, got 1000.*Fix"):
        node.get_sigmas(1000, 1024, 20, 1.0, "lens")
    with pytest.raises(ValueError, match="LensSigmas: expected a Lens / FLUX.2 latent"):
        node.get_sigmas(1024, 1024, 20, 1.0, "lens", latent={"samples": torch.ones(1, 16, 8, 8)})
    with pytest.raises(ValueError, match="LensSigmas: expected a LATENT"):
        node.get_sigmas(1024, 1024, 20, 1.0, "lens", latent=[1, 2])
    with pytest.raises(ValueError, match=r"denoise must be in \(0, 1\]"):
        node.get_sigmas(1024, 1024, 20, float("nan"), "lens")
    with pytest.raises(ValueError, match="unknown|variant"):
        node.get_sigmas(1024, 1024, 0, 1.0, "sdxl")


def test_noise_is_the_pipeline_noise(N):
    (noise,) = N["LensNoise"]().get_noise(1234)
    lat = {"samples": torch.zeros(2, 128, 4, 6)}
    n = noise.generate_noise(lat)
    assert n.shape == (2, 128, 4, 6) and n.dtype == torch.float32 and noise.seed == 1234
    assert torch.equal(pack_latents(n), S.make_noise(1234, 2, 4, 6))
    # a LatentFromBatch slice gets the noise of its index in the full batch, as in LensSampler
    one = noise.generate_noise({"samples": torch.zeros(1, 128, 4, 6), "batch_index": [1]})
    assert torch.equal(one, n[1:])


def test_sampler_refuses_a_non_lens_model(N):
    class NotLens:
        model = torch.nn.Linear(2, 2)

        def clone(self):
            return self

    lat = N["LensEmptyLatent"]().generate("custom", 1024, 96, 64, 1)[0]
    cond = [[torch.zeros(1, 3, 256), {"attention_mask": torch.ones(1, 3, dtype=torch.long)}]]
    with pytest.raises(ValueError, match=r"LensSampler: .*(no native Lens model|expected Lens).*Fix"):
        N["LensSampler"]().sample(NotLens(), cond, cond, lat, 0, 4, 1.0, 1.0)
