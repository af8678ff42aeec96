"""LensLoraLoader without ComfyUI (stand-in comfy, or the real one when importable): the node clones the MODEL
(a ModelPatcher whose diffusion_model is the pack's DiT, so every key carries ComfyUI's ``diffusion_model.``
prefix) and registers ComfyUI weight-adapter patches / per-call weight wrappers (quantized layers); nothing is
modified in place.
(Numbers through ComfyUI's own patching: tests/test_comfyui_lora.py, marked comfyui.)"""
from __future__ import annotations

import pytest
import torch

import lora_fixtures as lf
from test_nodes import models_dir, pack, run  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def lora_dir(models_dir):   # noqa: F811
    import folder_paths

    d = models_dir / "loras"
    d.mkdir(exist_ok=True)
    if not hasattr(folder_paths, "set_models_dir"):
        folder_paths.add_model_folder_path("loras", str(d), is_default=True)
    return d


def test_lora_loader_patches_a_clone(pack, lora_dir):   # noqa: F811
    (model,) = run(pack, "LensModelLoader", model_name="Lens-tiny", weight_dtype="fp32", variant="auto")
    dit = model.model.diffusion_model
    names = lf.target_names(dit)
    fa = lf.random_factors(dit, names, rank=4, alpha=2.0, seed=1)
    fb = lf.random_factors(dit, names[:3], kind="loha", rank=2, alpha=1.0, seed=2)
    lf.write(lora_dir / "style.safetensors", "peft", fa)
    lf.write(lora_dir / "loha.safetensors", "onetrainer-loha", fb)
    choices = pack.NODE_CLASS_MAPPINGS["LensLoraLoader"].INPUT_TYPES()["required"]["lora_name"][0]
    assert {"style.safetensors", "loha.safetensors"} <= set(choices)
    before = {k: v.clone() for k, v in dit.state_dict().items()}

    (m1,) = run(pack, "LensLoraLoader", model=model, lora_name="style.safetensors", strength=0.5)
    (m2,) = run(pack, "LensLoraLoader", model=m1, lora_name="loha.safetensors", strength=-1.0)
    assert m1 is not model and m1.model.diffusion_model is dit and m2.model.diffusion_model is dit
    assert not model.patches
    assert m2.model_options["lens_loras"] == (("style.safetensors", 0.5), ("loha.safetensors", -1.0))
    assert "lens_loras" not in model.model_options and len(m1.model_options["lens_loras"]) == 1
    key = "diffusion_model.transformer_blocks.0.attn.img_qkv.weight"
    (p1,) = m1.patches[key]
    strength, adapter = p1[0], p1[1]
    assert strength == pytest.approx(0.5 * 2.0 / 4) and type(adapter).__name__ == "LoRAAdapter"
    up, down, alpha = adapter.weights[:3]
    assert alpha is None and torch.equal(up, fa["transformer_blocks.0.attn.img_qkv"].t["up"])
    assert torch.equal(down, fa["transformer_blocks.0.attn.img_qkv"].t["down"])
    assert len(m2.patches[key]) == 2 and type(m2.patches[key][1][1]).__name__ == "LoHaAdapter"
    assert len(m2.patches) == len(names) and len(m1.patches[key]) == 1
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in before.items())
    (m0,) = run(pack, "LensLoraLoader", model=model, lora_name="style.safetensors", strength=0.0)
    assert not m0.patches


def test_lora_loader_on_fp8_model_uses_per_call_weight_wrappers(pack, lora_dir):   # noqa: F811
    """Quantized layers (fp8 storage here) get the adapter as ComfyUI weight wrappers applied to the dequantized
    weight per call; float layers as weight patches; the base patcher and module are untouched."""
    (model,) = run(pack, "LensModelLoader", model_name="Lens-tiny", weight_dtype="fp8_e4m3fn", variant="auto")
    dit = model.model.diffusion_model
    names = lf.target_names(dit)
    lf.write(lora_dir / "fp8style.safetensors", "kohya", lf.random_factors(dit, names, rank=4, alpha=4.0, seed=3))
    (m1,) = run(pack, "LensLoraLoader", model=model, lora_name="fp8style.safetensors", strength=1.0)
    (m2,) = run(pack, "LensLoraLoader", model=m1, lora_name="fp8style.safetensors", strength=0.25)
    key = "diffusion_model.transformer_blocks.0.attn.img_qkv.weight"
    assert [w.patches[0][0] for w in m2.weight_wrapper_patches[key]] == [1.0, 0.25]
    assert len(m1.weight_wrapper_patches[key]) == 1 and key not in model.weight_wrapper_patches
    mod = dit.get_submodule("transformer_blocks.0.attn.img_qkv")
    assert type(mod).__name__ == "FP8Linear" and mod.weight_function == [] and not mod.weight_patches()
    (wrapper,) = m1.weight_wrapper_patches[key]
    assert type(wrapper.patches[0][1]).__name__ == "LoRAAdapter"      # numbers: tests/test_comfyui_quant.py
    # the modulation Linears stay in the run dtype: ordinary weight patches
    assert "diffusion_model.transformer_blocks.0.img_mod.1.weight" in m1.patches
    assert key not in m1.patches


def test_lora_loader_errors(pack, lora_dir, models_dir):   # noqa: F811
    from safetensors.torch import save_file

    (model,) = run(pack, "LensModelLoader", model_name="Lens-tiny", weight_dtype="fp32", variant="auto")
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8)},
              str(lora_dir / "flux.safetensors"))
    with pytest.raises(ValueError, match="FLUX"):
        run(pack, "LensLoraLoader", model=model, lora_name="flux.safetensors", strength=1.0)
    with pytest.raises(FileNotFoundError, match="loras"):
        run(pack, "LensLoraLoader", model=model, lora_name="missing.safetensors", strength=1.0)
