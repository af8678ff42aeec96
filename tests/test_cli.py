"""``python -m lens_core generate`` / ``inspect`` on tiny fixtures."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import fixtures as fx
from lens_core.__main__ import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generate_png_end_to_end(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out" / "cube.png"
    rc = main(["generate", "--model", str(pipeline_dir), "--prompt", "a red cube on a wooden table",
               "--height", "64", "--width", "96", "--steps", "2", "--cfg", "3", "--seed", "5", "--num-images", "2",
               "--device", "cpu", "--dtype", "fp32", "--out", str(out)])
    assert rc == 0
    files = [tmp_path / "out" / "cube_0.png", tmp_path / "out" / "cube_1.png"]
    assert capsys.readouterr().out.split() == [str(f) for f in files]
    img = Image.open(files[1])
    assert img.size == (96, 64) and img.mode == "RGB"
    meta = json.loads(img.text["lens"])
    assert meta["prompt"] == "a red cube on a wooden table"
    assert (meta["steps"], meta["cfg"], meta["seed"], meta["height"], meta["width"]) == (2, 3.0, 5, 64, 96)
    assert "Steps: 2, CFG scale: 3.0, Seed: 5, Size: 96x64" in img.text["parameters"]
    # the same call through the Python API gives the same pixels
    from lens_core.pipeline import LensPipeline
    import torch

    pipe = LensPipeline.from_pretrained(pipeline_dir, dtype=torch.float32, device="cpu")
    res = pipe("a red cube on a wooden table", height=64, width=96, steps=2, cfg=3, seed=5, num_images=2)
    assert res.images[1].tobytes() == img.tobytes()


@pytest.fixture(scope="module")
def family_files(golden_dir, tokenizer_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_families")
    return {
        "diffusers": fx.write_diffusers_folder(out, golden_dir, tokenizer_json),
        "comfy-dit-bf16": fx.write_comfy_dit_bf16(out / "lens_bf16.safetensors", golden_dir),
        "comfy-dit-mxfp8": fx.write_comfy_dit_mxfp8(out / "lens_mxfp8.safetensors", golden_dir)[0],
        "comfy-te-nvfp4": fx.write_comfy_te_nvfp4(out / "gpt_oss_20b_nvfp4.safetensors", golden_dir, tokenizer_json),
        "vae-diffusers": fx.write_vae(out / "a" / "flux2-vae.safetensors", golden_dir),
        "vae-bfl": fx.write_vae(out / "b" / "flux2-vae.safetensors", golden_dir, scheme="bfl"),
    }


def test_inspect_names_each_family(family_files, capsys):
    for family, path in family_files.items():
        assert main(["inspect", str(path), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["family"] == family
        assert main(["inspect", str(path)]) == 0
        assert f"family: {family}" in capsys.readouterr().out


def test_cli_errors_name_the_file(tmp_path, capsys):
    p = fx.write_pickle_lookalike(tmp_path / "lens.ckpt")
    assert main(["generate", "--model", str(p), "--text-encoder", str(p), "--vae", str(p), "--prompt", "x",
                 "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "pickle" in err


def test_module_entry_point(family_files):
    r = subprocess.run([sys.executable, "-m", "lens_core", "inspect", str(family_files["vae-bfl"])], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "family: vae-bfl" in r.stdout and "component: vae" in r.stdout
