"""Node-layer tests without ComfyUI: the pack's nodes against the comfy stand-in (tests/comfy_stub), which is
put on sys.path only when the real ``comfy`` package is not importable.

The full-graph test runs loaders -> LensTextEncode -> LensEmptyLatent -> LensSampler -> LensVAEDecode on the
tiny golden pipeline and compares the IMAGE with lens_core's own LensPipeline for the same seed and with the
golden reference image of the official pipeline (pipeline case a).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
STUB = REPO / "tests" / "comfy_stub"
PACK_NAME = "lens_nodes_pack"
PROMPT = "a red cube on a wooden table"

# Core node ids of ComfyUI (0.3.64 plus the native Lens nodes of 2026) a custom node must never reuse.
CORE_IDS = {"CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "VAELoader", "CLIPTextEncode", "EmptyLatentImage",
            "KSampler", "KSamplerAdvanced", "SamplerCustom", "VAEDecode", "VAEEncode", "VAEDecodeTiled",
            "VAEEncodeTiled", "SaveImage", "PreviewImage", "LoadImage", "EmptySD3LatentImage",
            "EmptyFlux2LatentImage", "EmptyHunyuanLatent", "ModelSamplingFlux", "CFGNorm"}


def ensure_comfy():
    """Real comfy when importable, else the stand-in. Returns True when the stand-in is in use."""
    try:
        import comfy.model_management  # noqa: F401
        import folder_paths  # noqa: F401
        return "comfy_stub" in str(pathlib.Path(sys.modules["comfy"].__file__))
    except ImportError:
        for name in [m for m in sys.modules if m == "comfy" or m.startswith("comfy.")]:
            del sys.modules[name]
        sys.path.insert(0, str(STUB))
        import comfy.model_management  # noqa: F401
        return True


def import_pack():
    """The repository imported as a package, the way ComfyUI loads a custom-node folder."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    ensure_comfy()
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack():
    return import_pack()


@pytest.fixture(scope="module")
def stub_only(pack):
    import comfy
    if "comfy_stub" not in str(pathlib.Path(comfy.__file__)):
        pytest.skip("real ComfyUI importable: stand-in specific test")
    return True


# ---------------------------------------------------------------------------------------------------------
# definitions


def test_mappings_and_ids(pack):
    m = pack.NODE_CLASS_MAPPINGS
    assert set(m) == {"LensModelLoader", "LensTextEncoderLoader", "LensVAELoader", "LensCheckpointLoader",
                      "LensTextEncode", "LensEmptyLatent", "LensSampler", "LensVAEDecode", "LensVAEEncode",
                      "LensLoraLoader", "LensPromptEnhance", "LensSigmas", "LensNoise"}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(m)
    for name in m:
        assert name.startswith("Lens") and name not in CORE_IDS


@pytest.mark.parametrize("name", ["LensModelLoader", "LensTextEncoderLoader", "LensVAELoader",
                                  "LensCheckpointLoader", "LensTextEncode", "LensEmptyLatent", "LensSampler",
                                  "LensVAEDecode", "LensVAEEncode", "LensLoraLoader", "LensPromptEnhance", "LensSigmas",
                                  "LensNoise"])
def test_input_and_return_types_valid(pack, name):
    cls = pack.NODE_CLASS_MAPPINGS[name]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
    for section in ("required", "optional"):
        for inp, s in spec.get(section, {}).items():
            assert isinstance(s, tuple) and 1 <= len(s) <= 2, (inp, s)
            t = s[0]
            assert isinstance(t, list) and t or isinstance(t, str) and t, (inp, t)
            opts = s[1]
            assert isinstance(opts.get("tooltip"), str) and len(opts["tooltip"]) > 10, (name, inp)
            if isinstance(t, list) and "default" in opts:
                assert opts["default"] in t
            if t in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"]
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(r, str) for r in cls.RETURN_TYPES)
    for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
        if hasattr(cls, attr):
            assert len(getattr(cls, attr)) == len(cls.RETURN_TYPES)
    assert callable(getattr(cls, cls.FUNCTION))
    assert cls.CATEGORY.startswith("Lens/")
    # every required/optional input is an argument of FUNCTION
    import inspect
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    for section in ("required", "optional", "hidden"):
        for inp in spec.get(section, {}):
            assert inp in params, (name, inp)


