"""The example workflows (workflows/*.json, UI format): only existing node types, widget values that validate,
links that type-check, and the conversion to ComfyUI's API format used by the real-ComfyUI tests.

``object_info`` here is built from the pack's own node classes plus the input specs of the few core ComfyUI
nodes the workflows use (ComfyUI 0.3.64: SaveImage, UpscaleModelLoader, ImageUpscaleWithModel, ImageScale).
The real-ComfyUI test (test_comfyui_integration.py) validates the same files against a live /object_info.
"""
from __future__ import annotations

import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
UI_ONLY_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}

# Input specs of the core nodes used by the workflows, as ComfyUI 0.3.64's /object_info reports them
# (nodes.py SaveImage / ImageScale, comfy_extras/nodes_upscale_model.py).
CORE_OBJECT_INFO = {
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
                  "input_order": {"required": ["images", "filename_prefix"]}, "output": []},
    "UpscaleModelLoader": {"input": {"required": {"model_name": [["4x-UltraSharp.pth"]]}},
                           "input_order": {"required": ["model_name"]}, "output": ["UPSCALE_MODEL"]},
    "ImageUpscaleWithModel": {"input": {"required": {"upscale_model": ["UPSCALE_MODEL"], "image": ["IMAGE"]}},
                              "input_order": {"required": ["upscale_model", "image"]}, "output": ["IMAGE"]},
    "ImageScale": {"input": {"required": {
        "image": ["IMAGE"],
        "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]],
        "width": ["INT", {"default": 512, "min": 0, "max": 16384, "step": 1}],
        "height": ["INT", {"default": 512, "min": 0, "max": 16384, "step": 1}],
        "crop": [["disabled", "center"]]}},
        "input_order": {"required": ["image", "upscale_method", "width", "height", "crop"]}, "output": ["IMAGE"]},
    # nodes.py LoadImage (input/example.png ships with ComfyUI) and SetLatentNoiseMask, as in 0.33
    "LoadImage": {"input": {"required": {"image": [["example.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}, "output": ["IMAGE", "MASK"]},
    "SetLatentNoiseMask": {"input": {"required": {"samples": ["LATENT"], "mask": ["MASK"]}},
                           "input_order": {"required": ["samples", "mask"]}, "output": ["LATENT"]},
}
# The native Lens nodes of ComfyUI 0.33 used by workflows/lens_native_official.json (its /object_info; nodes.py,
# comfy_extras/nodes_cfg.py, comfy_extras/nodes_custom_sampler.py; long combos shortened).
CORE_OBJECT_INFO.update({
    "UNETLoader": {"input": {"required": {"unet_name": [["lens_bf16.safetensors"]],
                                          "weight_dtype": [["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]]}},
                   "input_order": {"required": ["unet_name", "weight_dtype"]}, "output": ["MODEL"]},
    "CLIPLoader": {"input": {"required": {"clip_name": [["gpt_oss_20b_nvfp4.safetensors"]],
                                          "type": [["stable_diffusion", "flux2", "lens"]]},
                             "optional": {"device": [["default", "cpu"]]}},
                   "input_order": {"required": ["clip_name", "type"], "optional": ["device"]}, "output": ["CLIP"]},
    "VAELoader": {"input": {"required": {"vae_name": [["flux2-vae.safetensors", "pixel_space"]]}},
                  "input_order": {"required": ["vae_name"]}, "output": ["VAE"]},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {}], "clip": ["CLIP", {}]}},
                       "input_order": {"required": ["text", "clip"]}, "output": ["CONDITIONING"]},
    "EmptyLatentImage": {"input": {"required": {
        "width": ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}],
        "height": ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}],
        "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}]}},
        "input_order": {"required": ["width", "height", "batch_size"]}, "output": ["LATENT"]},
    "VAEDecode": {"input": {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}},
                  "input_order": {"required": ["samples", "vae"]}, "output": ["IMAGE"]},
    "CFGNorm": {"input": {"required": {"model": ["MODEL", {}],
                                       "strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}]},
                          "optional": {"pre_cfg": ["BOOLEAN", {"default": False}]}},
                "input_order": {"required": ["model", "strength"], "optional": ["pre_cfg"]}, "output": ["MODEL"]},
    "KSamplerSelect": {"input": {"required": {"sampler_name": ["COMBO", {"options": ["euler", "euler_ancestral"]}]}},
                       "input_order": {"required": ["sampler_name"]}, "output": ["SAMPLER"]},
    "SamplerCustom": {"input": {"required": {
        "model": ["MODEL", {}], "add_noise": ["BOOLEAN", {"default": True}],
        "noise_seed": ["INT", {"default": 0, "min": 0, "max": 18446744073709551615, "control_after_generate": True}],
        "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}],
        "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}], "sampler": ["SAMPLER", {}],
        "sigmas": ["SIGMAS", {}], "latent_image": ["LATENT", {}]}},
        "input_order": {"required": ["model", "add_noise", "noise_seed", "cfg", "positive", "negative", "sampler",
                                     "sigmas", "latent_image"]}, "output": ["LATENT", "LATENT"]},
})


def object_info_of(mappings) -> dict:
    """/object_info-like entries for V1 node classes (the fields the converter and the checks use)."""
    info = {}
    for name, cls in mappings.items():
        inputs = cls.INPUT_TYPES()
        info[name] = {
            "input": {k: {n: list(v) for n, v in inputs.get(k, {}).items()} for k in ("required", "optional")
                      if k in inputs},
            "input_order": {k: list(inputs[k]) for k in ("required", "optional") if k in inputs},
            "output": list(cls.RETURN_TYPES),
        }
    return info


def _is_widget(spec) -> bool:
    t = spec[0]
    return isinstance(t, list) or t in WIDGET_TYPES


def _has_control_widget(name, spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


def _has_upload_widget(spec) -> bool:
    """An input with ``image_upload`` gets a frontend upload button whose value ("image") follows it."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("image_upload"))


def widget_values(node: dict, info: dict) -> dict:
    """Map a UI node's positional ``widgets_values`` to input names (skipping the frontend's
    control_after_generate values); inputs fed by a link are not widgets."""
    linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
    values = list(node.get("widgets_values") or [])
    out, pos = {}, 0
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            spec = info["input"][section][name]
            if not _is_widget(spec) or name in linked:
                continue
            if pos >= len(values):
                if section == "required":
                    raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name!r}")
                continue
            out[name] = values[pos]
            pos += 1
            if _has_control_widget(name, spec) or _has_upload_widget(spec):
                pos += 1
    if pos != len(values):
        raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values, {pos} expected")
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow into an API prompt (what the editor's "Export (API)" produces)."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY_NODES or node.get("mode", 0) in (2, 4):
            continue
        info = object_info[node["type"]]
        inputs = widget_values(node, info)
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, slot, _dst, _dslot, _t = links[inp["link"]]
                inputs[inp["name"]] = [str(src), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def validate_value(name, spec, value) -> str | None:
    """None if ``value`` is acceptable for the input ``spec`` the way ComfyUI's validation checks it."""
    t = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(t, list):
        return None if value in t else f"{name}={value!r} not in {t}"
    if t == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name}={value!r} is not an INT"
    elif t == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{name}={value!r} is not a FLOAT"
    elif t == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not a STRING"
    elif t == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a BOOLEAN"
    if "min" in opts and value < opts["min"]:
        return f"{name}={value} < min {opts['min']}"
    if "max" in opts and value > opts["max"]:
        return f"{name}={value} > max {opts['max']}"
    return None


def types_match(out_type: str, in_type) -> bool:
    """ComfyUI's link rule (comfy_execution/validation.py, 0.3.64 and 0.33): equal, or comma unions overlapping."""
    if out_type == in_type:
        return True
    if not isinstance(in_type, str):
        return False
    return bool({t.strip() for t in out_type.split(",")} & {t.strip() for t in in_type.split(",")})


def check_workflow(workflow: dict, object_info: dict, check_combos: bool = True) -> list[str]:
    """All problems found in a UI workflow against ``object_info`` (empty list = valid)."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY_NODES:
            continue
        if node["type"] not in object_info:
            problems.append(f"node {node['id']}: unknown node type {node['type']!r}")
            continue
        info = object_info[node["type"]]
        try:
            values = widget_values(node, info)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                if name in values:
                    if isinstance(spec[0], list) and not check_combos:
                        continue
                    err = validate_value(name, spec, values[name])
                    if err:
                        problems.append(f"node {node['id']} ({node['type']}): {err}")
                elif section == "required" and not _is_widget(spec):
                    linked = [i for i in node.get("inputs", []) if i["name"] == name and i.get("link") is not None]
                    if not linked:
                        problems.append(f"node {node['id']} ({node['type']}): required input {name!r} not connected")
    for lid, src, sslot, dst, dslot, typ in workflow["links"]:
        out_type = object_info[nodes[src]["type"]]["output"][sslot]
        dst_node = nodes[dst]
        in_name = dst_node["inputs"][dslot]["name"]
        dst_info = object_info[dst_node["type"]]["input"]
        spec = dst_info.get("required", {}).get(in_name) or dst_info.get("optional", {}).get(in_name)
        if spec is None or not types_match(out_type, spec[0]) or typ != out_type:
            problems.append(f"link {lid}: {nodes[src]['type']} output {sslot} ({out_type}) -> "
                            f"{dst_node['type']}.{in_name} ({spec and spec[0]}) does not type-check")
    return problems


@pytest.fixture(scope="module")
def pack_object_info():
    from test_nodes import import_pack

    info = object_info_of(import_pack().NODE_CLASS_MAPPINGS)
    info.update(CORE_OBJECT_INFO)
    return info


def test_three_workflows_exist():
    names = {p.stem for p in WORKFLOWS}
    assert {"lens_t2i", "lens_turbo_t2i", "lens_hires", "lens_inpaint"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_is_valid_ui_format(path, pack_object_info):
    wf = json.loads(path.read_text())
    for key in ("nodes", "links", "last_node_id", "last_link_id", "version"):
        assert key in wf, key
    assert wf["last_node_id"] >= max(n["id"] for n in wf["nodes"])
    # the fields the editor's workflow schema requires (ComfyUI frontend 1.27, zComfyWorkflow / zComfyNode)
    assert isinstance(wf["version"], (int, float)) and isinstance(wf["last_link_id"], int)
    assert wf["last_link_id"] >= max((l[0] for l in wf["links"]), default=0)
    for n in wf["nodes"]:
        assert isinstance(n["id"], int) and isinstance(n["type"], str)
        assert len(n["pos"]) == 2 and len(n["size"]) == 2 and all(isinstance(v, (int, float)) for v in n["pos"] + n["size"])
        assert isinstance(n["flags"], dict) and isinstance(n["order"], int) and isinstance(n["mode"], int)
        assert isinstance(n["properties"], dict) and isinstance(n.get("widgets_values", []), list)
        for i in n.get("inputs", []):
            assert isinstance(i["name"], str) and isinstance(i["type"], str) and (i["link"] is None or isinstance(i["link"], int))
        for o in n.get("outputs", []):
            assert isinstance(o["name"], str) and isinstance(o["type"], str) and (o["links"] is None or isinstance(o["links"], list))
    for link in wf["links"]:
        assert len(link) == 6 and all(isinstance(v, int) for v in link[:5]) and isinstance(link[5], str)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids))
    # combos listing model files depend on the user's folders: checked for type only
    assert check_workflow(wf, pack_object_info, check_combos=False) == []
    # every combo of a Lens node that is not a file list validates exactly
    for node in wf["nodes"]:
        if node["type"] in UI_ONLY_NODES:
            continue
        info = pack_object_info[node["type"]]
        for name, value in widget_values(node, info).items():
            spec = info["input"].get("required", {}).get(name) or info["input"]["optional"][name]
            if isinstance(spec[0], list) and not name.endswith(("_name", "folder")):
                assert value in spec[0], (path.name, node["type"], name, value)


def test_workflow_settings(pack_object_info):
    def samplers(name):
        wf = json.loads((REPO / "workflows" / f"{name}.json").read_text())
        api = ui_to_api(wf, pack_object_info)
        return api, [n["inputs"] for n in api.values() if n["class_type"] == "LensSampler"]

    api, (s,) = samplers("lens_t2i")
    assert (s["steps"], s["cfg"], s["denoise"]) == (20, 5.0, 1.0)
    (lat,) = [n["inputs"] for n in api.values() if n["class_type"] == "LensEmptyLatent"]
    assert lat["base_resolution"] == 1440
    _, (s,) = samplers("lens_turbo_t2i")
    assert (s["steps"], s["cfg"]) == (4, 1.0)
    api, (base, hires) = samplers("lens_hires")
    assert base["denoise"] == 1.0 and abs(hires["denoise"] - 0.35) < 1e-9
    types = [n["class_type"] for n in api.values()]
    for t in ("UpscaleModelLoader", "ImageUpscaleWithModel", "LensVAEEncode", "SaveImage"):
        assert t in types
    (lat,) = [n["inputs"] for n in api.values() if n["class_type"] == "LensEmptyLatent"]
    assert lat["base_resolution"] == 1024


def test_native_official_workflow(pack_object_info):
    """The native template with the official schedule: LensSigmas (sized by the latent) instead of
    ModelSamplingFlux + BasicScheduler, CFGNorm pre_cfg on, SamplerCustom euler, Lens 20 steps CFG 5."""
    wf = json.loads((REPO / "workflows" / "lens_native_official.json").read_text())
    api = ui_to_api(wf, pack_object_info)
    by_type = {n["class_type"]: (k, n["inputs"]) for k, n in api.items() if n["class_type"] != "CLIPTextEncode"}
    assert "ModelSamplingFlux" not in by_type and "BasicScheduler" not in by_type
    assert by_type["CLIPLoader"][1]["type"] == "lens" and by_type["UNETLoader"][1]["unet_name"] == "lens_bf16.safetensors"
    assert by_type["CFGNorm"][1] == {"model": [by_type["UNETLoader"][0], 0], "strength": 1.0, "pre_cfg": True}
    sig = by_type["LensSigmas"][1]
    assert (sig["steps"], sig["denoise"], sig["latent"]) == (20, 1.0, [by_type["EmptyLatentImage"][0], 0])
    s = by_type["SamplerCustom"][1]
    assert s["model"] == [by_type["CFGNorm"][0], 0] and s["sigmas"] == [by_type["LensSigmas"][0], 0]
    assert s["cfg"] == 5.0 and s["add_noise"] is True
    assert by_type["KSamplerSelect"][1]["sampler_name"] == "euler"
    texts = [n["inputs"]["text"] for n in api.values() if n["class_type"] == "CLIPTextEncode"]
    assert len(texts) == 2 and "" in texts
    assert by_type["EmptyLatentImage"][1] == {"width": 1440, "height": 1440, "batch_size": 1}


def test_inpaint_workflow(pack_object_info):
    """LoadImage (image + mask) -> LensVAEEncode -> SetLatentNoiseMask -> LensSampler (denoise 1) -> decode."""
    wf = json.loads((REPO / "workflows" / "lens_inpaint.json").read_text())
    api = ui_to_api(wf, pack_object_info)
    by_type = {n["class_type"]: (k, n["inputs"]) for k, n in api.items()}
    load, _ = by_type["LoadImage"]
    enc, enc_in = by_type["LensVAEEncode"]
    _, mask_in = by_type["SetLatentNoiseMask"]
    _, smp = by_type["LensSampler"]
    assert enc_in["pixels"] == [load, 0] and mask_in == {"samples": [enc, 0], "mask": [load, 1]}
    assert smp["latent_image"] == [by_type["SetLatentNoiseMask"][0], 0]
    assert (smp["steps"], smp["cfg"], smp["denoise"]) == (20, 5.0, 1.0)


def test_converter_links_and_widgets(pack_object_info):
    wf = json.loads((REPO / "workflows" / "lens_t2i.json").read_text())
    api = ui_to_api(wf, pack_object_info)
    sampler = next(n for n in api.values() if n["class_type"] == "LensSampler")
    assert sampler["inputs"]["model"] == ["1", 0]
    assert sampler["inputs"]["seed"] == 42          # the "randomize" control value is skipped
    assert next(n for n in api.values() if n["class_type"] == "SaveImage")["inputs"]["images"] == ["8", 0]


def test_checker_catches_bad_values(pack_object_info):
    wf = json.loads((REPO / "workflows" / "lens_t2i.json").read_text())
    bad = json.loads(json.dumps(wf))
    for n in bad["nodes"]:
        if n["type"] == "LensEmptyLatent":
            n["widgets_values"][0] = "5:7"
        if n["type"] == "LensSampler":
            n["widgets_values"][3] = 99.0
    bad["nodes"].append({"id": 99, "type": "NoSuchNode", "inputs": [], "outputs": [], "widgets_values": []})
    problems = check_workflow(bad, pack_object_info)
    assert any("5:7" in p for p in problems)
    assert any("cfg=99.0" in p for p in problems)
    assert any("NoSuchNode" in p for p in problems)
