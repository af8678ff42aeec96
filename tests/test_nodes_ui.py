"""What a ComfyUI user meets first (issue 24 part 5), against the stand-in: readable errors, the sampler's fresh
defaults, LensEmptyLatent's preset sizes for the UI helper, and the shipped workflows' model guidance. The same
in the real UI: README "Checked in the browser"; over real ComfyUI's API: tests/test_comfyui_ui.py."""
from __future__ import annotations

import json
import pathlib
import re
import sys

import pytest
import torch

from test_nodes import PACK_NAME, import_pack, models_dir, pack, run  # noqa: F401  (fixtures)
from test_workflows import CORE_LOADER_FOLDERS, WORKFLOWS

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# errors: one readable line with a builtin type


def test_lora_error_reaches_comfyui_as_a_builtin_one_liner(pack, models_dir):  # noqa: F811
    import folder_paths
    from safetensors.torch import save_file

    loras = models_dir / "loras"
    loras.mkdir(exist_ok=True)
    if not hasattr(folder_paths, "set_models_dir"):
        folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8)},
              str(loras / "flux_ui.safetensors"))
    (model,) = run(pack, "LensModelLoader", model_name="Lens-tiny", weight_dtype="fp32", variant="auto")
    with pytest.raises(ValueError) as exc:
        run(pack, "LensLoraLoader", model=model, lora_name="flux_ui.safetensors", strength=1.0)
    # what ComfyUI's execution reports as exception_type (execution.full_type_name): "ValueError", not the
    # pack's module path; the pack's own class stays attached for the console traceback
    assert type(exc.value) is ValueError and type(exc.value).__module__ == "builtins"
    lora_error = sys.modules[f"{PACK_NAME}.lens_core.lora"].LoraError
    assert isinstance(exc.value.__cause__, lora_error)
    assert "flux_ui.safetensors" in str(exc.value) and "FLUX" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_readable_keeps_builtins_and_comfy_errors_and_flattens_pack_errors(pack):  # noqa: F811
    import comfy.model_management as mm

    errors = sys.modules[f"{PACK_NAME}.nodes.errors"]
    checkpoint_error = sys.modules[f"{PACK_NAME}.lens_core.checkpoints"].CheckpointError
    plain = errors.readable(checkpoint_error("model.safetensors: broken header\n  expected 8 bytes"))
    assert type(plain) is ValueError and str(plain) == "model.safetensors: broken header expected 8 bytes"
    assert errors.readable(ValueError("x")) is None
    assert errors.readable(FileNotFoundError("x")) is None
    assert errors.readable(mm.InterruptProcessingException()) is None
    # every registered node's entry point is wrapped
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert getattr(getattr(cls, cls.FUNCTION), "_lens_readable", False), name


# ---------------------------------------------------------------------------------------------------------
# LensSampler: real numbers on a fresh node


def test_fresh_sampler_shows_official_settings_that_work_on_every_model_kind(pack):  # noqa: F811
    from lens_core.config import variant_defaults

    req = pack.NODE_CLASS_MAPPINGS["LensSampler"].INPUT_TYPES()["required"]
    steps, cfg = req["steps"][1]["default"], req["cfg"][1]["default"]
    assert (steps, cfg) == variant_defaults("lens") == (20, 5.0)
    # 0 = auto stays available (old workflows) and is explained in the tooltips
    assert req["steps"][1]["min"] == 0 and "0 = auto" in req["steps"][1]["tooltip"]
    assert "0 = auto" in req["cfg"][1]["tooltip"]


# ---------------------------------------------------------------------------------------------------------
# LensEmptyLatent: the UI helper's size table is the core's


def test_empty_latent_bucket_table_matches_the_node(pack):  # noqa: F811
    from lens_core.config import ASPECT_LABELS

    cls = pack.NODE_CLASS_MAPPINGS["LensEmptyLatent"]
    table = cls.INPUT_TYPES()["required"]["aspect_ratio"][1]["lens_buckets"]
    assert set(table) == {"1440", "1024"}
    json.dumps(table)                                   # served in /object_info
    for base, sizes in table.items():
        assert set(sizes) == set(ASPECT_LABELS)
        for aspect, (w, h) in sizes.items():
            (latent,) = run(pack, "LensEmptyLatent", aspect_ratio=aspect, base_resolution=int(base), width=64,
                            height=64, batch_size=1)
            assert tuple(latent["samples"].shape[2:]) == (h // 16, w // 16), (base, aspect)
    js = (REPO / "web" / "lens_nodes.js").read_text()
    assert "lens_buckets" in js and "LensEmptyLatent" in js
    init = (REPO / "__init__.py").read_text()
    assert re.search(r'^WEB_DIRECTORY = "\./web"$', init, flags=re.M)


# ---------------------------------------------------------------------------------------------------------
# shipped workflows: the model files, their folders and downloads, in front of the user

LOADERS = {"LensModelLoader": "diffusion_models", "LensTextEncoderLoader": "text_encoders", "LensVAELoader": "vae",
           **CORE_LOADER_FOLDERS}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_leads_to_model_files_and_folders(path):
    wf = json.loads(path.read_text())
    (note,) = [n for n in wf["nodes"] if n["type"] == "MarkdownNote"]
    text = note["widgets_values"][0]
    loaders = [n for n in wf["nodes"] if n["type"] in LOADERS]
    assert loaders
    for node in loaders:
        folder = LOADERS[node["type"]]
        assert f"(models/{folder})" in node["title"], node["title"]
        (entry,) = node["properties"]["models"]
        assert entry["directory"] == folder
        # the note names the file, links its download and names the folder
        assert f"[{entry['name']}]({entry['url']})" in text
        assert f"`models/{folder}/`" in text
    # the note is the first thing in view: left of everything, inside the saved view
    assert note["pos"][0] < min(n["pos"][0] for n in wf["nodes"] if n is not note)
    ds = wf["extra"]["ds"]
    assert (note["pos"][0] + ds["offset"][0]) * ds["scale"] >= 40 and (note["pos"][1] + ds["offset"][1]) * ds["scale"] >= 60
