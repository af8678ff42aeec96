"""nodes/bridge/pack_model.py without ComfyUI (stand-in comfy, or the real one when importable): the pack's DiT as a
MODEL, its ComfyUI call convention, the official CFG function, which patches make LensSampler go through
ComfyUI's sampling, and workflows saved before issue 24 (model links typed LENS_MODEL). The numbers inside a
real ComfyUI: tests/test_comfyui_native_model.py (marked comfyui)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from test_nodes import PACK_NAME, models_dir, pack, run  # noqa: F401  (fixtures)
from test_workflows import WORKFLOWS, object_info_of, types_match


@pytest.fixture(scope="module")
def nm(pack):   # noqa: F811
    return sys.modules[f"{PACK_NAME}.nodes.bridge"]


@pytest.fixture(scope="module")
def model(pack, models_dir):   # noqa: F811
    (m,) = run(pack, "LensModelLoader", model_name="Lens-tiny", weight_dtype="fp32", variant="auto")
    return m


def test_comfy_call_convention_equals_the_token_forward(nm, model, golden_dir):
    from safetensors.torch import load_file

    from lens_core.config import pack_latents, unpack_latents
    from lens_core.sampling import model_timestep

    import comfy.patcher_extension as pe

    dit = model.model.diffusion_model
    d = load_file(str(golden_dir / "pipeline_tiny" / "cases" / "b_cfg5_6steps_emptyneg.fp32.safetensors"))
    feats = [d[f"prompt_embeds_{i}"] for i in range(4)]
    mask = d["prompt_mask"]
    x = torch.randn(1, 128, 4, 6, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])
    seen = []

    def wrapper(executor, *args, **kwargs):     # what EasyCache & co. see: x in the LATENT layout, options last
        seen.append((tuple(args[0].shape), isinstance(args[-1], dict)))
        return executor(*args, **kwargs)

    opts = {"wrappers": {pe.WrappersMP.DIFFUSION_MODEL: {"test": [wrapper]}}}
    with torch.no_grad():
        out = dit(x, sigma, context=torch.cat(feats, -1), attention_mask=mask.long(), transformer_options=opts)
        ref = dit.velocity(pack_latents(x), feats, mask, model_timestep(sigma, torch.float32), grid=(4, 6),
                           exact=False)
    assert seen == [((1, 128, 4, 6), True)]
    assert torch.equal(out, unpack_latents(ref, 4, 6))
    # the model's own apply_model: x0 = x − σ·v
    with torch.no_grad():
        x0 = model.model.apply_model(x, sigma, c_crossattn=torch.cat(feats, -1), attention_mask=mask.long())
    assert torch.allclose(x0, x - 0.7 * out, atol=1e-6)


def test_official_cfg_is_the_lens_core_rescale(nm):
    from lens_core.sampling import cfg_combine

    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(2, 128, 3, 5, generator=g), torch.randn(2, 128, 3, 5, generator=g)
    out = nm.official_cfg({"cond": cond, "uncond": uncond, "cond_scale": 5.0})
    assert torch.equal(out, cfg_combine(cond, uncond, 5.0, dim=1))
    assert torch.allclose(out.norm(dim=1), cond.norm(dim=1), rtol=1e-5)   # per-position norm of cond


def test_model_patches_decide_the_sampling_route(nm, model):
    assert nm.pack_model_patches(model) == []                       # loader defaults: lens_core's own sampler
    m = model.clone()
    m.model_options.setdefault("transformer_options", {})["patches_replace"] = {"dit": {("double_block", 0): print}}
    assert nm.pack_model_patches(m) == ["transformer_options.patches_replace"]
    m = model.clone()
    m.set_model_sampler_cfg_function(lambda args: args["cond"])
    assert nm.pack_model_patches(m) == ["sampler_cfg_function"]
    m = model.clone()
    m.model_options["transformer_options"]["wrappers"] = {"diffusion_model": {"easycache": [print]}}
    m.model_options["transformer_options"]["easycache"] = object()
    assert nm.pack_model_patches(m) == ["transformer_options.wrappers", "transformer_options.easycache"]
    m = model.clone()
    m.add_weight_wrapper("diffusion_model.img_in.weight", lambda w: w)
    m.model_options[nm.LORA_KEY] = (("x.safetensors", 1.0),)
    assert nm.pack_model_patches(m) == []                           # LoRA weight wrappers and names: applied at load
    m.add_object_patch("model_sampling", object())
    assert nm.pack_model_patches(m) == ["model_sampling"]


def test_lens_lora_loader_refuses_a_foreign_model(pack):   # noqa: F811
    import comfy.model_patcher

    other = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="LensModelLoader"):
        pack.NODE_CLASS_MAPPINGS["LensLoraLoader"]().apply(other, "x.safetensors", 1.0)


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if "LENS_MODEL,MODEL" in p.read_text()],
                         ids=lambda p: p.stem)
def test_workflows_saved_with_lens_model_links_still_type_check(pack, path):   # noqa: F811
    """A workflow saved before issue 24 has its model links typed LENS_MODEL: every input they reach still
    accepts that type, and the loader output now is a MODEL that input accepts too."""
    info = object_info_of(pack.NODE_CLASS_MAPPINGS)
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    model_links = [link for link in wf["links"] if link[5] == "MODEL"]
    assert model_links
    for _lid, src, sslot, dst, dslot, _typ in model_links:
        spec = info[nodes[dst]["type"]]["input"]["required"][nodes[dst]["inputs"][dslot]["name"]]
        assert types_match("LENS_MODEL", spec[0]) and types_match(info[nodes[src]["type"]]["output"][sslot], spec[0])


def test_steps_are_checked_once_with_one_message_on_every_route(pack, nm, model, monkeypatch):   # noqa: F811
    """LensSampler's routes (lens_core's sampler, the pack's MODEL with patches through ComfyUI's sampling) only
    resolve 0 = the variant's default; ``LensSampler.schedule`` is the one steps check, with one message."""
    core_config = sys.modules[f"{PACK_NAME}.lens_core.config"]
    calls = []
    real = core_config.check_steps
    monkeypatch.setattr(core_config, "check_steps", lambda *a: calls.append(a) or real(*a))
    patched = model.clone()
    patched.set_model_sampler_cfg_function(lambda args: args["cond"])
    latent = {"samples": torch.zeros(1, 128, 4, 6)}
    sampler = pack.NODE_CLASS_MAPPINGS["LensSampler"]()
    for m in (model, patched):
        calls.clear()
        with pytest.raises(ValueError, match=r"^LensSampler steps: expected an integer in \[1, 1000\], found 1001; "
                                             r"fix: Lens uses 20, Turbo 4, Base 50 steps$"):
            sampler.sample(m, [], [], latent, 0, 1001, 1.0, 1.0)
        assert calls == [(1001, "LensSampler steps")]
