"""One weight-file interface and one discovery routine (issue 23 part 4): ``WeightFile`` siblings chosen by
content, ``locate(path, component)`` for files, shard indexes, diffusers folders and tokenizers, and the GGUF
encoder with its side-car ``<stem>.tokenizer.json`` through the CLI (the defect this removes: the CLI refused the
layout README documents while the tokenizer loader accepted it)."""
from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image

import fixtures as fx
from lens_core import checkpoints as ck
from lens_core.__main__ import main


def test_weight_files_are_siblings_chosen_by_content(golden_dir, tmp_path):
    gguf = fx.write_gguf_te(tmp_path / "te.gguf", golden_dir)
    disguised = tmp_path / "te_named_like_safetensors.safetensors"      # the name does not decide
    shutil.copy(gguf, disguised)
    st = golden_dir / "pipeline_tiny" / "vae" / "diffusion_pytorch_model.safetensors"
    assert issubclass(ck.SafetensorsFile, ck.WeightFile) and issubclass(ck.GGUFFile, ck.WeightFile)
    assert not issubclass(ck.GGUFFile, ck.SafetensorsFile)
    with ck.open_weight_file(disguised) as f:
        assert isinstance(f, ck.GGUFFile) and f.format == "gguf" and f.architecture == "gpt-oss"
        quantized = [k for k in f.entries if f.is_quantized(k)]
        assert quantized and f.quant_type(quantized[0]) == "MXFP4"
    with ck.open_weight_file(st) as f:
        assert isinstance(f, ck.SafetensorsFile) and f.format == "safetensors"
        assert not any(f.is_quantized(k) for k in f.entries)
    # a GGUF given as the DiT goes through the same interface and is named by what it is
    with pytest.raises(ck.CheckpointError, match="expected a Lens DiT"):
        ck.load_transformer(disguised)


def test_locate_weights(pipeline_dir, golden_dir, tmp_path):
    te = golden_dir / "pipeline_tiny" / "text_encoder"
    loc = ck.locate(pipeline_dir, "text_encoder")
    assert (loc.kind, loc.path, loc.config_path) == ("index", str(pipeline_dir / "text_encoder" /
                                                              "model.safetensors.index.json"),
                                                     str(pipeline_dir / "text_encoder" / "config.json"))
    loc = ck.locate(pipeline_dir / "transformer", "transformer")
    assert loc.kind == "file" and loc.path.endswith("diffusion_pytorch_model.safetensors")
    assert loc.config_path == str(pipeline_dir / "transformer" / "config.json")
    # a loose file next to an unrelated config.json does not take it
    loose = tmp_path / "lens_bf16.safetensors"
    fx.write_comfy_dit_bf16(loose, golden_dir)
    (tmp_path / "config.json").write_text("{}")
    assert ck.locate(loose, "transformer") == ck.Location("transformer", "file", str(loose), None)
    # a folder that holds the component's subfolder (no model_index.json)
    parent = tmp_path / "parent"
    parent.mkdir()
    os.symlink(te, parent / "text_encoder")
    assert ck.locate(parent, "text_encoder").path == str(parent / "text_encoder" / "model.safetensors.index.json")
    with pytest.raises(ck.CheckpointError, match=r"expected a diffusers Lens folder .*found \['text_encoder'\]"):
        ck.locate(parent, "vae", "--vae")
    (parent / "model_index.json").write_text("{}")
    with pytest.raises(ck.CheckpointError, match=r"^--vae .*without its 'vae/' subfolder.*fix: complete the"):
        ck.locate(parent, "vae", "--vae")
    # errors name the argument and the path
    with pytest.raises(FileNotFoundError, match=r"^--model /nonexistent/x: no such file or folder"):
        ck.locate("/nonexistent/x", "transformer", "--model")
    with pytest.raises(ck.CheckpointError, match="pickle"):
        ck.locate(fx.write_pickle_lookalike(tmp_path / "lens.ckpt"), "transformer")
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.safetensors", "b.safetensors"):
        shutil.copy(loose, two / n)
    with pytest.raises(ck.CheckpointError, match=r"several weight files \['a.safetensors', 'b.safetensors'\]"):
        ck.locate(two, "transformer")
    # a folder with one GGUF is that GGUF
    g = tmp_path / "g"
    g.mkdir()
    fx.write_gguf_te(g / "te.gguf", golden_dir)
    assert ck.locate(g, "text_encoder").path == str(g / "te.gguf")


