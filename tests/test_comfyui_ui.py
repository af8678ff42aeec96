"""What a ComfyUI user meets first, in a real ComfyUI (marked ``comfyui``; needs COMFYUI_DIR): a fresh LensSampler's
defaults run on both model kinds. (Over HTTP: test_comfyui_integration.test_ui_helper_is_served and
test_comfyui_lora's readable LoRA error; in the browser: README "Checked in the browser".)"""
from __future__ import annotations

import pytest

from comfyui_run import native_or_skip, run_script

pytestmark = pytest.mark.comfyui

DEFAULTS = r'''
from safetensors.torch import load_file
req = N["LensSampler"].INPUT_TYPES()["required"]
steps, cfg = req["steps"][1]["default"], req["cfg"][1]["default"]
res = {"defaults": [steps, cfg], "native": hasattr(comfy.model_base, "Lens")}
os.makedirs(f"{tmp}/diffusion_models", exist_ok=True)
folder_paths.add_model_folder_path("diffusion_models", f"{tmp}/diffusion_models", is_default=True)
tdir = golden + "/pipeline_tiny/transformer"
os.symlink(tdir, f"{tmp}/diffusion_models/tiny")
os.symlink(tdir + "/diffusion_pytorch_model.safetensors", f"{tmp}/diffusion_models/lens_tiny_fp32.safetensors")
d = load_file(f"{golden}/pipeline_tiny/cases/a_cfg1_4steps.fp32.safetensors")
pos = [[torch.cat([d[f"prompt_embeds_{i}"] for i in range(4)], -1),
        {"attention_mask": d["prompt_mask"].long(), "num_layers_stacked": 4}]]
neg = [[torch.zeros(1, 0, pos[0][0].shape[-1]), {"attention_mask": torch.zeros(1, 0, dtype=torch.long),
                                                   "num_layers_stacked": 4}]]
lat = {"samples": torch.zeros(1, 128, 4, 6)}
(ours,) = N["LensModelLoader"]().load("tiny", "fp32", "auto")
a = N["LensSampler"]().sample(ours, pos, neg, lat, 7, steps, cfg, 1.0)[0]["samples"]
res["ours_finite"] = bool(torch.isfinite(a).all())
if res["native"]:
    import nodes as core_nodes
    (native,) = core_nodes.UNETLoader().load_unet("lens_tiny_fp32.safetensors", "default")
    b = N["LensSampler"]().sample(native, pos, neg, lat, 7, steps, cfg, 1.0)[0]["samples"]
    res["native_vs_ours"] = float((b - a).norm() / a.norm())
print(json.dumps(res))
'''


def test_fresh_sampler_defaults_run_on_both_model_kinds(golden_dir, tmp_path):
    """LensSampler with its fresh-node steps/cfg (Lens 20 / 5) on the pack's LENS_MODEL and on ComfyUI's native
    Lens MODEL (UNETLoader; 0.33+): both run, and give the same latents."""
    res = run_script(DEFAULTS, tmp_path, golden_dir)
    assert res["defaults"] == [20, 5.0] and res["ours_finite"]
    assert native_or_skip(res)["native_vs_ours"] < 1e-5