def test_custom_types_chain(pack):
    m = pack.NODE_CLASS_MAPPINGS
    # the DiT is a native MODEL (issue 24); LENS_MODEL, its type before, stays accepted for links saved with it
    assert m["LensModelLoader"].RETURN_TYPES == ("MODEL",)
    assert m["LensCheckpointLoader"].RETURN_TYPES == ("MODEL", "LENS_TEXT_ENCODER", "LENS_VAE")
    assert m["LensLoraLoader"].RETURN_TYPES == ("MODEL",)
    assert m["LensTextEncode"].RETURN_TYPES == ("CONDITIONING",)
    for node in ("LensSampler", "LensLoraLoader"):
        assert m[node].INPUT_TYPES()["required"]["model"][0].split(",") == ["LENS_MODEL", "MODEL"]
    assert m["LensVAEDecode"].RETURN_TYPES == ("IMAGE",)
    assert m["LensVAEEncode"].RETURN_TYPES == ("LATENT",)


# ---------------------------------------------------------------------------------------------------------
# running the graph on the tiny golden pipeline


@pytest.fixture(scope="module")
def models_dir(pack, pipeline_dir, tmp_path_factory):
    """A ComfyUI models folder holding the tiny pipeline as a diffusers folder plus single-file copies."""
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (root / sub).mkdir()
    os.symlink(pipeline_dir, root / "diffusion_models" / "Lens-tiny")
    vae_file = pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors"
    os.symlink(vae_file, root / "vae" / "tiny-flux2-vae.safetensors")
    os.symlink(vae_file, root / "diffusion_models" / "misplaced-flux2-vae.safetensors")   # a user mistake
    if hasattr(folder_paths, "set_models_dir"):          # the stand-in
        folder_paths.set_models_dir(root)
    else:                                                # real folder_paths: register the temp folders
        for sub in ("diffusion_models", "text_encoders", "vae"):
            folder_paths.add_model_folder_path(sub, str(root / sub), is_default=True)
    return root


def run(pack, name, **kwargs):
    cls = pack.NODE_CLASS_MAPPINGS[name]
    return getattr(cls(), cls.FUNCTION)(**kwargs)


