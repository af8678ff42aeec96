"""Every checkpoint family, written tiny in its real layout by tests/fixtures.py, loads to the golden outputs.

References: the golden DiT io (``dit_tiny/io.safetensors``), the golden pipeline case tensors (DiT step inputs and
outputs, text-encoder layer outputs) and the golden VAE io — all produced by the official code.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import fixtures as fx
from lens_core import checkpoints as ck
from lens_core import quant_linear as ql
from lens_core.dit import LensTransformer
from lens_core.config import LensDiTConfig


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def files(golden_dir, tokenizer_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("families")
    f = {
        "diffusers": fx.write_diffusers_folder(out, golden_dir, tokenizer_json, name="Lens-Turbo-tiny"),
        "comfy-dit-bf16": fx.write_comfy_dit_bf16(out / "diffusion_models" / "lens_bf16.safetensors", golden_dir),
        "vae-diffusers": fx.write_vae(out / "vae" / "flux2-vae.safetensors", golden_dir),
        "vae-bfl": fx.write_vae(out / "vae_klein" / "flux2-vae.safetensors", golden_dir, scheme="bfl"),
        "comfy-te-nvfp4": fx.write_comfy_te_nvfp4(out / "text_encoders" / "gpt_oss_20b_nvfp4.safetensors",
                                                  golden_dir, tokenizer_json),
    }
    f["comfy-dit-mxfp8"], f["mxfp8_exact"] = fx.write_comfy_dit_mxfp8(
        out / "diffusion_models" / "lens_turbo_mxfp8.safetensors", golden_dir)
    f["root"] = out
    return f


@pytest.fixture(scope="module")
def dit_io(golden_dir):
    return load_file(str(golden_dir / "dit_tiny" / "io.safetensors"))


def run_dit(model, io, dtype=torch.float32):
    feats = [io[f"encoder_hidden_states_{i}"].to(dtype) for i in range(4)]
    _, h, w = io["img_shape"].tolist()
    with torch.no_grad():
        return model(io["hidden_states"].to(dtype), feats, io["encoder_hidden_states_mask"],
                     io["timestep"].to(dtype), grid=(h, w)).float()


# --------------------------------------------------------------------------------------------------
# DiT families
# --------------------------------------------------------------------------------------------------
def test_dit_diffusers_sharded_fp32_all_entry_points(files, golden_dir):
    """transformer/ as 2 fp32 shards + index: whole folder, component folder and index path all load to the
    golden step-0 DiT output of case a (fp32)."""
    case = load_file(str(golden_dir / "pipeline_tiny" / "cases" / "a_cfg1_4steps.fp32.safetensors"))
    root = files["diffusers"]
    feats = [case[f"dit_encoder_hidden_states_{i}"] for i in range(4)]
    for path in (root, root / "transformer", root / "transformer" / "diffusion_pytorch_model.safetensors.index.json"):
        m = ck.load_transformer(path, dtype=torch.float32)
        info = m.lens_checkpoint
        assert info.family == "diffusers-transformer"
        assert info.variant == "turbo"  # from the folder name Lens-Turbo-tiny
        assert list(info.config["selected_layer_index"]) == [1, 3, 4, 5]
        with torch.no_grad():
            out = m(case["dit_hidden_states"][0], feats, case["dit_encoder_hidden_states_mask"],
                    case["dit_timestep"][0], grid=(4, 6))
        assert rel(out, case["dit_out"][0]) <= 1e-5


def test_dit_fp32_shards_cast_to_bf16_on_read(files):
    m = ck.load_transformer(files["diffusers"], dtype=torch.bfloat16)
    dtypes = {p.dtype for p in m.parameters()}
    assert dtypes == {torch.bfloat16}
    assert not any(p.device.type == "meta" for p in m.parameters())
    sd = load_file(str(files["diffusers"] / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    k = "transformer_blocks.1.img_mlp.w1.weight"
    assert torch.equal(m.state_dict()[k], sd[k].to(torch.bfloat16))


def test_comfy_bf16_single_file(files, dit_io, golden_dir, tmp_path):
    m = ck.load_transformer(files["comfy-dit-bf16"], dtype=torch.bfloat16)
    assert m.lens_checkpoint.family == "comfy-dit-bf16"
    out = run_dit(m, dit_io, torch.bfloat16)
    # the golden bf16 run used the same bf16 weights (.to(bfloat16) of the fp32 model)
    assert rel(out, dit_io["out_bf16"]) <= 1e-2
    # the same file under ComfyUI's checkpoint prefix, loaded in fp32: equal to the fp32 model with the
    # bf16-rounded weights
    pre = fx.write_comfy_dit_bf16(tmp_path / "lens_bf16_prefixed.safetensors", golden_dir,
                                  prefix="model.diffusion_model.")
    m32 = ck.load_transformer(pre, dtype=torch.float32)
    ref = LensTransformer(LensDiTConfig.from_dict(fx.dit_config(golden_dir)), dtype=torch.float32)
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in fx.dit_state_dict(golden_dir).items()})
    assert rel(run_dit(m32, dit_io), run_dit(ref, dit_io)) <= 1e-6
    assert rel(run_dit(m32, dit_io), dit_io["out"]) <= 2e-2  # bf16 weight rounding only


def test_comfy_mxfp8_single_file(files, dit_io, golden_dir):
    """MXFP8 layers stay fp8 + E8M0 (the scales as stored, cuBLAS-tiled) and equal the fp32 model holding the
    weights the file encodes; against the unquantized golden output the MXFP8 quantisation error is ≤ 3e-2
    relative."""
    m = ck.load_transformer(files["comfy-dit-mxfp8"], dtype=torch.float32)
    assert m.lens_checkpoint.family == "comfy-dit-mxfp8"
    assert m.lens_checkpoint.variant == "turbo"  # from the file name lens_turbo_mxfp8
    blk = m.transformer_blocks[0]
    assert isinstance(blk.attn.img_qkv, ql.QuantLinear) and blk.attn.img_qkv.format.name == "mxfp8"
    assert blk.attn.img_qkv.weight.dtype == torch.float8_e4m3fn
    assert tuple(blk.attn.img_qkv.weight_scale.shape) == (384, 4)  # tiled [out, in/32] as stored
    assert tuple(blk.img_mlp.w1.weight_scale.shape) == (384, 4)    # [341, 4] padded by the tiling
    assert not isinstance(blk.img_mod[1], ql.QuantStorage)
    ref = LensTransformer(LensDiTConfig.from_dict(fx.dit_config(golden_dir)), dtype=torch.float32)
    ref.load_state_dict(files["mxfp8_exact"])
    out = run_dit(m, dit_io)
    assert rel(out, run_dit(ref, dit_io)) <= 1e-6
    err = rel(out, dit_io["out"])
    assert err <= 3e-2, err
    deq = ck.load_transformer(files["comfy-dit-mxfp8"], dtype=torch.float32, mxfp8_dequantize=True)
    assert not any(isinstance(x, ql.QuantStorage) for x in deq.modules())
    assert rel(run_dit(deq, dit_io), out) <= 1e-6


def test_fp8_storage_keeps_modulation_and_norms(dit_io, golden_dir):
    m = ck.load_transformer(golden_dir / "dit_tiny" / "transformer", dtype=torch.float32, fp8=True)
    blk = m.transformer_blocks[1]
    assert isinstance(blk.img_mlp.w1, ql.FP8Linear) and blk.img_mlp.w1.weight.dtype == torch.float8_e4m3fn
    assert isinstance(blk.attn.to_out[0], ql.FP8Linear)
    assert not isinstance(blk.img_mod[1], ql.FP8Linear) and blk.img_mod[1].weight.dtype == torch.float32
    assert not isinstance(blk.txt_mod[1], ql.FP8Linear)
    assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if "norm" in n)
    err = rel(run_dit(m, dit_io), dit_io["out"])
    assert err <= 3e-2, err


def test_tiling_matches_the_documented_offset_formula():
    rows, cols = 300, 7
    logical = torch.randint(0, 255, (rows, cols), dtype=torch.uint8)
    stored = ql.tile_scales(logical)
    assert tuple(stored.shape) == (384, 8)
    flat = stored.reshape(-1)
    for r, c in [(0, 0), (31, 3), (32, 0), (127, 6), (128, 4), (299, 6), (200, 1)]:
        t = (r // 128) * (8 // 4) + c // 4
        off = t * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + (c % 4)
        assert flat[off] == logical[r, c]
    assert torch.equal(ql.untile_scales(stored, rows, cols), logical)


# --------------------------------------------------------------------------------------------------
# Text encoder families
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def case_a(golden_dir):
    return load_file(str(golden_dir / "pipeline_tiny" / "cases" / "a_cfg1_4steps.fp32.safetensors"))


def test_te_diffusers_mxfp4_three_shards(files, case_a):
    m = ck.load_text_encoder(files["diffusers"], dtype=torch.float32)
    info = m.lens_checkpoint
    assert info.family == "diffusers-text-encoder-mxfp4" and info.extra["selected_layers"] == [1, 3, 4, 5]
    out = m(case_a["pos_input_ids"], case_a["pos_attention_mask"].bool())
    for i in range(4):
        assert rel(out[i], case_a[f"pos_te_layer_out_{i}"]) <= 1e-5


def test_te_comfy_nvfp4_equals_mxfp4_and_embeds_tokenizer(files, golden_dir, case_a):
    """The NVFP4 file (lossless re-encoding of the golden MXFP4 experts; high-nibble-first codes, tiled E4M3
    block scales, per-expert global scale) gives exactly the MXFP4 folder's outputs; its embedded tokenizer
    reproduces the golden ids."""
    from lens_core import prompt

    m = ck.load_text_encoder(files["comfy-te-nvfp4"], dtype=torch.float32, config=fx.te_config(golden_dir),
                             selected_layers=[1, 3, 4, 5])
    assert m.lens_checkpoint.family == "comfy-te-nvfp4" and m.lens_checkpoint.extra["embedded_tokenizer"]
    ref = ck.load_text_encoder(files["diffusers"], dtype=torch.float32)
    ids, mask = case_a["pos_input_ids"], case_a["pos_attention_mask"].bool()
    for a, b in zip(m(ids, mask), ref(ids, mask)):
        assert torch.equal(a, b)
    tok = ck.load_tokenizer(files["comfy-te-nvfp4"])
    got, _ = prompt.tokenize(tok, ["a red cube on a wooden table"], date="2026-05-23")
    assert torch.equal(got, case_a["pos_input_ids"])


# --------------------------------------------------------------------------------------------------
# VAE families
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["diffusers", "vae-diffusers", "vae-bfl"])
def test_vae_families(files, golden_dir, family):
    io = load_file(str(golden_dir / "vae_tiny" / "io.safetensors"))
    path = files[family]
    kw = {} if family == "diffusers" else {"config": fx.vae_config(golden_dir)}
    m = ck.load_vae(path, **kw)
    assert m.lens_checkpoint.family == {"diffusers": "diffusers-vae"}.get(family, family)
    with torch.no_grad():
        assert rel(m.decode_raw(io["decode_in"]), io["decode_out"]) <= 1e-5
    assert torch.equal(m.bn.running_var, fx.vae_state_dict(golden_dir)["bn.running_var"])


# --------------------------------------------------------------------------------------------------
# inspect and variants
# --------------------------------------------------------------------------------------------------
def test_inspect_names_every_family(files):
    root = ck.inspect(files["diffusers"])
    assert root["family"] == "diffusers" and root["variant"] == "turbo"
    comps = root["components"]
    assert comps["transformer"]["family"] == "diffusers-transformer" and comps["transformer"]["files"] == 2
    assert comps["text_encoder"]["family"] == "diffusers-text-encoder-mxfp4" and comps["text_encoder"]["files"] == 3
    assert comps["vae"]["family"] == "diffusers-vae"
    assert "size_bytes" in comps["tokenizer"]
    for fam in ("comfy-dit-bf16", "comfy-dit-mxfp8", "comfy-te-nvfp4", "vae-diffusers", "vae-bfl"):
        info = ck.inspect(files[fam])
        assert info["family"] == fam, (fam, info)
        assert info["tensors"] > 0 and info["size_bytes"] == os.path.getsize(files[fam])
    assert ck.inspect(files["comfy-dit-mxfp8"])["quantized_layers"] == 16
    assert ck.inspect(files["comfy-te-nvfp4"])["embedded_tokenizer"] is True


def test_variant_detection_and_override(files):
    assert ck.detect_variant(files["comfy-dit-bf16"])[0] == "lens"
    assert ck.detect_variant(files["comfy-dit-mxfp8"])[0] == "turbo"
    assert ck.detect_variant("/x/Lens-Base/transformer")[0] == "base"
    assert ck.detect_variant(files["comfy-dit-mxfp8"], override="Lens-Base") == ("base", "caller")
    with pytest.raises(ValueError):
        ck.detect_variant(files["comfy-dit-bf16"], override="sdxl")


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def _raises(fn, *needles):
    with pytest.raises(ck.CheckpointError) as exc:
        fn()
    msg = str(exc.value)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_vae_given_as_dit(files):
    _raises(lambda: ck.load_transformer(files["vae-diffusers"]), str(files["vae-diffusers"]), "expected a Lens DiT",
            "FLUX.2 VAE")


def test_dit_given_as_vae_and_te(files):
    _raises(lambda: ck.load_vae(files["comfy-dit-bf16"]), "expected a FLUX.2 VAE", "Lens DiT")
    _raises(lambda: ck.load_text_encoder(files["comfy-dit-bf16"]), "GPT-OSS", "Lens DiT")


def test_sd_and_flux1_checkpoints(tmp_path):
    sd = fx.write_sd_checkpoint(tmp_path / "v1-5-pruned.safetensors")
    _raises(lambda: ck.load_transformer(sd), str(sd), "Stable Diffusion")
    fl = fx.write_flux1_checkpoint(tmp_path / "flux1-dev.safetensors")
    _raises(lambda: ck.load_transformer(fl), str(fl), "FLUX")
    assert ck.inspect(fl)["family"] == "unknown" and "FLUX" in ck.inspect(fl)["looks_like"]


def test_truncated_safetensors(files, tmp_path):
    bad = fx.write_truncated(files["comfy-dit-bf16"], tmp_path / "lens_bf16.safetensors")
    _raises(lambda: ck.load_transformer(bad), str(bad), "truncated")
    tiny = tmp_path / "empty.safetensors"
    tiny.write_bytes(b"\x01\x02")
    _raises(lambda: ck.load_transformer(tiny), str(tiny), "truncated")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes((20).to_bytes(8, "little") + b"not json at all....." + b"\x00" * 64)
    _raises(lambda: ck.load_transformer(junk), str(junk), "corrupt")


def test_missing_shard(files, tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(files["diffusers"] / "transformer", folder)
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    _raises(lambda: ck.load_transformer(folder), "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model-00002-of-00002.safetensors", "missing")


def test_folder_without_tokenizer(files, tmp_path):
    root = tmp_path / "Lens"
    shutil.copytree(files["diffusers"], root)
    (root / "tokenizer" / "tokenizer.json").unlink()
    _raises(lambda: ck.load_tokenizer(root), str(root), "without tokenizer", "chat_template.jinja")
    _raises(lambda: ck.load_tokenizer(files["comfy-dit-bf16"]), "Lens DiT", "tokenizer")


@pytest.mark.parametrize("name", ["lens.ckpt", "lens.pt", "model.pth", "pytorch_model.bin"])
def test_pickle_refused(tmp_path, name):
    p = fx.write_pickle_lookalike(tmp_path / name)
    _raises(lambda: ck.load_transformer(p), str(p), "pickle", "safetensors only")


def test_pickle_renamed_to_safetensors_refused(tmp_path):
    p = fx.write_pickle_lookalike(tmp_path / "lens.safetensors")
    _raises(lambda: ck.load_transformer(p), str(p), "pickle")


def test_pickle_only_folder_refused(tmp_path):
    d = tmp_path / "transformer"
    d.mkdir()
    fx.write_pickle_lookalike(d / "diffusion_pytorch_model.bin")
    _raises(lambda: ck.load_transformer(d), str(d), "pickle")


def test_unknown_quantization_marker(golden_dir, tmp_path):
    p, _ = fx.write_comfy_dit_mxfp8(tmp_path / "lens_int4.safetensors", golden_dir, marker_format="awq_int4")
    _raises(lambda: ck.load_transformer(p), str(p), "quantization marker", "awq_int4", "mxfp8")


def test_unknown_marker_in_header_metadata(golden_dir, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.to(torch.bfloat16) for k, v in fx.dit_state_dict(golden_dir).items()}
    p = tmp_path / "lens_meta.safetensors"
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                  "layers": {"proj_out": {"format": "float8_scaled"}}})}
    save_file(sd, str(p), metadata=meta)
    _raises(lambda: ck.load_transformer(p), str(p), "float8_scaled")


@pytest.mark.parametrize("pad_to", [0x80, 0x4B50])
def test_header_length_starting_like_a_pickle_or_zip_still_loads(tmp_path, pad_to):
    """A valid file whose 8-byte header length begins with 0x80 (1 file in 256) or "PK" is safetensors."""
    from safetensors.torch import save_file

    p = tmp_path / "x.safetensors"
    t = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    # Grow the metadata until the header length's low bytes read 0x80 / "PK" (little endian).
    for extra in range(0, 70000):
        save_file(t, str(p), metadata={"pad": "x" * extra})
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        if (n & (0xFF if pad_to == 0x80 else 0xFFFF)) == pad_to:
            break
    else:
        pytest.fail("could not build the header length")
    f = ck.SafetensorsFile(p)
    assert set(f.entries) == {"w"}
