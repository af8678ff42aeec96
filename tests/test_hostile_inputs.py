"""Hostile and careless inputs, round 2 (issue 25): masks in the alpha channel, IMAGE / ``image=`` tensors out
of range, ``negative_prompt=None``, enhancer text that is None / not UTF-8 / far too long, ``--out`` naming an
existing file. Each case ends as an error naming the input and the fix, or as the documented behaviour."""
from __future__ import annotations

import os
import stat
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lens_core import enhance as E
from lens_core.images import mask_values
from lens_core.pipeline import check_request, load_mask
from test_cli import gen_args, no_weights, run_cli_error  # noqa: F401  (fixture re-exported)


def rgba_mask(tmp_path, name="mask.png", mode="RGBA"):
    """A 32×48 mask painted the ComfyUI way: a photo-like RGB with the area to repaint made transparent
    (alpha 0 in the left half, 255 elsewhere, a soft column of 128); its colours are bright where kept."""
    rgb = np.full((32, 48, 3), 230, np.uint8)
    rgb[:, :24] = 20                                   # dark where it should be repainted: luminance disagrees
    alpha = np.full((32, 48), 255, np.uint8)
    alpha[:, :24] = 0
    alpha[:, 24] = 128
    img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode == "LA":
        img = img.convert("LA")
    elif mode == "PA":                                 # (PNG cannot store PA: handed over as a PIL image)
        return img.convert("PA"), 1.0 - alpha.astype(np.float32) / 255.0
    path = tmp_path / name
    img.save(path)
    return str(path), 1.0 - alpha.astype(np.float32) / 255.0


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_mask_with_transparency_is_one_minus_alpha_like_comfyui(tmp_path, mode):
    """ComfyUI's LoadImage gives MASK = 1 − alpha (transparent = repaint); before, the luminance was used, so
    nothing was repainted here (the transparent half is dark)."""
    path, want = rgba_mask(tmp_path, mode=mode)
    with pytest.warns(UserWarning, match="transparency.*alpha channel is the mask, as in ComfyUI's LoadImage"):
        got = load_mask(path)
    assert got.dtype == torch.float32 and got.shape == (32, 48)
    assert torch.equal(got, torch.from_numpy(want))
    img = Image.new("RGB", (48, 32))
    with pytest.warns(UserWarning):
        req = check_request("x", image=img, mask=path, height=32, width=48)
    assert torch.equal(req["mask"], torch.from_numpy(want))


def test_palette_mask_with_transparent_colour(tmp_path):
    p = Image.new("P", (16, 16), 1)
    p.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    px = p.load()
    for x in range(8):
        for y in range(16):
            px[x, y] = 0
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    with pytest.warns(UserWarning, match="transparency"):
        m = load_mask(tmp_path / "p.png")
    assert torch.equal(m[:, :8], torch.ones(16, 8)) and torch.equal(m[:, 8:], torch.zeros(16, 8))


