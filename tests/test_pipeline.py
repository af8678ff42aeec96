"""LensPipeline end to end on the golden tiny pipeline (official outputs in pipeline_tiny/cases)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import fixtures as fx
from lens_core.pipeline import LensPipeline

PROMPT = "a red cube on a wooden table"
CASES = {"a_cfg1_4steps": (4, 1.0), "b_cfg5_6steps_emptyneg": (6, 5.0)}


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def pipe32(pipeline_dir):
    return LensPipeline.from_pretrained(pipeline_dir, dtype=torch.float32, device="cpu")


def golden_case(golden_dir, case, dtype):
    return load_file(str(golden_dir / "pipeline_tiny" / "cases" / f"{case}.{dtype}.safetensors"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_pipeline_fp32(pipe32, golden_dir, case):
    """Whole pipeline from the folder with the golden noise: final latents rel ≤ 1e-4, uint8 ≥ 99.9 % equal."""
    steps, cfg = CASES[case]
    g = golden_case(golden_dir, case, "fp32")
    out = pipe32(PROMPT, height=64, width=96, steps=steps, cfg=cfg, latents=g["noise"])
    assert out.latents.dtype == torch.float32
    err = rel(out.latents, g["final_latents"])
    same = (out.uint8 == g["image_uint8"]).float().mean().item()
    print(f"\n{case} fp32: final latents rel {err:.3g}, uint8 equal {same:.5%}")
    assert err <= 1e-4
    assert same >= 0.999
    assert (out.uint8.int() - g["image_uint8"].int()).abs().max() <= 1
    assert out.images[0].size == (96, 64)


@pytest.fixture(scope="module")
def pipeline_bf16_runs(pipeline_dir, golden_dir):
    """bf16 runs of cases a and b in reference-exact mode (VAE exact path too) against the bf16 goldens, in a
    child process with the reference kernel environment (tests/exactness.py: AVX512-BF16 oneDNN GEMMs, MKL
    compatible mode, one thread). Run once for the two tests below."""
    from exactness import run_exact

    code = f"""
import json, torch
from safetensors.torch import load_file
from lens_core.pipeline import LensPipeline
pipe = LensPipeline.from_pretrained({str(pipeline_dir)!r}, dtype=torch.bfloat16, device="cpu")
pipe.vae.exact = True  # the VAE's reference-exact path (lens_core/vae.py LensVAE.exact)
res = {{}}
for case, (steps, cfg) in {CASES!r}.items():
    g = load_file({str(golden_dir / "pipeline_tiny" / "cases")!r} + "/" + case + ".bf16.safetensors")
    g32 = load_file({str(golden_dir / "pipeline_tiny" / "cases")!r} + "/" + case + ".fp32.safetensors")
    out = pipe({PROMPT!r}, height=64, width=96, steps=steps, cfg=cfg, latents=g["noise"])
    ref = g["final_latents"]
    d = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    res[case] = dict(dtype=str(out.latents.dtype), bit=bool(torch.equal(out.latents, ref)),
                     rel=d(out.latents, ref), gap=d(g32["final_latents"], ref),
                     uint8_equal=float((out.uint8 == g["image_uint8"]).float().mean()),
                     uint8_max=int((out.uint8.int() - g["image_uint8"].int()).abs().max()))
print(json.dumps(res))
"""
    res = run_exact(code, timeout=600)
    for case, r in res.items():
        print(f"\n{case} bf16: bit-identical final latents {r['bit']}, latents rel {r['rel']:.3g} (fp32-vs-bf16 "
              f"golden gap {r['gap']:.3g}), uint8 equal {r['uint8_equal']:.2%}, max |Δ| {r['uint8_max']}")
    return res


def test_golden_pipeline_bf16_bit_exact_in_reference_env(pipeline_bf16_runs):
    """The final latents and (VAE exact path) the uint8 images equal the bf16 goldens bit for bit — where the
    goldens' kernels exist."""
    from exactness import require_reference_kernels

    require_reference_kernels()
    for case, r in pipeline_bf16_runs.items():
        assert r["bit"], r
        assert r["uint8_equal"] == 1.0, r  # bf16 images bit-identical too (VAE exact path)


def test_golden_pipeline_bf16_within_bf16_tolerance(pipeline_bf16_runs):
    """On every CPU: the bf16 run tracks the bf16 golden at least 4× closer than the fp32 golden is to it, and the
    images differ by at most 16 levels (the golden bf16-vs-fp32 image gap: 16 (a), 52 (b))."""
    for case, r in pipeline_bf16_runs.items():
        assert r["dtype"] == "torch.bfloat16"
        assert r["rel"] <= 0.25 * r["gap"], r
        assert r["uint8_max"] <= 16, r


