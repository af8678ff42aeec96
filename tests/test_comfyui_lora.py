"""LensLoraLoader inside a real ComfyUI (marked ``comfyui``; needs COMFYUI_DIR, see test_comfyui_integration).

Runs in-process with the real comfy modules (``comfyui_headless.sh python``): the pack's nodes build graphs
on the tiny golden pipeline, ComfyUI's ModelPatcher applies the LoRA patches when it loads the model, and the
results are compared with lens_core.lora applied to a copy of the DiT (an independent path: lens_core merges
the weights itself) and with the base images. ComfyUI's own LoraLoaderModelOnly on the pack's MODEL (musubi and
``diffusion_model.`` PEFT keys) is compared with LensLoraLoader on the same files.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

import lora_fixtures as lf
from conftest import comfyui_dir_or_skip
from test_comfyui_integration import REPO, TOOL

pytestmark = pytest.mark.comfyui

SCRIPT = r'''
import copy, importlib.util, json, sys, torch
repo, models, loras = sys.argv[1], sys.argv[2], sys.argv[3]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management as mm, folder_paths
folder_paths.add_model_folder_path("diffusion_models", models, is_default=True)
folder_paths.add_model_folder_path("loras", loras, is_default=True)
spec = importlib.util.spec_from_file_location("lens_nodes_lora", repo + "/__init__.py",
                                              submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules["lens_nodes_lora"] = pack; spec.loader.exec_module(pack)
from lens_nodes_lora.lens_core import lora as lo
from lens_nodes_lora.nodes import bridge
N = pack.NODE_CLASS_MAPPINGS
L = N["LensLoraLoader"]()
model, te, vae = N["LensCheckpointLoader"]().load("Lens-tiny")
enc = N["LensTextEncode"]()
(pos,), (neg,) = enc.encode(te, "a red cube on a wooden table"), enc.encode(te, "")
(lat,) = N["LensEmptyLatent"]().generate("custom", 1024, 96, 64, 1)

def run(m):
    return N["LensSampler"]().sample(m, pos, neg, lat, 3, 4, 5.0, 1.0)[0]["samples"]

def image(m):
    return N["LensVAEDecode"]().decode(vae, {"samples": run(m)}, "auto")[0]

def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())

def reference(m, items):
    """lens_core's own merge on a private copy of the (unpatched) DiT, run through the same sampler node."""
    mm.unload_all_models()
    mod = copy.deepcopy(m.model.diffusion_model)
    for name, s in items:
        lo.apply_lora(mod, loras + "/" + name, s)
    info = m.model.lens
    return run(bridge.build_pack_model(mod, info.variant, info.dtype, info.path))

out = {}
base_img = image(model)
base = run(model)
(a,) = L.apply(model, "a.safetensors", 1.0)
(b,) = L.apply(model, "b_loha.safetensors", 0.7)
(ab,) = L.apply(a, "b_loha.safetensors", 0.7)
(a0,) = L.apply(model, "a.safetensors", 0.0)
ra, rb, ra2, rab = run(a), run(b), run(a), run(ab)
img_a = image(a)
out["lora_changes_image"] = rel(img_a, base_img)
out["base_after_lora_bit_equal"] = bool(torch.equal(image(model), base_img))
out["strength0_bit_equal"] = bool(torch.equal(run(a0), base))
out["branch_a_repeat_equal"] = bool(torch.equal(ra, ra2))
out["branch_b_differs"] = rel(rb, ra)
out["a_vs_lens_core"] = rel(ra, reference(model, [("a.safetensors", 1.0)]))
out["b_vs_lens_core"] = rel(rb, reference(model, [("b_loha.safetensors", 0.7)]))
out["stacked_vs_lens_core"] = rel(rab, reference(model, [("a.safetensors", 1.0), ("b_loha.safetensors", 0.7)]))
out["base_weights_untouched"] = bool(torch.equal(run(model), base))
# partial (lowvram) load of the LoRA'd model: ComfyUI patches the layers it leaves offloaded per call
mm.unload_all_models()
a.load(a.load_device, lowvram_model_memory=1)
out["lowvram_patched_layers"] = sum(1 for mod in a.model.modules() if getattr(mod, "weight_function", None))
low = N["LensSampler"]().sample(a, pos, neg, lat, 3, 4, 5.0, 1.0)[0]["samples"]
out["lowvram_vs_full"] = rel(low, ra)
out["lowvram_bit_equal"] = bool(torch.equal(low, ra))
# 8-bit (fp8) storage: per-call deltas through object patches, vs lens_core's per-call path
mm.unload_all_models()
(m8,) = N["LensModelLoader"]().load("lens_bf16.safetensors", "fp8_e4m3fn", "auto")
base8 = run(m8)
(a8,) = L.apply(m8, "a.safetensors", 1.0)
ra8 = run(a8)
out["fp8_lora_changes"] = rel(ra8, base8)
out["fp8_vs_lens_core"] = rel(ra8, reference(m8, [("a.safetensors", 1.0)]))
out["fp8_base_after_bit_equal"] = bool(torch.equal(run(m8), base8))
# ComfyUI's own LoraLoaderModelOnly on the pack's MODEL: its generic key map (diffusion_model.X <- lora_unet_X /
# diffusion_model.X) covers musubi (kohya) and diffusion_model.-prefixed PEFT files, since the pack's DiT uses the
# official module names; the patches go through ComfyUI's merge route (add_patches), fp8 storage included
import nodes as core
native_loader = core.LoraLoaderModelOnly()
for tag, m in (("bf16", model), ("fp8", m8)):
    for fmt in ("a.safetensors", "a_peft.safetensors"):
        mm.unload_all_models()
        want = run(L.apply(m, fmt, 1.0)[0])
        (na,) = native_loader.load_lora_model_only(m, fmt, 1.0)
        key = tag + "_native_" + fmt.split(".")[0]
        out[key + "_patched_keys"] = len(na.patches)
        out[key + "_vs_lens"] = rel(run(na), want)