def test_opaque_alpha_keeps_brightness_and_exif_is_applied(tmp_path):
    """A fully opaque alpha carries nothing: the mask is the brightness (white = repaint), no warning; an EXIF
    orientation is applied to the mask as it is to the image."""
    arr = np.zeros((16, 24, 4), np.uint8)
    arr[:, :6, :3] = 255
    arr[..., 3] = 255
    Image.fromarray(arr, "RGBA").save(tmp_path / "opaque.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = load_mask(tmp_path / "opaque.png")
    assert torch.equal(m[:, :6], torch.ones(16, 6)) and float(m[:, 6:].max()) == 0.0
    g = Image.fromarray((arr[..., 0]), "L")
    exif = g.getexif()
    exif[0x0112] = 6                                   # rotate 90° clockwise to display
    g.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    m = torch.from_numpy(mask_values(Image.open(tmp_path / "rot.jpg")))
    assert m.shape == (24, 16)                         # displayed orientation, like the image's


def test_image_tensor_out_of_range(tmp_path):
    img = torch.rand(1, 3, 32, 32) * 255
    with pytest.raises(ValueError, match=r"image \(a tensor init image\): expected values in \[-1, 1\], found "
                                         r"\[.*\] \(it looks like 0 … 255 pixel values\); fix: scale it"):
        check_request("x", image=img, height=32, width=32)
    with pytest.raises(ValueError, match=r"expected values in \[-1, 1\], found \[-3"):
        check_request("x", image=torch.full((1, 3, 32, 32), -3.0), height=32, width=32)
    # rounding slack (≤ 1e-3) is clamped, not refused
    req = check_request("x", image=torch.full((1, 3, 32, 32), 1.0005), height=32, width=32)
    assert float(req["image"].max()) == 1.0


def test_comfy_image_out_of_range_in_vae_encode():
    from test_nodes import import_pack, run

    pack = import_pack()
    with pytest.raises(ValueError, match=r"LensVAEEncode: pixels \(an IMAGE\): expected values in \[0, 1\], found "
                                         r"\[0, 255\] \(it looks like 0 … 255 pixel values\); fix: ComfyUI IMAGEs"):
        run(pack, "LensVAEEncode", vae=None, pixels=torch.linspace(0, 255, 32 * 32 * 3).reshape(1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"found \[-0\.5"):
        run(pack, "LensVAEEncode", vae=None, pixels=torch.full((1, 32, 32, 3), -0.5))


def test_negative_prompt_none_is_the_empty_negative():
    a = check_request("a cube", None, height=32, width=32)
    b = check_request("a cube", "", height=32, width=32)
    assert a["negatives"] == b["negatives"] == [""]
    with pytest.raises(ValueError, match=r"negative_prompt\[0\]: expected a string, found int"):
        check_request("a cube", [3], height=32, width=32)


# ---------------------------------------------------------------------------------------------------------
# the prompt enhancer


@pytest.fixture(scope="module")
def tok(pipeline_dir):
    from lens_core import checkpoints as ck
    return ck.load_tokenizer(pipeline_dir)


def test_enhancer_text_that_is_not_a_string_or_not_utf8(tok):
    for bad, match in ((None, "prompt: expected a string, found NoneType"),
                       ("a cat \ud800 on a mat", r"prompt: expected valid UTF-8 text, found the undecodable "
                                                 r"character '\\ud800' at position 6.*fix:")):
        with pytest.raises(ValueError, match=match):
            E.enhance(None, tok, bad)
        with pytest.raises(ValueError, match=match):
            E.enhance_ids(tok, bad, 10, 131072)


def test_enhancer_node_text_none_and_surrogates():
    from test_nodes import import_pack, run

    pack = import_pack()
    for bad, match in ((None, "LensPromptEnhance: text: expected a string, found NoneType"),
                       ("x\udcff", "LensPromptEnhance: text: expected valid UTF-8 text")):
        with pytest.raises(ValueError, match=match):
            run(pack, "LensPromptEnhance", text_encoder=None, text=bad, seed=0)


def test_enhancer_prompt_cut_to_its_token_budget(tok):
    """A 100 000-character prompt (before: prefilled whole, no answer in 300 s) is cut to MAX_PROMPT_TOKENS
    with a warning, quickly; the budget can be changed per call."""
    head, tail = (len(x) for x in tok.encode(list(E.render_parts())))
    text = "a red cube on a wooden table, " * 3400
    assert len(text) > 100_000
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match=r"the prompt is 102000 characters \(more than \d+ tokens\); truncated to "
                                         r"1024 tokens, the enhancer's prompt budget \(max_prompt_tokens=1024"):
        ids = E.enhance_ids(tok, text, 4096, 131072)
    assert time.perf_counter() - t0 < 10
    assert ids.shape == (1, head + E.MAX_PROMPT_TOKENS + tail)
    short = "word " * 300                              # 301 tokens (the trailing space is one)
    with pytest.warns(UserWarning, match=r"the prompt is 301 tokens; truncated to 100 tokens, the enhancer's prompt "
                                         r"budget \(max_prompt_tokens=100"):
        ids = E.enhance_ids(tok, short, 10, 131072, max_prompt_tokens=100)
    assert ids.shape[1] == head + 100 + tail
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert E.enhance_ids(tok, short, 10, 131072).shape[1] == head + 301 + tail
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        E.enhance_ids(tok, short, 10, 131072, max_prompt_tokens=0)


# ---------------------------------------------------------------------------------------------------------
# --out never replaces an existing file unless --overwrite


def test_out_never_replaces_an_existing_file(pipeline_dir, tmp_path, capsys, no_weights):
    precious = tmp_path / "precious.png"
    precious.write_text("my notes, not an image")
    line = run_cli_error(["generate", "--model", str(pipeline_dir), "--prompt", "x", "--out", str(precious)], capsys)
    assert f"--out {precious}: the file exists (22 bytes); it is never replaced silently; fix: --overwrite" in line
    assert precious.read_text() == "my notes, not an image" and no_weights == []
    # several images: any existing one stops the run before loading
    (tmp_path / "o_1.png").write_bytes(b"x")
    line = run_cli_error(["generate", "--model", str(pipeline_dir), "--prompt", "x", "--num-images", "3",
                          "--out", str(tmp_path / "o.png")], capsys)
    assert "o_1.png: the file exists" in line
    # read-only: refused too (also with --overwrite: not writable)
    ro = tmp_path / "ro.png"
    ro.write_bytes(b"keep")
    ro.chmod(stat.S_IRUSR)
    if not os.access(ro, os.W_OK):                    # (root can write anyway)
        line = run_cli_error(["generate", "--model", str(pipeline_dir), "--prompt", "x", "--out", str(ro),
                              "--overwrite"], capsys)
        assert "not writable" in line
    assert ro.read_bytes() == b"keep"


def test_overwrite_replaces(pipeline_dir, tmp_path, capsys):
    from lens_core.__main__ import main

    out = tmp_path / "o.png"
    out.write_text("old")
    args = ["generate", "--model", str(pipeline_dir), "--prompt", "x", "--height", "32", "--width", "32",
            "--steps", "1", "--device", "cpu", "--dtype", "fp32", "--out", str(out)]
    assert main(args) == 2 and out.read_text() == "old"
    assert main(args + ["--overwrite"]) == 0
    assert Image.open(out).size == (32, 32)
