"""First contact with the CLI (issue 25 part 5): no PyTorch for inspect and argument errors, LoRAs checked before
loading and confirmed, inpainting paste-back, --seed random, warnings and stored parameters."""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import lora_fixtures as lf
from lens_core.__main__ import _png_info, build_parser, cuda_missing_reason, main

REPO = pathlib.Path(__file__).resolve().parents[1]

_NO_TORCH = ("import sys\n"
             "from lens_core.__main__ import main\n"
             "try:\n"
             "    rc = main(sys.argv[1:])\n"
             "except SystemExit as e:\n"
             "    rc = e.code\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)\n")


def _run_no_torch(*argv):
    r = subprocess.run([sys.executable, "-c", _NO_TORCH, *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    return r.stdout.strip().splitlines()[-1].split(), r


def test_inspect_and_argument_errors_never_import_torch(pipeline_dir, golden_dir, tmp_path):
    for path in (pipeline_dir, pipeline_dir / "text_encoder", pipeline_dir / "tokenizer" / "tokenizer.json",
                 golden_dir / "dit_tiny" / "transformer" / "diffusion_pytorch_model.safetensors",
                 pipeline_dir / "vae" / "config.json"):
        (state, rc), r = _run_no_torch("inspect", path)
        assert (state, rc) == ("NO-TORCH", "0"), r.stderr
    (state, rc), r = _run_no_torch("inspect", tmp_path / "missing.safetensors")
    assert (state, rc) == ("NO-TORCH", "2") and "no such file" in r.stderr
    # argument errors (argparse) end before PyTorch is imported
    for argv in (["generate"], ["generate", "--model", "m", "--prompt", "p", "--out", "o.png", "--seed", "x"],
                 ["generate", "--model", "m", "--prompt", "p", "--out", "o.png", "--memory", "all"]):
        (state, rc), r = _run_no_torch(*argv)
        assert (state, rc) == ("NO-TORCH", "2"), r.stderr
        assert "usage:" in r.stderr
    # inspect works where PyTorch is not installed at all
    code = ("import sys; sys.modules['torch'] = None\nfrom lens_core.__main__ import main\n"
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "inspect", str(pipeline_dir / "text_encoder")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "component: text_encoder" in r.stdout, r.stderr


def test_seed_help_and_default():
    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    seed = next(a for a in gen._actions if "--seed" in a.option_strings)
    assert seed.default == 0 and "random" in seed.help and "default 0" in seed.help


def test_parameters_name_fp8_and_paste_back(tmp_path):
    p = {"prompt": "p", "negative_prompt": "", "steps": 4, "cfg": 1.0, "seed": 7, "batch_index": 0, "width": 64,
         "height": 64, "variant": "turbo", "denoise": 1.0, "dtype": "float32", "template_date": "2026-05-23",
         "fp8": True, "inpaint": True, "paste_back": True}
    Image.new("RGB", (4, 4)).save(tmp_path / "p.png", pnginfo=_png_info(p))
    summary = Image.open(tmp_path / "p.png").text["parameters"]
    assert "FP8: on" in summary and "Paste back: on" in summary, summary


def test_cuda_message_depends_on_the_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in cuda_missing_reason() and "install a CUDA build" in cuda_missing_reason()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    msg = cuda_missing_reason()
    assert "CUDA 12.8 build, but it sees no GPU" in msg and "install" not in msg
    assert "CUDA_VISIBLE_DEVICES=''" in msg and "nvidia-smi" in msg


@pytest.fixture(scope="module")
def tiny_dit_meta(pipeline_dir):
    from lens_core import checkpoints as ck

    return ck.load_transformer(pipeline_dir / "transformer", dtype=torch.float32, meta=True)


def test_bad_lora_refused_before_any_model_loads(pipeline_dir, tiny_dit_meta, tmp_path, capsys, monkeypatch):
    import lens_core.checkpoints.assign as assign

    monkeypatch.setattr(assign, "assign_weights", lambda *a, **k: pytest.fail("a model was loaded"))
    # a FLUX LoRA (another model): named from its keys
    flux = tmp_path / "flux_lora.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4)}, str(flux))
    # a Lens LoRA trained for a model of another size: its shapes do not fit this DiT
    names = lf.target_names(tiny_dit_meta)[:3]
    f = lf.random_factors(tiny_dit_meta, names, rank=4)
    f = {n: lf.Factors("lora", {"up": torch.zeros(v.t["up"].shape[0] * 2, 4), "down": v.t["down"]}, 2.0, 4)
         for n, v in f.items()}
    wrong = lf.write(tmp_path / "other_size.safetensors", "peft", f)
    for path, what in ((flux, "FLUX"), (wrong, "another size")):
        rc = main(["generate", "--model", str(pipeline_dir), "--prompt", "a", "--height", "32", "--width", "48",
                   "--out", str(tmp_path / "o.png"), "--lora", f"{path}:0.5"])
        err = capsys.readouterr().err
        assert rc == 2 and what in err and str(path) in err, err


def test_generate_first_contact_lines_and_parameters(pipeline_dir, tiny_dit_meta, tmp_path, capsys):
    """--seed random (printed, stored as the number), --negative at CFG 1 warned, a LoRA confirmed on the console,
    --fp8 in the parameters, the stored command names the real output file."""
    lora = lf.write(tmp_path / "style.safetensors", "kohya",
                    lf.random_factors(tiny_dit_meta, lf.target_names(tiny_dit_meta), rank=4, seed=1))
    out = tmp_path / "first.png"
    assert main(["generate", "--model", str(pipeline_dir), "--prompt", "a red cube", "--negative", "blurry",
                 "--cfg", "1", "--steps", "2", "--height", "32", "--width", "48", "--seed", "random", "--fp8",
                 "--dtype", "fp32", "--lora", f"{lora}:0.5", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: --negative is not used at CFG 1" in err
    assert "LoRA applied: style.safetensors at strength 0.5" in err
    seed_line = next(line for line in err.splitlines() if line.startswith("seed: "))
    seed = int(seed_line.split()[1])
    png = Image.open(out)
    meta = json.loads(png.text["lens"])
    assert meta["seed"] == seed and meta["fp8"] is True
    assert f"Seed: {seed}," in png.text["parameters"] and "FP8: on" in png.text["parameters"]
    assert "Lora: style.safetensors:0.5" in png.text["parameters"]
    argv = shlex.split(meta["command"])
    assert argv[argv.index("--seed") + 1] == str(seed) and "--fp8" in argv
    assert argv[argv.index("--out") + 1] == str(out)          # the real output path, as given


def test_inpainting_pastes_back_the_kept_pixels(pipeline_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))   # resized to 32×48 for the run
    init.save(tmp_path / "init.png")
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[:, 48:] = 255                                     # right half regenerated, left half kept
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["generate", "--model", str(pipeline_dir), "--prompt", "a cube", "--height", "32", "--width", "48",
              "--steps", "2", "--dtype", "fp32", "--image", str(tmp_path / "init.png"), "--mask",
              str(tmp_path / "mask.png")]
    assert main(common + ["--out", str(tmp_path / "pasted.png")]) == 0
    assert main(common + ["--no-paste-back", "--out", str(tmp_path / "raw.png")]) == 0
    capsys.readouterr()
    want = np.asarray(init.resize((48, 32), Image.LANCZOS))
    pasted = np.asarray(Image.open(tmp_path / "pasted.png").convert("RGB"))
    raw = np.asarray(Image.open(tmp_path / "raw.png").convert("RGB"))
    # mask resized bilinearly to 48 px: columns 0..22 are fully kept, 25.. fully regenerated
    assert np.array_equal(pasted[:, :23], want[:, :23])
    assert np.array_equal(pasted[:, 25:], raw[:, 25:])
    assert not np.array_equal(raw[:, :23], want[:, :23])           # the VAE round trip changes kept pixels
    params = Image.open(tmp_path / "pasted.png").text["parameters"]
    assert "Paste back: on" in params
    assert "--no-paste-back" in json.loads(Image.open(tmp_path / "raw.png").text["lens"])["command"]


def test_inspect_describes_a_lora(tiny_dit_meta, tmp_path, capsys):
    lora = lf.write(tmp_path / "detail.safetensors", "peft",
                    lf.random_factors(tiny_dit_meta, lf.target_names(tiny_dit_meta), rank=8, alpha=4.0, seed=2))
    assert main(["inspect", str(lora)]) == 0
    out = capsys.readouterr().out
    for want in ("family: lora", "for: the Lens DiT", "lora_format: peft", "rank: 8", "scale: 0.5",
                 f"targets: {len(lf.target_names(tiny_dit_meta))}", "attn.img_qkv"):
        assert want in out, (want, out)
    assert main(["inspect", str(lora), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rank"] == 8 and info["kinds"] == {"lora": len(lf.target_names(tiny_dit_meta))}
    assert info["target_layers"]["attn.img_qkv"] == len(tiny_dit_meta.transformer_blocks)
    assert os.path.basename(info["path"]) == "detail.safetensors"
