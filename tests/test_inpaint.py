"""Inpainting by masked denoising (lens_core.sampling.sample(mask=...), LensPipeline(mask=...), the CLI's --mask
and LensSampler with a LATENT noise_mask), on the golden tiny DiT in fp32."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lens_core import sampling as S
from lens_core.pipeline import load_mask
from test_sampling import pipe_dit  # noqa: F401  (the golden pipeline's tiny DiT, a module fixture)

GRID = (4, 6)


@pytest.fixture(scope="module")
def inputs(pipe_dit):
    model, cfg = pipe_dit, pipe_dit.config
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, 5, cfg.enc_hidden_dim, generator=g) for _ in range(cfg.num_text_layers)]
    text_mask = torch.ones(2, 5, dtype=torch.bool)
    init = torch.randn(2, GRID[0] * GRID[1], 128, generator=g)
    noise = S.make_noise(11, 2, *GRID)
    return model.eval(), feats, text_mask, init, noise


def _half_mask():
    """Pixel-space mask [1, 64, 96]: the right half (columns 48..95) is regenerated."""
    m = torch.zeros(1, 64, 96)
    m[..., 48:] = 1.0
    return m


def run(inputs, mask=None, denoise=1.0, cfg=5.0, steps=3):
    model, feats, text_mask, init, noise = inputs
    return S.sample(model, noise, feats, text_mask, grid=GRID, steps=steps, cfg=cfg, denoise=denoise,
                    init_latents=init, mask=mask, dtype=torch.float32)


def test_prepare_mask_resizes_like_comfyui_and_broadcasts():
    packed = S.prepare_mask(_half_mask(), 3, *GRID)
    assert packed.shape == (3, 24, 1) and packed.dtype == torch.float32
    grid = packed.reshape(3, 4, 6)
    # bilinear (align_corners=False) samples the 16-px cell centres: columns 0-2 keep, 3-5 regenerate
    assert torch.equal(grid, torch.tensor([0., 0, 0, 1, 1, 1]).expand(3, 4, 6))
    # a soft edge is interpolated: a pixel ramp gives the mean of the 2 pixels around each cell centre
    ramp = torch.linspace(0, 1, 96).expand(64, 96)
    cols = S.prepare_mask(ramp, 1, *GRID).reshape(4, 6)[0]
    centres = torch.arange(6) * 16 + 7.5
    assert torch.allclose(cols, centres / 95, atol=1e-6)
    # batches repeat / cut to the latent batch as ComfyUI's repeat_to_batch_size does
    two = torch.stack([torch.zeros(4, 6), torch.ones(4, 6)])
    out = S.prepare_mask(two, 3, *GRID).reshape(3, 24)
    assert out[:, 0].tolist() == [0.0, 1.0, 0.0]
    assert S.prepare_mask(two[:, None], 1, *GRID).reshape(24).tolist() == [0.0] * 24


@pytest.mark.parametrize("bad, words", [
    (torch.full((4, 6), float("nan")), "finite and within [0, 1]"),
    (torch.full((4, 6), 255.0), "divide 8-bit values by 255"),
    (torch.zeros(1, 3, 4, 6), "one channel"),
    (np.zeros((4, 6)), "expected a tensor"),
])
def test_prepare_mask_refuses_bad_masks(bad, words):
    with pytest.raises(ValueError, match="mask") as info:
        S.prepare_mask(bad, 1, *GRID)
    assert words in str(info.value)


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_outside_the_mask_ends_equal_to_the_input_latent(inputs, denoise):
    init = inputs[3]
    mask = S.prepare_mask(_half_mask(), 2, *GRID)
    out = run(inputs, mask=mask, denoise=denoise)
    keep = mask[..., 0] == 0
    assert torch.equal(out[keep], init[keep])                      # bit for bit where the mask is 0
    inside = out[~keep] - init[~keep]
    assert (inside.norm() / init[~keep].norm()).item() > 0.3        # regenerated where the mask is 1
    assert torch.isfinite(out).all()


def test_model_sees_the_input_at_each_noise_level_outside_the_mask(inputs):
    """Before every step the kept tokens equal (1 − σ)·init + σ·noise at that step's σ (ComfyUI's rule)."""
    model, feats, text_mask, init, noise = inputs
    seen = []

    def spy(hidden, *args, **kwargs):
        seen.append(hidden[:2].clone())
        return model(hidden, *args, **kwargs)

    mask = S.prepare_mask(_half_mask(), 2, *GRID)
    S.sample(spy, noise, feats, text_mask, grid=GRID, steps=4, cfg=5.0, init_latents=init, mask=mask,
             dtype=torch.float32)
    sig = S.sigma_schedule(4, 24)
    keep = mask[..., 0] == 0
    for i, hidden in enumerate(seen):
        expected = ((1 - sig[i]) * init + sig[i] * noise)[keep]
        assert torch.allclose(hidden[keep], expected, atol=1e-6, rtol=0), i


def test_mask_of_ones_equals_plain_img2img(inputs):
    ones = torch.ones(2, 24, 1)
    assert torch.equal(run(inputs, mask=ones, denoise=0.6), run(inputs, denoise=0.6))
    # and a mask of zeros returns the input latent unchanged
    assert torch.equal(run(inputs, mask=torch.zeros(2, 24, 1), denoise=0.6), inputs[3])


def test_mask_needs_init_latents(inputs):
    model, feats, text_mask, _init, noise = inputs
    with pytest.raises(ValueError, match="a mask needs the input latents"):
        S.sample(model, noise, feats, text_mask, grid=GRID, steps=2, cfg=1.0, mask=torch.ones(2, 24, 1))
    with pytest.raises(ValueError, match=r"mask: expected the packed mask \[2, 24, 1\]"):
        run(inputs, mask=torch.ones(24, 1))


def test_load_mask_modes(tmp_path):
    """8-bit, 16-bit grayscale, palette and RGB masks load as [0, 1] (16-bit does not saturate to white)."""
    arr16 = np.zeros((8, 8), dtype=np.uint16)
    arr16[:, 4:] = 65535
    arr16[0, 0] = 32768
    p16 = tmp_path / "m16.png"
    Image.fromarray(arr16).save(p16)
    m = load_mask(p16)
    assert m.shape == (8, 8) and m[:, 4:].eq(1).all() and m[1:, :4].eq(0).all()
    assert abs(m[0, 0].item() - 32768 / 65535) < 1e-6
    rgb = Image.new("RGB", (8, 8), (255, 255, 255))
    assert load_mask(rgb).eq(1).all()
    assert load_mask(Image.new("L", (8, 8), 0)).eq(0).all()
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not_an_image.png.*expected an image file"):
        load_mask(bad)


def test_pipeline_inpaint(pipeline_dir):
    """LensPipeline(image=..., mask=...): the kept half of the final latent equals the encoded image's."""
    from lens_core.config import pack_latents
    from lens_core.pipeline import LensPipeline

    pipe = LensPipeline.from_pretrained(pipeline_dir, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(64, 96, 3, generator=g) * 255).to(torch.uint8).numpy())
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (48, 0, 96, 64))
    out = pipe("a red cube", image=img, mask=mask, steps=2, cfg=1.0, height=64, width=96, seed=4)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        z = pack_latents(pipe.vae.encode(x))
    keep = torch.tensor([0, 0, 0, 1, 1, 1]).repeat(4) == 0
    assert torch.equal(out.latents[0, keep], z[0, keep])
    assert not torch.allclose(out.latents[0, ~keep], z[0, ~keep], atol=0.1)
    assert out.parameters["inpaint"] is True
    with pytest.raises(ValueError, match="mask: inpainting needs the image"):
        pipe("a red cube", mask=mask, steps=1, height=64, width=96)


def test_cli_mask_checked_before_loading(tmp_path, capsys):
    from lens_core.__main__ import main

    missing_model = str(tmp_path / "no_model_loaded_here")
    rc = main(["generate", "--model", missing_model, "--prompt", "x", "--mask", str(tmp_path / "m.png"),
               "--out", str(tmp_path / "o.png")])
    assert rc == 2 and "--mask: inpainting needs the image to keep outside the mask; fix: pass --image" in \
        capsys.readouterr().err