@pytest.fixture(scope="module")
def loaded(pack, models_dir):
    opts = pack.NODE_CLASS_MAPPINGS["LensModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert "Lens-tiny" in opts
    assert "Lens-tiny/transformer/diffusion_pytorch_model.safetensors" not in opts
    model, te, vae = run(pack, "LensCheckpointLoader", folder="Lens-tiny", weight_dtype="default", variant="auto",
                         text_encoder_device="default", experts="packed")
    return {"model": model, "te": te, "vae": vae}


_ENCODED = {}   # (text encoder, prompt) -> CONDITIONING: the tiny GPT-OSS is the slow part of a graph run


def graph(pack, loaded, prompt=PROMPT, negative="", steps=4, cfg=1.0, seed=1234, width=96, height=64,
          latent=None, denoise=1.0, encode=False):
    key = (id(loaded["te"]), prompt)
    if encode or key not in _ENCODED:
        (_ENCODED[key],) = run(pack, "LensTextEncode", text_encoder=loaded["te"], text=prompt)
    pos = _ENCODED[key]
    (neg,) = run(pack, "LensTextEncode", text_encoder=loaded["te"], text=negative)
    if latent is None:
        (latent,) = run(pack, "LensEmptyLatent", aspect_ratio="custom", base_resolution=1024, width=width,
                        height=height, batch_size=1)
    (out,) = run(pack, "LensSampler", model=loaded["model"], positive=pos, negative=neg, latent_image=latent,
                 seed=seed, steps=steps, cfg=cfg, denoise=denoise)
    (image,) = run(pack, "LensVAEDecode", vae=loaded["vae"], samples=out, tiled="auto")
    return pos, neg, out, image


def _golden_case(golden_dir, name):
    from safetensors.torch import load_file
    return load_file(str(golden_dir / "pipeline_tiny" / "cases" / f"{name}.fp32.safetensors"))


def _uint8(image):
    """IMAGE [B,H,W,3] 0..1 -> uint8 as the official pipeline rounds ((x·2−1+1)·127.5, truncated)."""
    return ((image * 2 - 1 + 1) * 127.5).to(torch.uint8)


@pytest.mark.parametrize("case,steps,cfg", [("a_cfg1_4steps", 4, 1.0), ("b_cfg5_6steps_emptyneg", 6, 5.0)])
def test_graph_reproduces_golden_pipeline(pack, loaded, golden_dir, case, steps, cfg):
    ref = _golden_case(golden_dir, case)
    pos, neg, out, image = graph(pack, loaded, steps=steps, cfg=cfg)
    # conditioning in the native Lens layout
    cond, extra = pos[0]
    assert cond.shape == (1, 29, 4 * 64) and extra["num_layers_stacked"] == 4 and extra["pooled_output"] is None
    assert extra["attention_mask"].shape == (1, 29) and bool(extra["attention_mask"].all())
    feats = torch.cat([ref[f"prompt_embeds_{i}"] for i in range(4)], dim=-1)
    assert (cond - feats).norm() / feats.norm() < 1e-5
    assert neg[0][0].shape[1] == 0                        # empty negative: zero-length, as native Lens
    # latent and image
    assert out["samples"].shape == (1, 128, 4, 6)
    from lens_core.config import pack_latents
    final = pack_latents(out["samples"])
    rel = ((final - ref["final_latents"]).norm() / ref["final_latents"].norm()).item()
    print(f"{case}: final latents rel err vs golden {rel:.2e}")
    assert rel < 1e-4, rel
    assert image.shape == (1, 64, 96, 3) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    same = (_uint8(image) == ref["image_uint8"]).float().mean().item()
    print(f"{case}: uint8 pixels equal to golden {same:.4%}, max diff "
          f"{(_uint8(image).int() - ref['image_uint8'].int()).abs().max().item()}")
    assert same >= 0.999, same


def test_every_use_loads_through_comfy(pack, loaded, stub_only):
    """load_models_gpu([patcher], memory_required=...) right before each text encode / sample / decode, and
    every model is a ModelPatcher built from comfy.ops layers with the role's devices."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops

    for key in ("model", "te", "vae"):
        patcher = loaded[key] if key == "model" else loaded[key].patcher        # the DiT is a MODEL (a patcher)
        assert isinstance(patcher, comfy.model_patcher.ModelPatcher)
        linears = [m for m in patcher.model.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(isinstance(m, comfy.ops.manual_cast.Linear) for m in linears), key
    mm.LOAD_CALLS.clear()
    graph(pack, loaded, steps=2, cfg=5.0, encode=True)
    order = [(calls[0].model, mem) for calls, mem, _ in mm.LOAD_CALLS]
    roles = [type(m).__name__ for m, _ in order]
    assert roles == ["LensTextEncoder", "LensPackModel", "LensVAE"], roles   # empty negative: no encode
    assert all(mem > 0 for _, mem in order)
    assert all(len(calls) == 1 for calls, _, _ in mm.LOAD_CALLS)


def test_progress_previews_and_interrupt(pack, loaded, stub_only):
    import comfy.model_management as mm
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    events = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None:
                                             events.append((value, total, preview)))
    old = args.preview_method
    args.preview_method = LatentPreviewMethod.Auto
    try:
        graph(pack, loaded, steps=3, cfg=1.0)
        sampler_events = [e for e in events if e[1] == 3]
        assert [e[0] for e in sampler_events] == [1, 2, 3]
        for _, _, preview in sampler_events:
            fmt, img, size = preview
            # latent resolution: the stand-in (like 0.3.64) has no Flux2 format, and the preview is the one ComfyUI
            # shows for the MODEL's bundled format (test_bridge: previews_match_the_models_latent_format)
            assert fmt == "JPEG" and img.size == (6, 4) and size == args.preview_size
        # interrupt: POST /interrupt sets this flag; the sampler stops at the next step and resets it
        events.clear()
        mm.interrupt_current_processing(True)
        with pytest.raises(mm.InterruptProcessingException):
            graph(pack, loaded, steps=3, cfg=1.0)
        assert not mm.processing_interrupted()
        assert len([e for e in events if e[1] == 3]) == 0
        graph(pack, loaded, steps=1, cfg=1.0)               # the next run works
    finally:
        args.preview_method = old
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)


def test_native_empty_latent_and_latent_keys(pack, loaded):
    """A native EmptyLatentImage latent (zeros [B,4,H/8,W/8]) gives the same image as LensEmptyLatent;
    batch_index and noise_mask are kept; batch_index picks the per-sample noise of the full batch."""
    native = {"samples": torch.zeros(2, 4, 8, 12), "batch_index": [1, 0],
              "noise_mask": torch.ones(2, 1, 64, 96)}
    (pos,) = run(pack, "LensTextEncode", text_encoder=loaded["te"], text=PROMPT)
    (neg,) = run(pack, "LensTextEncode", text_encoder=loaded["te"], text="")
    kw = dict(model=loaded["model"], positive=pos, negative=neg, seed=7, steps=2, cfg=1.0, denoise=1.0)
    (out,) = run(pack, "LensSampler", latent_image=native, **kw)
    assert out["samples"].shape == (2, 128, 4, 6)
    assert out["batch_index"] == [1, 0] and out["noise_mask"] is native["noise_mask"]
    (lens,) = run(pack, "LensEmptyLatent", aspect_ratio="custom", base_resolution=1024, width=96, height=64,
                  batch_size=2)
    (ref,) = run(pack, "LensSampler", latent_image=lens, **kw)
    swapped = ref["samples"][[1, 0]]                 # same noise per sample, up to batched-matmul rounding
    assert ((out["samples"] - swapped).norm() / swapped.norm()).item() < 1e-5
    assert ((out["samples"] - ref["samples"]).norm() / ref["samples"].norm()).item() > 0.1


def test_empty_latent_presets(pack):
    (lat,) = run(pack, "LensEmptyLatent", aspect_ratio="16:9", base_resolution=1024, width=0, height=0, batch_size=3)
    assert lat["samples"].shape == (3, 128, 768 // 16, 1376 // 16)
    (lat,) = run(pack, "LensEmptyLatent", aspect_ratio="1:1", base_resolution=1440, width=0, height=0, batch_size=1)
    assert lat["samples"].shape == (1, 128, 90, 90)


def test_img2img_through_vae_encode(pack, loaded):
    _, _, _, image = graph(pack, loaded, steps=2, cfg=1.0)
    (latent,) = run(pack, "LensVAEEncode", vae=loaded["vae"], pixels=image, tiled="off")
    assert latent["samples"].shape == (1, 128, 4, 6)
    _, _, out, again = graph(pack, loaded, steps=4, cfg=1.0, latent=latent, denoise=0.5)
    assert again.shape == image.shape
    with pytest.raises(ValueError, match="denoise"):
        graph(pack, loaded, steps=4, cfg=1.0, denoise=0.5)      # empty latent + denoise < 1


def test_noise_mask_inpaints_only_the_masked_area(pack, loaded):
    """A LATENT with a noise_mask (what Set Latent Noise Mask makes: pixel-size [B,1,H,W]) is inpainted: outside the
    mask the result equals the input latent bit for bit, inside it is generated anew; no mask = whole image."""
    _, _, _, image = graph(pack, loaded, steps=2, cfg=1.0)
    (latent,) = run(pack, "LensVAEEncode", vae=loaded["vae"], pixels=image, tiled="off")
    mask = torch.zeros(1, 1, 64, 96)
    mask[..., :, 48:] = 1.0                                   # regenerate the right half
    masked = dict(latent, noise_mask=mask)
    (pos,) = run(pack, "LensTextEncode", text_encoder=loaded["te"], text="a blue sphere")
    (neg,) = run(pack, "LensTextEncode", text_encoder=loaded["te"], text="")
    kw = dict(model=loaded["model"], positive=pos, negative=neg, seed=3, steps=3, cfg=5.0, denoise=1.0)
    (out,) = run(pack, "LensSampler", latent_image=masked, **kw)
    src, res = latent["samples"], out["samples"]
    assert out["noise_mask"] is mask
    assert torch.equal(res[..., :3], src[..., :3].to(res.dtype))            # kept columns: bit for bit
    assert ((res[..., 3:] - src[..., 3:]).norm() / src[..., 3:].norm()).item() > 0.3
    (plain,) = run(pack, "LensSampler", latent_image=latent, **kw)          # without a mask: a new image
    assert not torch.allclose(plain["samples"][..., :3], src[..., :3], atol=0.1)


def test_single_file_loaders_and_wrong_files(pack, loaded, models_dir):
    (model,) = run(pack, "LensModelLoader", model_name="Lens-tiny", weight_dtype="default", variant="turbo")
    assert model.model.lens.variant == "turbo"
    # a lone VAE file has no config.json: the loader derives the widths from the shapes (the tiny VAE's 8
    # norm groups cannot be, so only the folder-loaded VAE decodes like the golden pipeline)
    (vae_file,) = run(pack, "LensVAELoader", vae_name="tiny-flux2-vae.safetensors")
    assert vae_file.module.config.block_out_channels == loaded["vae"].module.config.block_out_channels
    (vae,) = run(pack, "LensVAELoader", vae_name="Lens-tiny")
    (te,) = run(pack, "LensTextEncoderLoader", text_encoder_name="Lens-tiny", device="cpu", experts="packed")
    _, _, _, image = graph(pack, {"model": model, "te": te, "vae": vae}, steps=0, cfg=0.0)   # auto: turbo 4/1
    _, _, _, ref = graph(pack, loaded, steps=4, cfg=1.0)
    assert torch.equal(image, ref)
    with pytest.raises(ValueError) as exc:
        run(pack, "LensModelLoader", model_name="misplaced-flux2-vae.safetensors", weight_dtype="default",
            variant="auto")
    msg = str(exc.value)
    print(msg)
    assert "misplaced-flux2-vae.safetensors" in msg and "looks like a FLUX.2 VAE" in msg and "LensVAELoader" in msg
    with pytest.raises(FileNotFoundError, match="not found"):
        run(pack, "LensVAELoader", vae_name="missing.safetensors")


def test_bad_graph_inputs_name_problem_and_fix(pack, loaded):
    (pos,) = run(pack, "LensTextEncode", text_encoder=loaded["te"], text=PROMPT)
    (lat,) = run(pack, "LensEmptyLatent", aspect_ratio="custom", base_resolution=1024, width=96, height=64,
                 batch_size=1)
    kw = dict(model=loaded["model"], negative=pos, seed=0, steps=1, cfg=1.0, denoise=1.0)
    # size not a multiple of 16 in custom mode
    with pytest.raises(ValueError, match=r"multiple of 16.*Fix"):
        run(pack, "LensEmptyLatent", aspect_ratio="custom", base_resolution=1024, width=1000, height=1000,
            batch_size=1)
    # latent of another model family (SD-style 4 channels, not empty)
    sd = {"samples": torch.randn(1, 4, 8, 12)}
    with pytest.raises(ValueError, match=r"expected a Lens / FLUX.2 latent.*found \(1, 4, 8, 12\).*another model"):
        run(pack, "LensSampler", positive=pos, latent_image=sd, **kw)
    with pytest.raises(ValueError, match="another model family"):
        run(pack, "LensVAEDecode", vae=loaded["vae"], samples={"samples": torch.zeros(1, 16, 8, 8)}, tiled="auto")
    # conditioning from another model (e.g. a CLIP/T5 conditioning of width 4096)
    other = [[torch.randn(1, 77, 4096), {"pooled_output": torch.randn(1, 768)}]]
    with pytest.raises(ValueError, match=r"width 4096.*expects 4×64 = 256.*LensTextEncode"):
        run(pack, "LensSampler", positive=other, latent_image=lat, **kw)


@pytest.fixture(scope="module")
def lens_pipe(pipeline_dir):
    from lens_core.pipeline import LensPipeline
    return LensPipeline.from_pretrained(pipeline_dir, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("steps,cfg", [(4, 1.0), (3, 5.0)])
def test_graph_equals_lens_core_pipeline(pack, loaded, lens_pipe, steps, cfg, monkeypatch):
    """Same seed, same settings: the node graph and lens_core's LensPipeline give the same final latents
    (bit for bit) and the same IMAGE (the pipeline's decode in ComfyUI's float layout).

    Both on the same fp32 GEMM back-end: the host's layer classes always use torch's default, while the
    standalone fast path may use oneDNN on CPUs where it is faster (~1e-6 apart, tests/test_dit.py)."""
    import lens_core.ops
    from lens_core.config import pack_latents, unpack_latents
    from lens_core.vae import to_comfy_image

    monkeypatch.setattr(lens_core.ops, "_onednn_linear", False)

    # cfg 1: the nodes run one forward per step (the sampler's fast path); the pipeline's exact=False is that
    pipe = lens_pipe
    pipe.exact = cfg != 1.0
    ref = pipe(PROMPT, negative_prompt="", height=64, width=96, steps=steps, cfg=cfg, seed=77)
    _, _, out, image = graph(pack, loaded, steps=steps, cfg=cfg, seed=77)
    assert torch.equal(pack_latents(out["samples"]), ref.latents)
    with torch.no_grad():
        ref_image = to_comfy_image(pipe.vae.decode(unpack_latents(ref.latents, 4, 6)))
    # lens_core's VAE computes its ×2 upsample+conv as a sub-pixel conv with plain torch layers and by the
    # reference path with comfy.ops layers (so ComfyUI can cast/patch the weight): float-rounding apart
    diff = (image - ref_image).abs().max().item()
    print(f"steps {steps} cfg {cfg}: latents bit-identical to LensPipeline; IMAGE max abs diff {diff:.2e}")
    assert diff < 1e-5
    same = (_uint8(image) == ref.uint8).float().mean().item()
    assert same >= 0.999, same


def test_loader_options_dtype_and_experts(pack, loaded):
    """weight_dtype bf16 / fp8_e4m3fn and dequantized experts load and sample; their results stay close to
    the default (fp32 on the CPU, packed experts)."""
    pos, _, _, _ = graph(pack, loaded, steps=1)
    (te_deq,) = run(pack, "LensTextEncoderLoader", text_encoder_name="Lens-tiny", device="default",
                    experts="dequantized")
    (pos_deq,) = run(pack, "LensTextEncode", text_encoder=te_deq, text=PROMPT)
    assert torch.equal(pos[0][0], pos_deq[0][0])          # MXFP4 -> fp32 dequantization is exact
    (lat,) = run(pack, "LensEmptyLatent", aspect_ratio="custom", base_resolution=1024, width=96, height=64,
                 batch_size=1)
    kw = dict(positive=pos, negative=pos, latent_image=lat, seed=3, steps=2, cfg=1.0, denoise=1.0)
    (ref,) = run(pack, "LensSampler", model=loaded["model"], **kw)
    for weight_dtype, tol in (("bf16", 0.05), ("fp8_e4m3fn", 0.2)):
        (model,) = run(pack, "LensModelLoader", model_name="Lens-tiny", weight_dtype=weight_dtype, variant="auto")
        (out,) = run(pack, "LensSampler", model=model, **kw)
        rel = ((out["samples"] - ref["samples"]).norm() / ref["samples"].norm()).item()
        print(f"{weight_dtype}: rel diff vs default weights {rel:.3e}")
        assert 0 < rel < tol, (weight_dtype, rel)


def test_one_forward_per_step_and_tiled_decode(pack, loaded):
    """CFG 1: one DiT forward per step on the positive only; CFG > 1: one batched [pos; neg] forward per step.
    Tiled decode (forced on) matches the untiled one for an image that fits one tile."""
    calls = []
    dit = loaded["model"].model.diffusion_model           # img_in runs once per DiT forward
    handle = dit.img_in.register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
    try:
        _, _, out, image = graph(pack, loaded, steps=3, cfg=1.0)
        assert calls == [1, 1, 1]
        calls.clear()
        graph(pack, loaded, steps=3, cfg=4.0)
        assert calls == [2, 2, 2]
    finally:
        handle.remove()
    (tiled,) = run(pack, "LensVAEDecode", vae=loaded["vae"], samples=out, tiled="on")
    assert (tiled - image).abs().max().item() < 1e-5


def real_size_patcher_plans(ops) -> dict:
    """Real-size DiT (bf16 and fp8 storage), text encoder and VAE on ``meta`` built with ``ops``: the bridge's
    ``dynamic_vram_plan`` of each, and whether every module that declares ``comfy_cast_weights`` has the
    weight/bias attributes and weight functions ComfyUI's patchers read. Shared with the real-ComfyUI test
    (test_comfyui_integration.test_patcher_choice_with_real_comfy_ops)."""
    from lens_core import quant_linear as ql, text_encoder as T, vae as V
    from lens_core.checkpoints.assign import _replace_module
    from lens_core.config import REAL_DIT_CONFIG
    from lens_core.dit import LensTransformer

    bridge = sys.modules[ops.__module__.rsplit(".", 1)[0]]
    dit = LensTransformer(REAL_DIT_CONFIG, operations=ops, device="meta", dtype=torch.bfloat16)
    fp8 = LensTransformer(REAL_DIT_CONFIG, operations=ops, device="meta", dtype=torch.bfloat16)
    for name, mod in list(fp8.named_modules()):
        if isinstance(mod, torch.nn.Linear) and ql.fp8_eligible(name):
            _replace_module(fp8, name, ql.FP8Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                                    device="meta"))
    te = T.LensTextEncoder(T.TextEncoderConfig(), operations=ops, device="meta", dtype=torch.bfloat16)
    vae = V.LensVAE(V.REAL_VAE_CONFIG, operations=ops, device="meta")
    models = {"dit": dit, "dit_fp8": fp8, "te": te, "vae": vae}
    plans = {k: bridge.dynamic_vram_plan(m) for k, m in models.items()}
    bad = sorted({type(m).__name__ for model in models.values() for m in model.modules()
                  if hasattr(m, "comfy_cast_weights") and not (
                      hasattr(m, "weight") and hasattr(m, "bias") and isinstance(m.weight_function, list)
                      and isinstance(m.bias_function, list))})
    return {"plans": plans, "bad_cast_modules": bad,
            "classes": {k: bridge.patcher_class(m).__name__ for k, m in models.items()}}


def check_real_size_patcher_plans(result):
    plans = result["plans"]
    print({k: (round(p["streamed"] / 2**30, 2), round(p["forced"] / 2**30, 2), p["dynamic"]) for k, p in plans.items()})
    assert {k: p["dynamic"] for k, p in plans.items()} == {"dit": True, "dit_fp8": False, "te": False, "vae": True}
    assert plans["te"]["forced"] > 9 * 2**30             # ≈ 9.5 GiB of packed experts would be copied per load
    assert result["bad_cast_modules"] == []


def test_patcher_choice_for_dynamic_vram_at_real_size(pack):
    """Real-size models on ``meta``, built with the bridge's comfy.ops layers: dynamic VRAM can stream the bf16
    DiT and the VAE (all their bulk is comfy.ops weight/bias) but would copy the packed expert banks and fp8 /
    MXFP8 storage whole at every load, so those models get the classic ModelPatcher; every module that declares
    ``comfy_cast_weights`` has the weight/bias attributes and weight functions ComfyUI's patchers read.
    (Here with the stand-in's comfy.ops; with the real ones in the comfyui suite.)"""
    bridge = sys.modules[f"{PACK_NAME}.nodes.bridge"]
    check_real_size_patcher_plans(real_size_patcher_plans(bridge.operations()))


def test_prompt_enhance_node(pack, loaded, pipeline_dir):
    """LensPromptEnhance on the tiny golden encoder: the same text as lens_core.enhance for the same seed,
    loaded through ComfyUI (the generator's lm_head/final norm loaded on first use, in a ModelPatcher of its
    own), progress per token batch, interruptible, and the encoder keeps encoding identically afterwards."""
    import comfy.model_management as mm
    import comfy.utils
    from lens_core import checkpoints as ck
    from lens_core import enhance as core_enhance

    te = loaded["te"]
    encoder_size = mm.module_size(te.module)
    before, = run(pack, "LensTextEncode", text_encoder=te, text=PROMPT)
    assert run(pack, "LensPromptEnhance", text_encoder=te, text="  ", seed=1) == ("  ",)
    events = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: events.append((value, total)))
    try:
        out, = run(pack, "LensPromptEnhance", text_encoder=te, text=PROMPT, seed=7, max_new_tokens=20,
                   temperature=0.7)
        gen = sys.modules[f"{PACK_NAME}.lens_core.enhance"].generator_for(te.module)     # the pack's own copy
        gen_patcher = gen.__dict__["_comfy_patcher"]
        assert gen.ready and gen_patcher.model is gen and gen_patcher.model_size() == mm.module_size(gen)
        assert te.patcher.model_size() == mm.module_size(te.module) == encoder_size   # the encoder did not grow
        assert events and events[-1] == (20, 20) and all(t == 20 for _, t in events)
        mm.interrupt_current_processing(True)
        with pytest.raises(mm.InterruptProcessingException):
            run(pack, "LensPromptEnhance", text_encoder=te, text=PROMPT + " again", seed=7, max_new_tokens=20)
        assert not mm.processing_interrupted()
        assert run(pack, "LensPromptEnhance", text_encoder=te, text=PROMPT, seed=7, max_new_tokens=20) == (out,)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    ref_te = ck.load_text_encoder(pipeline_dir, dtype=torch.float32)
    ref = core_enhance.enhance(ref_te, ck.load_tokenizer(pipeline_dir), PROMPT, seed=7, max_new_tokens=20)
    assert isinstance(out, str) and out == ref
    after, = run(pack, "LensTextEncode", text_encoder=te, text=PROMPT)
    assert torch.equal(before[0][0], after[0][0])


def test_gguf_encoder_with_sidecar_tokenizer_listed_and_loaded(pack, loaded, models_dir, golden_dir, tokenizer_json,
                                                             monkeypatch):
    """The listing and the loaders go through lens_core's locate(): a GPT-OSS GGUF in models/text_encoders with
    its side-car ``<stem>.tokenizer.json`` is listed (the side-car is not) and the loader node takes that
    tokenizer. (The tiny 6-layer encoder cannot be loaded alone: Lens selects layers 5/11/17/23, which only the
    DiT config of the tiny pipeline renumbers; so the encoder module is the diffusers one here, the tokenizer the
    side-car's.)"""
    import shutil

    import fixtures as fx

    te_dir = models_dir / "text_encoders"
    fx.write_gguf_te(te_dir / "gpt-oss-tiny-Q4_K_M.gguf", golden_dir)
    shutil.copy(tokenizer_json, te_dir / "gpt-oss-tiny-Q4_K_M.tokenizer.json")
    sharded = te_dir / "te-sharded"                    # an index without config.json is one model too
    sharded.mkdir()
    for f in (golden_dir / "pipeline_tiny" / "text_encoder").glob("model*"):
        os.symlink(f, sharded / f.name)
    opts = pack.NODE_CLASS_MAPPINGS["LensTextEncoderLoader"].INPUT_TYPES()["required"]["text_encoder_name"][0]
    assert "gpt-oss-tiny-Q4_K_M.gguf" in opts and "te-sharded" in opts
    assert not [o for o in opts if o.endswith(".json") or o.startswith("te-sharded/")]
    ck = pack.nodes.loaders._checkpoints()
    seen = []
    monkeypatch.setattr(ck, "load_text_encoder", lambda path, **kw: (seen.append(path), loaded["te"].module)[1])
    real = ck.load_tokenizer
    monkeypatch.setattr(ck, "load_tokenizer", lambda path: (seen.append(ck.locate(path, "tokenizer")), real(path))[1])
    (te,) = run(pack, "LensTextEncoderLoader", text_encoder_name="gpt-oss-tiny-Q4_K_M.gguf", device="cpu",
                experts="packed")
    assert seen[0] == str(te_dir / "gpt-oss-tiny-Q4_K_M.gguf")
    assert (seen[1].kind, seen[1].path) == ("sidecar", str(te_dir / "gpt-oss-tiny-Q4_K_M.tokenizer.json"))
    (a,) = run(pack, "LensTextEncode", text_encoder=te, text=PROMPT)
    (b,) = run(pack, "LensTextEncode", text_encoder=loaded["te"], text=PROMPT)
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1]["attention_mask"], b[0][1]["attention_mask"])
