"""Hostile and careless input to the CLI, the Python API and the size inputs of the nodes (issue 12, kinds 4-7).

Unbounded requests (sizes, batch counts, step counts, init-image sizes) run in a child process under a 2 GiB
address-space limit and a time limit: each must end in its exact one-line error, before anything of that size
is allocated (without the checks they die of MemoryError / run for hours). The argument errors of the CLI run
with the loaders instrumented (``no_weights`` from test_cli): no weight file is opened before they are reported.
"""
from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lens_core import config as cf
from lens_core.__main__ import main
from test_cli import gen_args, no_weights, run_cli_error  # noqa: F401  (fixture re-exported)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORY_LIMIT = 2 << 30          # importing torch + lens_core needs ≈ 0.65 GB of address space
TIME_LIMIT = 120


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_limited(args: list, **kw) -> subprocess.CompletedProcess:
    """A child Python process under the address-space and time limits."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, timeout=TIME_LIMIT,
                          preexec_fn=_limit, env=env, **kw)


def png_header_only(path, width, height):
    """A PNG that declares width × height (8-bit RGB) but holds a tiny compressed stream: opening it reads the
    header only, decoding it would need width·height·3 bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------------------------------------
# kind 4: no ceiling → refused before allocating (API, CLI, nodes)

API_CASES = {
    "size": dict(height=2 ** 17, width=2 ** 17),
    "num_images": dict(num_images=10 ** 9),
    "prompts": dict(prompt=["p"] * 100),
    "steps": dict(steps=10 ** 9),
    "batch_index": dict(batch_index=10 ** 12),
    "aspect": dict(height=2048, width=256),
    "seed": dict(seed=-1),
}