def test_locate_tokenizer(pipeline_dir, golden_dir, tokenizer_json, tmp_path):
    tok = str(pipeline_dir / "tokenizer" / "tokenizer.json")
    assert ck.locate(pipeline_dir, "tokenizer") == ck.Location("tokenizer", "json", tok)
    assert ck.locate(pipeline_dir / "tokenizer", "tokenizer").path == tok
    assert ck.locate(pipeline_dir / "text_encoder", "tokenizer").path == tok            # tokenizer/ beside
    assert ck.locate(pipeline_dir / "text_encoder" / "model.safetensors.index.json", "tokenizer").path == tok
    nv = fx.write_comfy_te_nvfp4(tmp_path / "nv" / "gpt_oss_20b_nvfp4.safetensors", golden_dir, tokenizer_json)
    assert ck.locate(nv, "tokenizer") == ck.Location("tokenizer", "embedded", str(nv))
    # GGUF encoder: the side-car first, else tokenizer.json in its folder, else a message naming all three
    (tmp_path / "g").mkdir()
    g = fx.write_gguf_te(tmp_path / "g" / "gpt-oss-20b-Q4_K_M.gguf", golden_dir)
    with pytest.raises(ck.CheckpointError, match=r"gpt-oss-20b-Q4_K_M\.tokenizer\.json.*tokenizer\.json"):
        ck.locate(g, "tokenizer", "--tokenizer")
    shutil.copy(tokenizer_json, tmp_path / "g" / "tokenizer.json")
    assert ck.locate(g, "tokenizer") == ck.Location("tokenizer", "json", str(tmp_path / "g" / "tokenizer.json"))
    side = tmp_path / "g" / "gpt-oss-20b-Q4_K_M.tokenizer.json"
    shutil.copy(tokenizer_json, side)
    assert ck.locate(g, "tokenizer") == ck.Location("tokenizer", "sidecar", str(side))
    # a side-car also serves a safetensors encoder without an embedded tokenizer
    bare = tmp_path / "bare.safetensors"
    shutil.copy(nv, bare)
    shutil.copy(tokenizer_json, tmp_path / "bare.tokenizer.json")
    assert ck.locate(bare, "tokenizer").kind == "sidecar"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ck.CheckpointError, match=r"a folder without tokenizer.*found \['notes.txt'\]"):
        ck.locate(empty, "tokenizer")


def test_folder_kind():
    assert ck.folder_kind(["model_index.json", "transformer"]) == "pipeline"
    assert ck.folder_kind(["config.json", "diffusion_pytorch_model.safetensors"]) == "component"
    assert ck.folder_kind(["model.safetensors.index.json", "model-00001-of-00002.safetensors"]) == "component"
    assert ck.folder_kind(["lens_bf16.safetensors", "lens-Q4_K.gguf", "notes.txt"]) is None
    assert ck.is_weight_file_name("Lens-Q4_K.GGUF") and not ck.is_weight_file_name("lens.tokenizer.json")


def test_cli_gguf_encoder_with_sidecar_tokenizer(pipeline_dir, golden_dir, tokenizer_json, tmp_path, capsys):
    """README's layout: ``models/gpt-oss-20b-Q4_K_M.gguf`` + ``models/gpt-oss-20b-Q4_K_M.tokenizer.json`` and no
    other tokenizer. The CLI used to refuse it ("a folder without tokenizer"); it now generates, and the image
    equals the diffusers folder's (the tiny encoder's weights are bf16 values, stored losslessly in the GGUF)."""
    models = tmp_path / "models"
    models.mkdir()
    te = fx.write_gguf_te(models / "gpt-oss-20b-Q4_K_M.gguf", golden_dir)
    shutil.copy(tokenizer_json, models / "gpt-oss-20b-Q4_K_M.tokenizer.json")
    assert sorted(os.listdir(models)) == ["gpt-oss-20b-Q4_K_M.gguf", "gpt-oss-20b-Q4_K_M.tokenizer.json"]
    common = ["--prompt", "a red cube", "--height", "64", "--width", "96", "--steps", "2", "--cfg", "3",
              "--seed", "3", "--device", "cpu", "--dtype", "fp32"]
    rc = main(["generate", "--model", str(pipeline_dir / "transformer"), "--text-encoder", str(te),
               "--vae", str(pipeline_dir / "vae"), *common, "--out", str(tmp_path / "gguf.png")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert main(["generate", "--model", str(pipeline_dir), *common, "--out", str(tmp_path / "ref.png")]) == 0
    capsys.readouterr()
    a, b = Image.open(tmp_path / "gguf.png"), Image.open(tmp_path / "ref.png")
    assert a.size == (96, 64) and a.tobytes() == b.tobytes()
    # without the side-car the CLI says which names it looked for, before loading anything
    os.remove(models / "gpt-oss-20b-Q4_K_M.tokenizer.json")
    rc = main(["generate", "--model", str(pipeline_dir / "transformer"), "--text-encoder", str(te),
               "--vae", str(pipeline_dir / "vae"), *common, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: --tokenizer (found beside {te}) {te}: a GGUF text encoder needs"), err
    assert "gpt-oss-20b-Q4_K_M.tokenizer.json" in err and not (tmp_path / "x.png").exists()
