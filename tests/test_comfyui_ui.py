"""What a ComfyUI user meets first, in a real ComfyUI (marked ``comfyui``; needs COMFYUI_DIR): the UI helper is
served, the preset table reaches /object_info, and a fresh LensSampler's defaults run on both model kinds.
(The browser check of the same: README "Checked in the browser".)"""
from __future__ import annotations

import json
import os
import subprocess
import urllib.request

import pytest

from conftest import comfyui_dir_or_skip
from test_comfyui_integration import REPO, TOOL, object_info, server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.comfyui


def test_ui_helper_is_served(server, object_info):  # noqa: F811
    assert "/extensions/lens-nodes/lens_nodes.js" in server.get("/extensions")
    with urllib.request.urlopen(server.url("/extensions/lens-nodes/lens_nodes.js"), timeout=60) as r:
        js = r.read().decode()
    assert js == (REPO / "web" / "lens_nodes.js").read_text()
    spec = object_info["LensEmptyLatent"]["input"]["required"]["aspect_ratio"]
    assert spec[1]["lens_buckets"]["1024"]["16:9"] == [1376, 768]


DEFAULTS = r'''
import importlib.util, json, os, sys, torch
repo, golden, tmp = sys.argv[1], sys.argv[2], sys.argv[3]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_base, folder_paths
from safetensors.torch import load_file
spec = importlib.util.spec_from_file_location("lens_nodes_ui", repo + "/__init__.py",
                                              submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules["lens_nodes_ui"] = pack; spec.loader.exec_module(pack)
N = pack.NODE_CLASS_MAPPINGS
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
    comfy_dir = comfyui_dir_or_skip()
    script = tmp_path / "defaults.py"
    script.write_text(DEFAULTS)
    out = subprocess.run(["bash", str(TOOL), "python", comfy_dir, str(script), str(REPO), str(golden_dir),
                          str(tmp_path / "models")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(res)
    assert res["defaults"] == [20, 5.0] and res["ours_finite"]
    if not res["native"]:
        pytest.skip("this ComfyUI has no native Lens model (comfy.model_base.Lens arrived in ComfyUI 0.33)")
    assert res["native_vs_ours"] < 1e-5