def test_component_dict_with_single_file_families(pipe32, pipeline_dir, golden_dir, tokenizer_json, tmp_path):
    """A pipeline assembled from the Comfy NVFP4 encoder (embedded tokenizer) and the BFL-named VAE file gives
    exactly the diffusers-folder pipeline's latents and pixels (both re-encodings are lossless)."""
    te = fx.write_comfy_te_nvfp4(tmp_path / "gpt_oss_20b_nvfp4.safetensors", golden_dir, tokenizer_json)
    vae = fx.write_vae(tmp_path / "flux2-vae.safetensors", golden_dir, scheme="bfl")
    pipe = LensPipeline.from_pretrained({"transformer": pipeline_dir / "transformer", "text_encoder": te,
                                         "vae": vae}, dtype=torch.float32, device="cpu",
                                        configs={"text_encoder": fx.te_config(golden_dir),
                                                 "vae": fx.vae_config(golden_dir)})
    assert pipe.paths["tokenizer"] == str(te)
    g = golden_case(golden_dir, "a_cfg1_4steps", "fp32")
    a = pipe(PROMPT, height=64, width=96, steps=4, cfg=1.0, latents=g["noise"])
    b = pipe32(PROMPT, height=64, width=96, steps=4, cfg=1.0, latents=g["noise"])
    assert torch.equal(a.latents, b.latents) and torch.equal(a.uint8, b.uint8)


def test_seed_batch_negative_and_variant_defaults(pipe32):
    """Seeded noise is reproducible; num_images repeats each prompt; a non-empty negative changes the result;
    steps/cfg default to the variant (the golden folder has no hint: Lens, 20 steps, cfg 5)."""
    seen = []
    out = pipe32(PROMPT, height=32, width=48, seed=7, num_images=2, steps=2,
                 callback=lambda step, total, lat, x0: seen.append((step, total)))
    assert out.latents.shape == (2, 6, 128) and len(out.images) == 2
    assert seen == [(0, 2), (1, 2)]
    again = pipe32(PROMPT, height=32, width=48, seed=7, num_images=2, steps=2)
    assert torch.equal(out.latents, again.latents)
    assert not torch.equal(out.latents[0], out.latents[1])  # one noise draw for the batch
    neg = pipe32(PROMPT, negative_prompt="blurry", height=32, width=48, seed=7, num_images=2, steps=2)
    assert not torch.equal(neg.latents, out.latents)
    assert pipe32.variant == "lens"
    p = out.parameters
    assert (p["steps"], p["cfg"], p["seed"], p["template_date"]) == (2, 5.0, 7, "2026-05-23")


def test_sizes_and_errors(pipe32):
    assert pipe32.resolve_size(aspect="16:9", base=1024) == (768, 1376)
    assert pipe32.resolve_size(aspect="1:1") == (1440, 1440)
    assert pipe32.resolve_size() == (1024, 1024)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe32(PROMPT, height=40, width=48, steps=1)
    with pytest.raises(ValueError, match="aspect"):
        pipe32.resolve_size(aspect="5:4")
    with pytest.raises(ValueError, match="negative_prompt"):
        pipe32([PROMPT, PROMPT], negative_prompt=["a", "b", "c"], height=32, width=32, steps=1)


def test_img2img_and_offload(pipeline_dir, golden_dir):
    """img2img from the golden case-a image with sequential offload on (CPU → CPU here): the run starts from
    the encoded image, so with a small denoise the final latents stay closer to the image's latents than a
    full-strength run does, and the output keeps the image size."""
    from PIL import Image

    from lens_core.config import pack_latents

    pipe = LensPipeline.from_pretrained(pipeline_dir, dtype=torch.float32, device="cpu", offload=True)
    img = Image.open(golden_dir / "pipeline_tiny" / "cases" / "a_cfg1_4steps.fp32.img0.png")
    low = pipe(PROMPT, image=img, denoise=0.25, steps=4, cfg=1.0, seed=3)
    full = pipe(PROMPT, image=img, denoise=1.0, steps=4, cfg=1.0, seed=3)
    assert low.images[0].size == img.size
    x = torch.from_numpy(__import__("numpy").asarray(img.convert("RGB")).copy()).permute(2, 0, 1)[None]
    init = pack_latents(pipe.vae.encode(x.float() / 127.5 - 1.0))
    assert rel(low.latents, init) < 0.8 * rel(full.latents, init)
