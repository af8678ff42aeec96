"""``python -m lens_core generate`` / ``inspect`` on tiny fixtures."""
from __future__ import annotations

import json
import os
import pathlib
import shlex
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
    cap = capsys.readouterr()
    assert cap.out.split() == [str(f) for f in files]
    assert "dtype: fp32 (--dtype fp32), device: cpu" in cap.err
    img = Image.open(files[1])
    assert img.size == (96, 64) and img.mode == "RGB"
    meta = json.loads(img.text["lens"])
    assert meta["prompt"] == "a red cube on a wooden table"
    assert (meta["steps"], meta["cfg"], meta["seed"], meta["batch_index"], meta["height"], meta["width"]) == \
        (2, 3.0, 5, 1, 64, 96)
    assert "Steps: 2, CFG scale: 3.0, Seed: 5, Batch index: 1, Size: 96x64" in img.text["parameters"]
    # image 1 is image 1 of the seed's batch: the same call through the Python API gives the same pixels
    from lens_core.pipeline import LensPipeline
    import torch

    pipe = LensPipeline.from_pretrained(pipeline_dir, dtype=torch.float32, device="cpu")
    res = pipe("a red cube on a wooden table", height=64, width=96, steps=2, cfg=3, seed=5, batch_index=1)
    assert res.images[0].tobytes() == img.tobytes()
    assert res.image_parameters[0]["batch_index"] == 1 and res.parameters["seed"] == 5


def test_each_png_of_a_batch_regenerates_from_its_own_metadata(pipeline_dir, tmp_path, monkeypatch, capsys):
    """--num-images 3 (cfg 5, img2img-free): every PNG carries the command that makes it; running only that
    command (nothing taken from the first run) gives bit-identical pixels. Loading is memoised (same paths and
    settings → the same pipeline object) to keep the test fast; every other step runs."""
    from lens_core.pipeline import LensPipeline

    real = LensPipeline.from_pretrained.__func__
    cache = {}

    def memo(cls, path=None, **kw):
        settings = {k: v for k, v in kw.items() if k != "plan"}       # the plan object is new on every call
        key = (json.dumps(path, sort_keys=True, default=str), json.dumps(settings, sort_keys=True, default=str),
               kw["plan"].mode if kw.get("plan") is not None else None)
        if key not in cache:
            cache[key] = real(cls, path, **kw)
        return cache[key]
    monkeypatch.setattr(LensPipeline, "from_pretrained", classmethod(memo))
    out = tmp_path / "batch.png"
    assert main(["generate", "--model", str(pipeline_dir), "--prompt", "two green frogs", "--negative", "blurry",
                 "--height", "32", "--width", "48", "--steps", "2", "--seed", "11", "--num-images", "3",
                 "--dtype", "fp32", "--out", str(out)]) == 0
    files = capsys.readouterr().out.split()
    assert [os.path.basename(f) for f in files] == ["batch_0.png", "batch_1.png", "batch_2.png"]
    pixels = [Image.open(f).tobytes() for f in files]
    assert len(set(pixels)) == 3                     # three different images
    for k, f in enumerate(files):
        meta = json.loads(Image.open(f).text["lens"])
        assert (meta["seed"], meta["batch_index"], meta["num_images"]) == (11, k, 1)
        argv = shlex.split(meta["command"])
        assert argv[:4] == ["python", "-m", "lens_core", "generate"]
        assert argv[argv.index("--out") + 1] == f         # the image's own path, as the run wrote it
        argv[argv.index("--out") + 1] = str(tmp_path / f"again_{k}.png")
        assert main(argv[3:]) == 0
        again = Image.open(tmp_path / f"again_{k}.png")
        assert again.tobytes() == pixels[k], k
        assert json.loads(again.text["lens"])["command"] == shlex.join(argv)
    assert len(cache) == 1