mm.unload_all_models()
out["native_base_after_bit_equal"] = bool(torch.equal(run(model), base)) and bool(torch.equal(run(m8), base8))
print(json.dumps(out))
'''


def test_lora_loader_in_real_comfyui(golden_dir, pipeline_dir, tmp_path):
    comfy_dir = comfyui_dir_or_skip()
    import torch

    from fixtures import dit_config, write_comfy_dit_bf16
    from lens_core.dit import LensTransformer

    models, loras = tmp_path / "diffusion_models", tmp_path / "loras"
    models.mkdir()
    loras.mkdir()
    os.symlink(pipeline_dir, models / "Lens-tiny")
    write_comfy_dit_bf16(models / "lens_bf16.safetensors", golden_dir, which="pipeline")
    with torch.device("meta"):
        dit = LensTransformer(dit_config(golden_dir, "pipeline"))
    names = lf.target_names(dit)
    factors_a = lf.random_factors(dit, names, rank=4, alpha=2.0, seed=1, scale=0.2)
    lf.write(loras / "a.safetensors", "kohya", factors_a)
    # PEFT keys with the diffusion_model. prefix; alpha = rank, because ComfyUI's loader reads alpha only from
    # `.alpha` tensors, never from PEFT's lora_adapter_metadata (README "Native nodes")
    lf.write(loras / "a_peft.safetensors", "diffusion-model",
             lf.random_factors(dit, names, rank=4, alpha=4.0, seed=3, scale=0.2))
    lf.write(loras / "b_loha.safetensors", "onetrainer-loha",
             lf.random_factors(dit, names[:8], kind="loha", rank=2, alpha=1.0, seed=2, scale=0.1))
    script = tmp_path / "lora_inproc.py"
    script.write_text(SCRIPT)
    res = subprocess.run(["bash", str(TOOL), "python", comfy_dir, str(script), str(REPO), str(models), str(loras)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    print(r)
    assert r["lora_changes_image"] > 1e-3 and r["branch_b_differs"] > 1e-3 and r["fp8_lora_changes"] > 1e-3
    assert r["base_after_lora_bit_equal"] and r["strength0_bit_equal"] and r["base_weights_untouched"]
    assert r["branch_a_repeat_equal"] and r["fp8_base_after_bit_equal"]
    for k in ("a_vs_lens_core", "b_vs_lens_core", "stacked_vs_lens_core", "fp8_vs_lens_core", "lowvram_vs_full"):
        assert r[k] <= 1e-5, (k, r[k])
    assert r["lowvram_patched_layers"] > 0
    # ComfyUI's own LoraLoaderModelOnly on the pack's MODEL (musubi / diffusion_model. PEFT keys): every target
    # patched, the same latents as LensLoraLoader (bf16 file and fp8 storage), the base model untouched after
    for tag in ("bf16", "fp8"):
        for f in ("a", "a_peft"):
            assert r[f"{tag}_native_{f}_patched_keys"] == len(names), (tag, f, r[f"{tag}_native_{f}_patched_keys"])
            assert r[f"{tag}_native_{f}_vs_lens"] <= 1e-5, (tag, f, r[f"{tag}_native_{f}_vs_lens"])
    assert r["native_base_after_bit_equal"]


# ---------------------------------------------------------------------------------------------------------
# over the HTTP API of a running ComfyUI (the server fixture of test_comfyui_integration)

from test_comfyui_integration import _node_id, _workflow_prompt, object_info, server  # noqa: E402,F401


def _image_bytes(server, hist):   # noqa: F811
    from PIL import Image

    (images,) = [o["images"] for o in hist["outputs"].values() if "images" in o]
    img = images[0]
    with Image.open(server.base / "output" / img["subfolder"] / img["filename"]) as im:
        return im.tobytes()


def test_lora_graph_over_http(server, object_info, golden_dir):   # noqa: F811
    """t2i graph → with LensLoraLoader the image changes → without it again, the base image bit for bit (the
    sampler really re-runs: ComfyUI unpatches the LoRA'd clone)."""
    import torch

    from fixtures import dit_config
    from lens_core.dit import LensTransformer

    loras = server.base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        dit = LensTransformer(dit_config(golden_dir, "pipeline"))
    lf.write(loras / "http_style.safetensors", "videox",
             lf.random_factors(dit, lf.target_names(dit), rank=4, alpha=2.0, seed=5, scale=0.2))
    info = server.get("/object_info/LensLoraLoader")
    assert "http_style.safetensors" in info["LensLoraLoader"]["input"]["required"]["lora_name"][0]

    base_prompt = _workflow_prompt("lens_turbo_t2i", object_info, LensSampler={"seed": 777})
    loader, sampler = _node_id(base_prompt, "LensModelLoader"), _node_id(base_prompt, "LensSampler")
    with_lora = json.loads(json.dumps(base_prompt))
    with_lora["990"] = {"class_type": "LensLoraLoader",
                        "inputs": {"model": [loader, 0], "lora_name": "http_style.safetensors", "strength": 1.0}}
    with_lora[sampler]["inputs"]["model"] = ["990", 0]
    results = []
    for prompt in (base_prompt, with_lora, base_prompt):
        pid = server.submit(prompt)
        status, hist = server.finish(pid)
        assert status == "execution_success", hist and hist["status"]
        ran = [e["data"]["node"] for k, e in server.ws.for_prompt(pid)
               if k == "json" and e["type"] == "executing" and e["data"]["node"]]
        results.append((_image_bytes(server, hist), sampler in ran))
    (a, _), (b, ran_b), (c, ran_c) = results
    assert ran_b and ran_c
    assert a != b and a == c


def test_lora_list_survives_symlink_loops_over_http(server):   # noqa: F811
    """A symlink loop in models/loras (a LoRA collection linked into itself) must not hang the node list: the
    pack lists LoRA files loop-safely (ComfyUI's own recursive listing follows each loop to the OS's limit)."""
    loras = server.base / "models" / "loras"
    loopy = loras / "collection"
    (loopy / "sub").mkdir(parents=True, exist_ok=True)
    (loopy / "sub" / "looped_style.safetensors").write_bytes(b"x")
    links = [(loopy / "again", loras), (loopy / "sub" / "up", loopy), (loopy / "sub" / "root", loras),
             (loras / "self", loras)]
    for link, target in links:
        os.symlink(target, link)
    try:
        t0 = time.monotonic()
        info = server.get("/object_info/LensLoraLoader")
        names = info["LensLoraLoader"]["input"]["required"]["lora_name"][0]
        assert "collection/sub/looped_style.safetensors" in names
        assert not [n for n in names if "/again/" in n or "/up/" in n or n.startswith("self/")], names
        assert time.monotonic() - t0 < 30
    finally:
        for link, _ in links:
            link.unlink()


def test_lora_error_reaches_the_ui_as_one_readable_line(server, object_info):   # noqa: F811
    """A LoRA of another model family: the execution error names the file and the problem with a builtin
    exception type (the UI shows ``ValueError: …``, not ``custom_nodes.lens-nodes.lens_core.lora.LoraError``)."""
    import torch
    from safetensors.torch import save_file

    from test_comfyui_integration import _expect_error

    loras = server.base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 4)},
              str(loras / "flux_style.safetensors"))
    prompt = _workflow_prompt("lens_turbo_t2i", object_info, LensSampler={"seed": 778})
    loader, sampler = _node_id(prompt, "LensModelLoader"), _node_id(prompt, "LensSampler")
    prompt["991"] = {"class_type": "LensLoraLoader",
                     "inputs": {"model": [loader, 0], "lora_name": "flux_style.safetensors", "strength": 1.0}}
    prompt[sampler]["inputs"]["model"] = ["991", 0]
    err = _expect_error(server, prompt, "flux_style.safetensors", "FLUX")
    assert err["node_type"] == "LensLoraLoader" and err["exception_type"] == "ValueError"
