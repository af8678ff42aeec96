"""What a ComfyUI user meets first, in a real ComfyUI (marked ``comfyui``; needs COMFYUI_DIR): the UI helper is
served, the preset table reaches /object_info, and a fresh LensSampler's defaults run on both model kinds.
(The browser check of the same: README "Checked in the browser".)"""
from __future__ import annotations

import urllib.request

import pytest

from comfyui_run import run_script
from test_comfyui_integration import REPO, object_info, server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.comfyui


def test_ui_helper_is_served(server, object_info):  # noqa: F811
    assert "/extensions/lens-nodes/lens_nodes.js" in server.get("/extensions")
    with urllib.request.urlopen(server.url("/extensions/lens-nodes/lens_nodes.js"), timeout=60) as r:
        js = r.read().decode()
    assert js == (REPO / "web" / "lens_nodes.js").read_text()
    spec = object_info["LensEmptyLatent"]["input"]["required"]["aspect_ratio"]
    assert spec[1]["lens_buckets"]["1024"]["16:9"] == [1376, 768]


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
    if not res["native"]:
        pytest.skip("this ComfyUI has no native Lens model (comfy.model_base.Lens arrived in ComfyUI 0.33)")
    assert res["native_vs_ours"] < 1e-5