def test_torch_missing_prints_the_fix(tmp_path):
    """Without PyTorch the CLI prints one line with the install commands (exit 3), no traceback."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from lens_core.__main__ import main\n"
            "sys.exit(main(sys.argv[1:]))")
    for argv in (["generate", "--model", "x", "--prompt", "p", "--out", "o.png"],):
        r = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 3, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert lines[0].startswith("error: PyTorch is not installed")
        assert "pip install -r requirements-cli.txt" in lines[0]
        assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in lines[0]
    # inspect reads headers only: it runs without PyTorch (a missing path is a plain argument error)
    r = subprocess.run([sys.executable, "-c", code, "inspect", "x"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: x: no such file or folder"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    cli_reqs = (pathlib.Path(REPO) / "requirements-cli.txt").read_text().split()
    assert "-r" in cli_reqs and "requirements.txt" in cli_reqs and any(r.startswith("torch") for r in cli_reqs)


# ---------------------------------------------------------------------------------------------------------
# Every check that needs no weights runs before any weight file is opened


@pytest.fixture
def no_weights(monkeypatch):
    """Instrument the loaders: opening a safetensors file or calling any loader fails the test."""
    import builtins

    import lens_core.checkpoints as ck

    calls = []

    def forbid(name):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called: validation must fail before any weight is read")
        return refuse

    monkeypatch.setattr(ck.SafetensorsFile, "__init__", forbid("SafetensorsFile"))
    for fn in ("load_transformer", "load_text_encoder", "load_vae", "load_tokenizer", "open_source", "inspect"):
        monkeypatch.setattr(ck, fn, forbid(fn))
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file).endswith(".safetensors"):
            forbid(f"open({file})")()
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", guarded_open)
    return calls


def run_cli_error(argv, capsys) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one ``error: …`` line and no traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [l for l in err.strip().splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def gen_args(model, tmp_path, *extra):
    return ["generate", "--model", str(model), "--prompt", "a cube", "--out", str(tmp_path / "o.png"), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--aspect", "5:4"], "--aspect: expected one of ['1:2', '9:16'"),
    (["--aspect", "1:1", "--base", "1000"], "--base: expected 1024 or 1440, found 1000"),
    (["--base", "2048"], "--base: expected 1024 or 1440, found 2048"),
    (["--height", "40", "--width", "64"], "--height must be a positive multiple of 16 pixels, got 40"),
    (["--height", "64"], "--height 64 without --width: expected both (or --aspect); fix: pass --width too"),
    (["--aspect", "1:1", "--height", "64", "--width", "64"], "--aspect '1:1' together with --height/--width"),
    (["--image", "/nonexistent/init.png"], "--image /nonexistent/init.png: no such file"),
    (["--denoise", "0.5"], "--denoise 0.5 without --image: denoise < 1 is img2img"),
    (["--steps", "0"], "--steps: expected an integer in [1, 1000], found 0"),
    (["--schedule", "karras"], "--schedule: unknown schedule 'karras'; expected one of ['official', 'simple'"),
    (["--schedule", "official:2"], "--schedule 'official:2': the official schedule takes no shift"),
])
def test_argument_errors_before_loading(pipeline_dir, tmp_path, capsys, no_weights, extra, message):
    line = run_cli_error(gen_args(pipeline_dir, tmp_path, *extra), capsys)
    assert message in line, line
    assert no_weights == []


def test_path_errors_before_loading(pipeline_dir, tmp_path, capsys, no_weights):
    missing = tmp_path / "no" / "Lens"
    line = run_cli_error(gen_args(missing, tmp_path), capsys)
    assert line.startswith(f"error: --model {missing}: no such file or folder") and "does not exist" in line
    # a DiT alone: say which flags are missing (not "missing ['text_encoder', 'vae']")
    dit = pipeline_dir / "transformer"
    line = run_cli_error(gen_args(dit, tmp_path), capsys)
    assert "is a single model, not a diffusers Lens folder" in line and "fix: pass --text-encoder and --vae" in line
    line = run_cli_error(gen_args(dit, tmp_path, "--text-encoder", str(tmp_path / "te.safetensors"),
                                  "--vae", str(pipeline_dir / "vae")), capsys)
    assert f"--text-encoder {tmp_path / 'te.safetensors'}: no such file or folder" in line
    # a diffusers folder whose tokenizer/ lacks tokenizer.json
    no_tok = tmp_path / "Lens-no-tokenizer"
    no_tok.mkdir()
    for entry in pipeline_dir.iterdir():
        if entry.name != "tokenizer":
            os.symlink(entry, no_tok / entry.name)
    (no_tok / "tokenizer").mkdir()
    (no_tok / "tokenizer" / "tokenizer_config.json").write_text("{}")
    line = run_cli_error(gen_args(no_tok, tmp_path), capsys)
    assert "a folder without tokenizer: expected tokenizer/tokenizer.json" in line
    assert "found ['tokenizer_config.json']" in line
    # a pickle given as the model is refused by name
    pk = fx.write_pickle_lookalike(tmp_path / "lens.ckpt")
    line = run_cli_error(gen_args(pk, tmp_path, "--text-encoder", str(pk), "--vae", str(pk)), capsys)
    assert str(pk) in line and "pickle" in line
    assert no_weights == []
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


def test_inspect_each_file_kind(pipeline_dir, golden_dir, tokenizer_json, tmp_path, capsys):
    """inspect on every kind of file a user may point it at: tokenizer.json (not a shard index), one shard of
    the sharded text encoder (the checkpoint it belongs to, not "unknown"), configs, and non-safetensors files
    (named by what they are, no absurd header size)."""
    def info(path):
        assert main(["inspect", str(path), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    tok = info(tokenizer_json)
    assert (tok["family"], tok["component"], tok["tokenizer_model"], tok["vocab_size"]) == \
        ("tokenizer", "tokenizer", "BPE", 201088)
    assert tok["lens_preamble"].startswith("ok")
    assert info(pipeline_dir / "tokenizer")["family"] == "tokenizer"
    te = golden_dir / "pipeline_tiny" / "text_encoder"
    index = info(te / "model.safetensors.index.json")
    assert (index["family"], index["component"], index["tensors"]) == ("diffusers-text-encoder-mxfp4",
                                                                       "text_encoder", 116)
    for k, tensors in ((1, 2), (2, 114)):       # shard 1 holds only the embeddings and the final norm
        shard = info(te / f"model-0000{k}-of-00002.safetensors")
        assert (shard["family"], shard["component"], shard["shard"]) == ("diffusers-text-encoder-mxfp4",
                                                                         "text_encoder", f"{k} of 2")
        assert shard["shard_tensors"] == tensors and shard["tensors"] == 116
        assert shard["index"] == str(te / "model.safetensors.index.json")
    lone = tmp_path / "lone"
    lone.mkdir()
    os.symlink(te / "model-00001-of-00002.safetensors", lone / "model-00001-of-00002.safetensors")
    orphan = info(lone / "model-00001-of-00002.safetensors")
    assert orphan["family"] == "unknown" and "shard 1 of 2" in orphan["looks_like"]
    assert "index (*.safetensors.index.json listing model-00001-of-00002.safetensors) is missing" in \
        orphan["looks_like"]
    cfg = info(te / "config.json")
    assert (cfg["family"], cfg["describes"]) == ("config", "GptOssForCausalLM")
    assert info(pipeline_dir / "model_index.json")["describes"] == "LensPipeline"
    whole = info(pipeline_dir)
    assert whole["components"]["tokenizer"]["vocab_size"] == 201088
    # not safetensors at all: said plainly
    png = tmp_path / "photo.safetensors"
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello world, just notes\n")
    gguf = tmp_path / "lens-Q4.safetensors"
    gguf.write_bytes(b"GGUF" + bytes(60))
    assert main(["inspect", str(gguf)]) == 2
    assert capsys.readouterr().err == f"error: {gguf}: GGUF version 0 is not supported (expected 2 or 3)\n"
    for path, what in ((png, "a PNG image"), (text, "a text file starting with b'hello world, jus'")):
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: {path}: expected a safetensors file (an 8-byte header length, then a JSON header), "
                       f"found {what} of {path.stat().st_size} bytes; only safetensors is loaded\n"), err
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    assert main(["inspect", str(other)]) == 2
    assert "expected a shard index (*.safetensors.index.json with 'weight_map'), a tokenizer.json or a model " \
           "config.json, found a JSON object with keys ['hello']" in capsys.readouterr().err


def test_misplaced_component_found_from_headers_before_loading(pipeline_dir, tmp_path, capsys, monkeypatch):
    """A VAE given as the text encoder is reported from the safetensors headers alone: no loader runs."""
    import lens_core.checkpoints as ck

    def refuse(*a, **k):
        raise AssertionError("a loader ran before the headers were checked")
    for fn in ("load_transformer", "load_text_encoder", "load_vae", "load_tokenizer"):
        monkeypatch.setattr(ck, fn, refuse)
    vae = pipeline_dir / "vae"
    line = run_cli_error(["generate", "--model", str(pipeline_dir / "transformer"), "--text-encoder", str(vae),
                          "--vae", str(vae), "--tokenizer", str(pipeline_dir), "--prompt", "a", "--out",
                          str(tmp_path / "o.png")], capsys)
    assert line == (f"error: {vae / 'diffusion_pytorch_model.safetensors'}: expected a GPT-OSS text encoder "
                    f"checkpoint, but this looks like a FLUX.2 VAE (diffusers key names)")


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