def test_api_unbounded_requests_refused_under_memory_limit(tmp_path):
    """LensPipeline.__call__ and sampling.sample with hostile sizes/counts, under RLIMIT_AS 2 GiB."""
    bomb = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    big = png_header_only(tmp_path / "big.png", 9000, 9000)
    code = f"""
import json, torch
from torch import nn
from lens_core.pipeline import LensPipeline
from lens_core.sampling import sample
pipe = LensPipeline(nn.Identity(), nn.Identity(), None, nn.Identity(), dtype=torch.float32, device="cpu")
cases = {API_CASES!r}
cases["bomb"] = dict(image={str(bomb)!r})
cases["big_image"] = dict(image={str(big)!r})
out = {{}}
for name, kw in cases.items():
    kw = dict(dict(prompt="a cube"), **kw)
    try:
        pipe(kw.pop("prompt"), **kw)
        out[name] = "no error"
    except ValueError as exc:
        out[name] = str(exc)
try:
    sample(lambda *a, **k: a[0], torch.zeros(1, 4, 128), torch.zeros(1, 2, 8), torch.ones(1, 2, dtype=torch.bool),
           grid=(2, 2), steps=10 ** 9, cfg=1.0)
except ValueError as exc:
    out["sample_steps"] = str(exc)
print(json.dumps(out))
"""
    r = run_limited(["-c", code], text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["size"] == ("size (width×height) 131072×131072 = 17179.87 MP: expected at most 4.19 MP (2048×2048; "
                           "the official Lens sizes are the 1024/1440 buckets); fix: generate at a bucket size "
                           "(aspect + base 1024/1440) and upscale afterwards")
    assert got["num_images"] == ("num_images: expected an integer in [1, 64], found 1000000000; fix: generate at "
                                 "most 64 images per request (repeat the request for more)")
    assert got["prompts"] == ("prompts × num_images: expected an integer in [1, 64], found 100; fix: at most 64 "
                              "images per call")
    assert got["steps"] == ("steps: expected an integer in [1, 1000], found 1000000000; fix: Lens uses 20, Turbo 4, "
                            "Base 50 steps")
    assert got["sample_steps"] == got["steps"]
    assert got["batch_index"].startswith("batch_index: expected an integer in [0, 63], found 1000000000000")
    assert got["aspect"].startswith("size (width×height) 256×2048: expected an aspect ratio W:H between 1:2 and 2:1")
    assert got["seed"] == "seed: expected an integer in [0, 18446744073709551615], found -1; fix: use a seed in " \
                          "0 … 2^64 − 1"
    assert got["bomb"].startswith(f"image {bomb}: Image size (10000000000 pixels) exceeds limit")
    assert got["big_image"] == (f"image {big} 9000×9000 = 81.00 MP: expected at most 67.11 MP (8192×8192; the "
                                f"official Lens sizes are the 1024/1440 buckets); fix: generate at a bucket size "
                                f"(aspect + base 1024/1440) and upscale afterwards")


def test_cli_unbounded_requests_refused_under_memory_limit(pipeline_dir, tmp_path):
    """The same through the CLI's main() (one child process for all cases): exit 2, the exact line, no traceback."""
    bomb = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    base = ["generate", "--model", str(pipeline_dir), "--prompt", "a cube", "--out", str(tmp_path / "o.png")]
    cases = [
        (["--height", "131072", "--width", "131072"], "error: size (--width×--height) 131072×131072 = 17179.87 MP: "
                                                      "expected at most 4.19 MP"),
        (["--num-images", "1000000000"], "error: --num-images: expected an integer in [1, 64], found 1000000000"),
        (["--steps", "1000000000"], "error: --steps: expected an integer in [1, 1000], found 1000000000"),
        (["--batch-index", "1000000000000"], "error: --batch-index: expected an integer in [0, 63], found "
                                             "1000000000000"),
        (["--image", str(bomb)], f"error: --image {bomb}: Image size (10000000000 pixels) exceeds limit"),
    ]
    code = f"""
import contextlib, io, json
from lens_core.__main__ import main
res = []
for extra in {[c[0] for c in cases]!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main({base!r} + extra)
    res.append([rc, err.getvalue()])
print(json.dumps(res))
"""
    r = run_limited(["-c", code], text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    for (extra, expected), (rc, err) in zip(cases, json.loads(r.stdout.strip().splitlines()[-1])):
        assert rc == 2, (extra, err)
        assert err.startswith(expected) and err.count("\n") == 1 and "Traceback" not in err, (extra, err)


def test_node_size_inputs_use_the_core_limits():
    """LensEmptyLatent (custom size, batch), LensSampler (steps, latent size) and LensVAEEncode (image size)
    refuse what lens_core.config refuses, before allocating (the image is a zero-stride view: no memory)."""
    from test_nodes import import_pack

    nodes = import_pack().NODE_CLASS_MAPPINGS
    empty = nodes["LensEmptyLatent"]()
    with pytest.raises(ValueError, match=r"^LensEmptyLatent custom size 8192×8192 = 67.11 MP: expected at most "
                                         r"4.19 MP"):
        empty.generate("custom", 1024, 8192, 8192, 1)
    with pytest.raises(ValueError, match=r"^LensEmptyLatent custom size 256×2048: expected an aspect ratio"):
        empty.generate("custom", 1024, 256, 2048, 1)
    with pytest.raises(ValueError, match=r"^LensEmptyLatent batch_size: expected an integer in \[1, 64\], found "
                                         r"1000000"):
        empty.generate("1:1", 1024, 0, 0, 10 ** 6)
    assert empty.generate("custom", 1024, 2048, 2048, 1)[0]["samples"].shape == (1, 128, 128, 128)
    bridge = sys.modules[nodes["LensSampler"].__module__].bridge
    model = bridge.LensModel(patcher=None, config=None, variant="lens", dtype=torch.float32, path="")
    latent = {"samples": torch.zeros(1, 128, 4, 6)}
    with pytest.raises(ValueError, match=r"^LensSampler steps: expected an integer in \[1, 1000\], found 100000"):
        nodes["LensSampler"]().sample(model, None, None, latent, 0, 10 ** 5, 1.0, 1.0)
    native = {"samples": torch.zeros(1, 4, 1024, 1024)}     # a native 8192² EmptyLatentImage
    with pytest.raises(ValueError, match=r"^LensSampler latent 8192×8192 = 67.11 MP"):
        nodes["LensSampler"]().sample(model, None, None, native, 0, 4, 1.0, 1.0)
    image = torch.zeros(1, 1, 1, 3).expand(1, 4096, 4096, 3)
    with pytest.raises(ValueError, match=r"^LensVAEEncode image 4096×4096 = 16.78 MP: expected at most 4.19 MP"):
        nodes["LensVAEEncode"]().encode(None, image, "auto")


# ---------------------------------------------------------------------------------------------------------
# kind 5: NaN/inf, careless combinations, image modes


def test_nan_and_inf_are_errors_in_sampling_and_pipeline():
    from torch import nn

    from lens_core.pipeline import LensPipeline
    from lens_core.sampling import sample

    noise, feats, mask = torch.zeros(1, 4, 128), torch.zeros(1, 2, 8), torch.ones(1, 2, dtype=torch.bool)
    model = lambda x, *a, **k: x  # noqa: E731

    def run(**kw):
        args = dict(noise=noise, pos_features=feats, pos_mask=mask)
        args.update(kw)
        opts = dict(grid=(2, 2), steps=2, cfg=kw.pop("cfg", 3.0))
        return sample(model, args["noise"], args["pos_features"], args["pos_mask"],
                      neg_features=args.get("neg_features"), neg_mask=args.get("neg_mask"), **opts,
                      denoise=args.get("denoise", 1.0), init_latents=args.get("init_latents"))

    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=rf"^cfg: expected a finite number, found {value!r}"):
            run(cfg=value)
    bad = noise.clone()
    bad[0, 1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"^noise: expected finite values, found 1 NaN/inf of 512"):
        run(noise=bad)
    inf_feats = feats.clone()
    inf_feats[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^positive features: expected finite values, found 1 NaN/inf"):
        run(pos_features=inf_feats)
    with pytest.raises(ValueError, match=r"^negative features: expected finite values"):
        run(neg_features=[inf_feats], neg_mask=mask, pos_features=[feats])
    with pytest.raises(ValueError, match=r"^init_latents: expected finite values"):
        run(denoise=0.5, init_latents=bad)
    with pytest.raises(ValueError, match=r"^denoise must be in \(0, 1\], got nan"):
        run(denoise=float("nan"), init_latents=noise)
    assert torch.isfinite(run()).all()

    pipe = LensPipeline(nn.Identity(), nn.Identity(), None, nn.Identity(), dtype=torch.float32, device="cpu")
    lat = torch.zeros(1, 6, 128)
    lat[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^latents: expected finite values, found 1 NaN/inf"):
        pipe("a cube", height=32, width=48, latents=lat)
    with pytest.raises(ValueError, match=r"^cfg: expected a finite number in \[0.0, 100.0\], found inf"):
        pipe("a cube", height=32, width=48, cfg=float("inf"))
    img = torch.zeros(1, 3, 32, 48)
    img[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^image: expected finite values"):
        pipe("a cube", height=32, width=48, image=img, denoise=0.5)
    with pytest.raises(ValueError, match=r"^denoise: expected a finite number in \[0.0, 1.0\], found nan"):
        pipe("a cube", height=32, width=48, image=torch.zeros(1, 3, 32, 48), denoise=float("nan"))
    # a height without a width is an error, not a silent 1024×1024
    with pytest.raises(ValueError, match=r"^height 512 without width: expected both \(or aspect\)"):
        pipe("a cube", height=512)
    with pytest.raises(ValueError, match=r"^width 512 without height"):
        pipe("a cube", width=512)


def _expected_rgb(mode, img):
    """The RGB an image should become, computed directly from its pixel values (independent of to_rgb)."""
    a = np.asarray(img).astype(np.float64)
    if mode in ("I;16", "I"):
        g = np.round(a * 255 / 65535)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "F":
        g = np.round(np.clip(a, 0, 1) * 255)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "LA":
        g, alpha = a[..., 0], a[..., 1] / 255
        v = g * alpha + 255 * (1 - alpha)
        return np.repeat(v[..., None], 3, axis=2)
    if mode == "RGBA":
        alpha = a[..., 3:] / 255
        return a[..., :3] * alpha + 255 * (1 - alpha)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "LA", "RGBA"])
def test_image_modes_keep_their_brightness(mode, tmp_path):
    """16-bit grayscale (the PNG that used to turn white), 32-bit int, float, and transparency over white."""
    from lens_core.images import open_image, to_rgb

    ramp = np.linspace(0, 1, 48 * 32).reshape(32, 48)
    if mode == "I;16":
        img = Image.fromarray((ramp * 65535).astype(np.uint16))
        assert img.mode == "I;16"
        img.save(tmp_path / "x.png")
        img = open_image(tmp_path / "x.png")
        assert img.mode == "I;16"               # as PIL opens a 16-bit grayscale PNG
    elif mode == "I":
        img = Image.fromarray((ramp * 65535).astype(np.int32), "I")
    elif mode == "F":
        img = Image.fromarray(ramp.astype(np.float32), "F")
    elif mode == "LA":
        img = Image.fromarray(np.stack([(ramp * 255), (1 - ramp) * 255], -1).astype(np.uint8), "LA")
    else:
        rgba = np.stack([ramp * 255, (1 - ramp) * 255, np.full_like(ramp, 40), ramp[::-1] * 255], -1)
        img = Image.fromarray(rgba.astype(np.uint8), "RGBA")
    got = np.asarray(to_rgb(img)).astype(np.int64)
    want = _expected_rgb(mode, img if mode != "I;16" else img.convert("I"))
    assert got.shape == (32, 48, 3)
    assert np.abs(got - want).max() <= 1, (mode, np.abs(got - want).max())
    if mode in ("I;16", "I", "F"):
        assert 120 < got.mean() < 135           # the ramp's mid-gray on average: neither white nor black


@pytest.mark.parametrize("mode", ["1", "L", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "La", "RGBa"])
def test_every_pil_mode_converts(mode):
    from lens_core.images import to_rgb

    rgb = Image.fromarray(np.tile(np.array([200, 100, 50], np.uint8), (8, 8, 1)), "RGB")
    img = {"La": Image.new("La", (8, 8), (124, 255)), "RGBa": Image.new("RGBa", (8, 8), (200, 100, 50, 255)),
           "PA": rgb.convert("RGBA").convert("PA")}.get(mode) or rgb.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 8)
    px = np.asarray(out)[0, 0].astype(int)
    if mode == "1":
        assert px.tolist() == [0, 0, 0]         # luma 124 < 128
    elif mode in ("L", "La"):
        assert np.abs(px - 124).max() <= 1
    else:
        assert np.abs(px - [200, 100, 50]).max() <= 6, (mode, px)


def test_sixteen_bit_png_through_the_request(tmp_path):
    """check_request reads a 16-bit grayscale PNG as the 8-bit gray it shows."""
    from lens_core.pipeline import check_request

    g = np.full((32, 48), 32896, np.uint16)      # 32896 / 257 = 128
    Image.fromarray(g).save(tmp_path / "g16.png")
    req = check_request("a cube", image=str(tmp_path / "g16.png"))
    assert req["image"].mode == "RGB" and set(np.asarray(req["image"]).ravel().tolist()) == {128}
    assert (req["height"], req["width"], req["denoise"]) == (32, 48, 0.6)


def test_image_without_denoise_defaults_to_img2img(pipeline_dir, golden_dir, tmp_path, capsys):
    """--image without --denoise runs img2img at 0.6 and says so (documented in README)."""
    init = golden_dir / "pipeline_tiny" / "cases" / "a_cfg1_4steps.fp32.img0.png"
    out = tmp_path / "i2i.png"
    assert main(["generate", "--model", str(pipeline_dir), "--prompt", "a cube", "--image", str(init),
                 "--steps", "2", "--cfg", "1", "--dtype", "fp32", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: --image without --denoise: img2img at --denoise 0.6" in err
    meta = json.loads(Image.open(out).text["lens"])
    assert meta["denoise"] == 0.6 and meta["init_image"] == str(init)
    assert (meta["height"], meta["width"]) == Image.open(init).size[::-1]
    assert "--denoise 0.6" in meta["command"]


# ---------------------------------------------------------------------------------------------------------
# kind 6: undecodable prompts, non-images, zero counts → one line naming the argument (CLI)


def test_prompt_and_image_garbage(pipeline_dir, tmp_path, capsys, no_weights):
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"a c\xffube\n")
    line = run_cli_error(["generate", "--model", str(pipeline_dir), "--prompt-file", str(bad), "--out",
                          str(tmp_path / "o.png")], capsys)
    assert line == (f"error: --prompt-file {bad}: expected UTF-8 text, found the byte 0xff at offset 3 that is not "
                    f"UTF-8; fix: save the file as UTF-8")
    line = run_cli_error(["generate", "--model", str(pipeline_dir), "--prompt", "a \udcff cube", "--out",
                          str(tmp_path / "o.png")], capsys)
    assert line == ("error: --prompt: expected valid UTF-8 text, found the undecodable character '\\udcff' at "
                    "position 2 (bytes in another encoding); fix: save or pass the text as UTF-8, or remove that "
                    "character")
    line = run_cli_error(gen_args(pipeline_dir, tmp_path, "--negative", "\ud800"), capsys)
    assert line.startswith("error: --negative: expected valid UTF-8 text")
    notimg = tmp_path / "notes.png"
    notimg.write_bytes(b"these are notes, not pixels")
    line = run_cli_error(gen_args(pipeline_dir, tmp_path, "--image", str(notimg)), capsys)
    assert line == (f"error: --image {notimg}: expected an image file (PNG, JPEG, WebP, TIFF, BMP …), found 27 "
                    f"bytes that are not an image (starting with b'these are notes,'); fix: pass an image file")
    full = tmp_path / "full.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:60])
    line = run_cli_error(gen_args(pipeline_dir, tmp_path, "--image", str(cut)), capsys)
    assert line.startswith(f"error: --image {cut}: the image data cannot be decoded (")
    for extra, expected in [
        (["--num-images", "0"], "error: --num-images: expected an integer in [1, 64], found 0; fix: generate at most"),
        (["--cfg", "nan"], "error: --cfg: expected a finite number in [0.0, 100.0], found nan"),
        (["--seed", "-1"], "error: --seed: expected an integer in [0, 18446744073709551615], found -1"),
        (["--denoise", "0"], "error: --denoise: expected a value in (0, 1], found 0.0"),
        (["--image", str(tmp_path)], f"error: --image {tmp_path}: expected an image file, found a folder"),
    ]:
        assert run_cli_error(gen_args(pipeline_dir, tmp_path, *extra), capsys).startswith(expected), extra
    assert no_weights == []


def test_surrogate_bytes_in_argv(tmp_path):
    """A prompt argument with bytes that are not UTF-8 (Python passes them as lone surrogates)."""
    r = subprocess.run([sys.executable.encode(), b"-m", b"lens_core", b"generate", b"--model", b"/nonexistent",
                        b"--prompt", b"caf\xe9", b"--out", str(tmp_path / "o.png").encode()], cwd=REPO,
                       capture_output=True, timeout=TIME_LIMIT)
    assert r.returncode == 2
    assert r.stderr.decode() == ("error: --prompt: expected valid UTF-8 text, found the undecodable character "
                                 "'\\udce9' at position 3 (bytes in another encoding); fix: save or pass the text as "
                                 "UTF-8, or remove that character\n")


# ---------------------------------------------------------------------------------------------------------
# kind 7: output paths checked before loading


def test_output_path_errors_before_loading(pipeline_dir, tmp_path, capsys, no_weights):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (tmp_path / "out.jpg", "expected a .png file name, found .jpg; fix: e.g. --out"),
        (tmp_path / "out", "expected a .png file name, found no extension; fix: e.g. --out"),
        (afile / "out.png", f"{afile} is a file, not a folder; fix: choose an output path in a folder"),
        (afile / "deeper" / "out.png", f"{afile} is a file, not a folder"),
        ("/sys/lens-out.png", "cannot write in /sys ("),
    ]
    for out, expected in cases:
        line = run_cli_error(["generate", "--model", str(pipeline_dir), "--prompt", "a cube", "--out", str(out)],
                             capsys)
        assert line.startswith(f"error: --out {out}: ") and expected in line, line
    folder = tmp_path / "adir.png"
    folder.mkdir()
    line = run_cli_error(["generate", "--model", str(pipeline_dir), "--prompt", "a", "--out", str(folder)], capsys)
    assert line.startswith(f"error: --out {folder}: is a folder")
    # several images: every name is checked (out_0.png … out_2.png), and a new folder is created for them
    ok = tmp_path / "new" / "sub" / "img.png"
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "a", "--num-images", "3", "--out",
                 str(ok)]) == 2
    assert (tmp_path / "new" / "sub").is_dir() and not list((tmp_path / "new" / "sub").iterdir())
    assert no_weights == []
