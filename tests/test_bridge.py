"""nodes/bridge/: small modules by concern, no edits of ComfyUI's loaded-model list, and the fixes made with the
split (loader dtype tooltips, loop-safe LoRA list, README node count). Stand-in comfy; the real-ComfyUI side of
the LoRA list: tests/test_comfyui_lora.py."""
from __future__ import annotations

import ast
import os
import pathlib
import re
import sys
import threading
import time

import pytest
import torch

from test_nodes import PACK_NAME, import_pack, models_dir, pack, run  # noqa: F401  (fixtures)

REPO = pathlib.Path(__file__).resolve().parents[1]
BRIDGE = REPO / "nodes" / "bridge"


def test_bridge_modules_are_small_and_never_edit_the_loaded_model_list():
    modules = sorted(BRIDGE.glob("*.py"))
    assert {p.stem for p in modules} >= {"ops", "devices", "handles", "patchers", "folders", "progress", "lora",
                                         "native"}
    for p in modules:
        assert len(p.read_text().splitlines()) < 200, p.name
    # nothing in the pack touches comfy.model_management.current_loaded_models (reads included)
    for p in list((REPO / "nodes").rglob("*.py")) + list((REPO / "lens_core").rglob("*.py")):
        tree = ast.parse(p.read_text())
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | \
            {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert "current_loaded_models" not in names, p
    # ComfyUI is imported only by the bridge package
    for p in (REPO / "nodes").glob("*.py"):
        tree = ast.parse(p.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
            {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert not imported & {"comfy", "folder_paths", "latent_preview"}, p


def test_every_bridge_function_is_used():
    """No dead code in the bridge (``vae_memory`` was): every public top-level function/class of a bridge module
    is used by the nodes or by another bridge module."""
    users = "\n".join(p.read_text() for p in (REPO / "nodes").rglob("*.py") if p.parent.name != "bridge" or
                      p.name == "__init__.py")
    for p in BRIDGE.glob("*.py"):
        if p.name == "__init__.py":
            continue
        tree = ast.parse(p.read_text())
        others = "\n".join(q.read_text() for q in BRIDGE.glob("*.py") if q != p and q.name != "__init__.py")
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                used = re.search(rf"bridge\.{node.name}\b", users) or re.search(rf"\b{node.name}\b", others) \
                    or len(re.findall(rf"\b{node.name}\b", p.read_text())) > 1
                assert used, f"{p.name}: {node.name} is not used"
    assert "vae_memory" not in (BRIDGE / "patchers.py").read_text()


def test_old_module_name_is_the_bridge_package(pack):  # noqa: F811
    import importlib

    old = importlib.import_module(f"{PACK_NAME}.nodes.comfy_bridge")
    assert old is sys.modules[f"{PACK_NAME}.nodes.bridge"]
    assert old.with_lora is old.lora.with_lora and old.load is old.patchers.load


def test_readme_lists_every_registered_node(pack):  # noqa: F811
    readme = (REPO / "README.md").read_text()
    nodes = set(pack.NODE_CLASS_MAPPINGS)
    table = set(re.findall(r"^\| `(Lens\w+)` \|", readme, flags=re.M))
    assert table == nodes
    words = {"nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13}
    for count in re.findall(r"all (\w+) nodes", readme):
        n = words.get(count, int(count) if count.isdigit() else None)
        assert n == len(nodes), f"README says 'all {count} nodes'; {len(nodes)} are registered"


def test_default_weight_dtype_is_the_compute_dtype_not_the_files(pack, models_dir, golden_dir):  # noqa: F811
    """The tooltip says what the loader does: 'default' stores the DiT in ComfyUI's compute dtype (fp32 on the
    CPU), not in the file's dtype (bf16 here)."""
    from fixtures import write_comfy_dit_bf16

    bridge = sys.modules[f"{PACK_NAME}.nodes.bridge"]
    write_comfy_dit_bf16(models_dir / "diffusion_models" / "tooltip_bf16.safetensors", golden_dir, which="pipeline")
    (model,) = run(pack, "LensModelLoader", model_name="tooltip_bf16.safetensors", weight_dtype="default",
                   variant="auto")
    cdt = bridge.compute_dtype("diffusion", bridge.devices("diffusion")[0])
    assert cdt != torch.bfloat16
    assert {p.dtype for p in model.model.diffusion_model.parameters()} == {cdt}
    (model16,) = run(pack, "LensModelLoader", model_name="tooltip_bf16.safetensors", weight_dtype="bf16",
                     variant="auto")
    assert {p.dtype for p in model16.model.diffusion_model.parameters()} == {torch.bfloat16}
    for name in ("LensModelLoader", "LensCheckpointLoader"):
        tip = pack.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["required"]["weight_dtype"][1]["tooltip"]
        assert "file's dtype" not in tip and "as stored)" not in tip
        assert "'default' = the dtype ComfyUI computes in on this device" in tip


def test_lora_list_terminates_on_symlink_loops(pack, tmp_path):  # noqa: F811
    import folder_paths

    if not hasattr(folder_paths, "set_models_dir"):
        pytest.skip("real ComfyUI importable: its folder_paths is not redirected here (see test_comfyui_lora)")
    bridge = sys.modules[f"{PACK_NAME}.nodes.bridge"]
    old = folder_paths.models_dir
    root = tmp_path / "models" / "loras"
    (root / "styles" / "deep").mkdir(parents=True)
    for rel in ("a.safetensors", "styles/b.sft", "styles/deep/c.safetensors", "notes.txt", "d.gguf"):
        (root / rel).write_bytes(b"x")
    for link, target in (("self", root), ("up", root), ("styles/loop", root / "styles"), ("styles/deep/root", root)):
        os.symlink(target, root / link)
    folder_paths.set_models_dir(tmp_path / "models")
    try:
        result = {}
        worker = threading.Thread(target=lambda: result.update(
            names=pack.NODE_CLASS_MAPPINGS["LensLoraLoader"].INPUT_TYPES()["required"]["lora_name"][0]), daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "LoRA listing did not terminate"
        assert result["names"] == ["a.safetensors", "styles/b.sft", "styles/deep/c.safetensors"]
        assert bridge.resolve_lora("styles/b.sft") == str(root / "styles" / "b.sft")
    finally:
        folder_paths.set_models_dir(old)


def test_folder_listing_is_read_once_until_a_folder_changes(pack, tmp_path, monkeypatch):  # noqa: F811
    """Node lists are built per /object_info and per executed node: each folder is walked once per listing (not
    once for files and again for diffusers folders), a second listing reads no directory while none changed, and
    a file added anywhere below (or a folder changed within the mtime tick of the last walk) is listed."""
    import folder_paths

    if not hasattr(folder_paths, "set_models_dir"):
        pytest.skip("real ComfyUI importable: its folder_paths is not redirected here")
    bridge = sys.modules[f"{PACK_NAME}.nodes.bridge"]
    models = tmp_path / "models"
    dm, loras = models / "diffusion_models", models / "loras"
    (dm / "sub").mkdir(parents=True)
    (dm / "Lens-x" / "transformer").mkdir(parents=True)
    (loras / "styles").mkdir(parents=True)
    for rel in ("diffusion_models/a.safetensors", "diffusion_models/sub/b.gguf", "diffusion_models/Lens-x/"
                "model_index.json", "diffusion_models/Lens-x/transformer/w.safetensors", "loras/l.safetensors"):
        (models / rel).write_bytes(b"x")
    os.symlink(dm, dm / "sub" / "loop")
    old = time.time() - 60
    for d in (dm, dm / "sub", dm / "Lens-x", dm / "Lens-x" / "transformer", loras, loras / "styles"):
        os.utime(d, (old, old))
    scans = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p=".": scans.append(str(p)) or real_scandir(p))
    old_models = folder_paths.models_dir
    folder_paths.set_models_dir(models)
    try:
        expected = ["a.safetensors", "sub/b.gguf", "Lens-x"]
        assert bridge.model_choices("diffusion_models") == expected
        # every real directory once (the symlink loop is dm again)
        assert sorted(scans) == sorted(str(d) for d in (dm, dm / "sub", dm / "Lens-x", dm / "Lens-x" / "transformer"))
        scans.clear()
        assert bridge.model_choices("diffusion_models") == expected
        assert bridge.model_choices("diffusion_models", files=False) == ["Lens-x"]
        assert bridge.lora_choices() == ["l.safetensors"]
        scans.clear()
        assert bridge.lora_choices() == ["l.safetensors"]
        assert scans == []
        (loras / "styles" / "new.safetensors").write_bytes(b"x")          # a file added in a subfolder
        assert bridge.lora_choices() == ["l.safetensors", "styles/new.safetensors"]
        assert str(loras / "styles") in scans
        (loras / "styles" / "newer.sft").write_bytes(b"x")                # within the same mtime tick
        assert bridge.lora_choices() == ["l.safetensors", "styles/new.safetensors", "styles/newer.sft"]
        (dm / "sub" / "c.safetensors").write_bytes(b"x")
        assert bridge.model_choices("diffusion_models") == ["a.safetensors", "sub/b.gguf", "sub/c.safetensors",
                                                            "Lens-x"]
        os.remove(dm / "a.safetensors")
        assert bridge.model_choices("diffusion_models")[0] == "sub/b.gguf"
    finally:
        folder_paths.set_models_dir(old_models)


def test_previews_match_the_models_latent_format(pack):  # noqa: F811
    """LensSampler's previews are what ComfyUI's previewer shows for the MODEL's latent format (KSampler's): one
    FLUX.2 format class for both. Without ComfyUI's Flux2 (the stand-in, 0.3.64) that is the 2×2 average of the
    unpatchified latent through the 32 FLUX.2 RGB factors, at latent resolution."""
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod, args

    bridge = sys.modules[f"{PACK_NAME}.nodes.bridge"]
    progress = sys.modules[f"{PACK_NAME}.nodes.bridge.progress"]
    from lens_core.vae import unpatchify

    assert bridge.pack_model.LensPackConfig.latent_format is progress.FLUX2_FORMAT
    old = args.preview_method
    args.preview_method = LatentPreviewMethod.Latent2RGB
    try:
        x0 = torch.randn(1, 128, 4, 6, generator=torch.Generator().manual_seed(0))
        ours = bridge.get_previewer(torch.device("cpu")).decode_latent_to_preview_image("JPEG", x0)[1]
        ksampler = latent_preview.get_previewer(torch.device("cpu"), bridge.pack_model.LensPackConfig.latent_format())
        theirs = ksampler.decode_latent_to_preview_image("JPEG", x0)[1]
        assert ours.size == theirs.size and ours.tobytes() == theirs.tobytes()
        if progress.FLUX2_FORMAT.__name__ == "_BundledFlux2":
            assert ours.size == (6, 4)
            avg = torch.nn.functional.avg_pool2d(unpatchify(x0.double()), 2)[0]          # [32, 4, 6]
            rgb = torch.einsum("chw,cr->hwr", avg, torch.tensor(progress.FLUX2_RGB_FACTORS, dtype=torch.float64))
            rgb = rgb + torch.tensor(progress.FLUX2_RGB_BIAS, dtype=torch.float64)
            ref = ((rgb + 1) / 2).clamp(0, 1) * 255
            got = torch.frombuffer(bytearray(ours.tobytes()), dtype=torch.uint8).double().reshape(4, 6, 3)
            assert (got - ref).abs().max() <= 1.0
    finally:
        args.preview_method = old
