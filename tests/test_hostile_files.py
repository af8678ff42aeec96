"""Hostile files, round 2 (issue 25): weights holding NaN/inf (safetensors and GGUF, float and quantized),
a cut safetensors header whose length begins with 0x80, symlink loops, the variant guessed from a grand-parent
folder. Each case ends as an error naming the file and the fix (or the documented behaviour)."""
from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fixtures as fx
from lens_core import checkpoints as ck
from lens_core import finite
from lens_core.checkpoints.safetensors import SafetensorsFile


def bf16_dit(golden_dir) -> dict:
    return {k: v.to(torch.bfloat16) for k, v in fx.dit_state_dict(golden_dir).items()}


def run_tiny(model, golden_dir):
    cfg = model.config
    x = torch.randn(1, 24, cfg.in_channels)
    feats = torch.randn(1, 3, cfg.num_text_layers * cfg.enc_hidden_dim)
    with torch.no_grad():
        return model(x, feats, torch.ones(1, 3, dtype=torch.bool), torch.tensor([0.5]), grid=(4, 6))


# ---------------------------------------------------------------------------------------------------------
# NaN / inf weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_dit_safetensors_with_non_finite_weights(tmp_path, golden_dir, bad):
    """The DiT's float weights are checked once, at its first forward (a full pass at load costs more than the
    10 % budget: BENCHMARKS.md), naming the file, the tensor and the first bad index — before any output."""
    sd = bf16_dit(golden_dir)
    sd["transformer_blocks.1.img_mlp.w2.weight"][3, 5] = bad
    save_file(sd, str(tmp_path / "lens_nan.safetensors"))
    m = ck.load_transformer(tmp_path / "lens_nan.safetensors", dtype=torch.float32)
    assert finite.pending_first_use(m) == [""]           # the model itself, at its first forward
    for _ in range(2):                                   # and again: a failed check stays pending
        with pytest.raises(ck.CheckpointError, match=r"lens_nan\.safetensors: tensor 'transformer_blocks\.1\.img_mlp"
                                                     r"\.w2\.weight' holds .*first at index \[3, 5\].*black.*Fix: .*download"):
            run_tiny(m, golden_dir)
    # a clean file: checked at its first forward, then nothing more to do
    sd["transformer_blocks.1.img_mlp.w2.weight"][3, 5] = 0.0
    save_file(sd, str(tmp_path / "lens_ok.safetensors"))
    m = ck.load_transformer(tmp_path / "lens_ok.safetensors", dtype=torch.float32)
    assert torch.isfinite(run_tiny(m, golden_dir)).all() and finite.pending_first_use(m) == []


def test_upcast_layers_get_no_check_of_their_own(tmp_path, golden_dir):
    """bf16 weights kept under fp32 compute (UpcastLinear) are plain float tensors: the model's float checks cover
    them (the DiT's at its first forward, the text encoder's at load), so no layer gets a first-use check of its
    own (an fp32 copy of its weight); a NaN in one is still reported by the DiT's pass, naming the tensor."""
    from lens_core.upcast import UpcastLinear

    sd = bf16_dit(golden_dir)
    sd["transformer_blocks.1.img_mlp.w2.weight"][2, 1] = float("nan")
    save_file(sd, str(tmp_path / "lens_nan.safetensors"))
    m = ck.load_transformer(tmp_path / "lens_nan.safetensors", dtype=torch.float32, storage="stored")
    upcast = [n for n, mod in m.named_modules() if isinstance(mod, UpcastLinear)]
    assert "transformer_blocks.1.img_mlp.w2" in upcast and len(upcast) > 20
    assert finite.pending_first_use(m) == [""]
    with pytest.raises(ck.CheckpointError, match=r"tensor 'transformer_blocks\.1\.img_mlp\.w2\.weight' holds 1 NaN "
                                                 r".*first at index \[2, 1\]"):
        run_tiny(m, golden_dir)
    te = ck.load_text_encoder(golden_dir / "pipeline_tiny" / "text_encoder", dtype=torch.float32, storage="stored",
                              selected_layers=(1, 2))
    assert any(isinstance(mod, UpcastLinear) for mod in te.modules()) and finite.pending_first_use(te) == []


def test_check_can_be_switched_off_for_measuring(tmp_path, golden_dir, monkeypatch):
    sd = bf16_dit(golden_dir)
    sd["img_in.bias"][0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    monkeypatch.setenv("LENS_CHECK_WEIGHTS", "0")
    m = ck.load_transformer(tmp_path / "nan.safetensors", dtype=torch.float32)
    assert finite.pending_first_use(m) == [] and run_tiny(m, golden_dir).isnan().any()


def test_vae_and_text_encoder_weights_checked_at_load(tmp_path, golden_dir, tokenizer_json):
    """VAE and text-encoder float tensors are a small part of what they read: checked as they are read."""
    from safetensors.torch import load_file

    path = fx.write_vae(tmp_path / "flux2-vae.safetensors", golden_dir)
    sd = load_file(str(path))
    key = next(k for k in sorted(sd) if k.endswith("conv_in.weight"))
    sd[key].view(-1)[11] = float("inf")
    save_file(sd, str(path))
    with pytest.raises(ck.CheckpointError, match=rf"flux2-vae\.safetensors: tensor '.*conv_in\.weight' holds 0 NaN "
                                                 rf"and 1 ±inf"):
        ck.load_vae(path, config=fx.vae_config(golden_dir))
    te = fx.write_comfy_te_nvfp4(tmp_path / "te.safetensors", golden_dir, tokenizer_json)
    sd = load_file(str(te))
    sd["embed_tokens.weight"][5, 3] = float("nan")
    save_file(sd, str(te))
    with pytest.raises(ck.CheckpointError, match=r"te\.safetensors: tensor 'model\.embed_tokens\.weight' holds 1 NaN"):
        ck.load_text_encoder(te, dtype=torch.float32, config=fx.te_config(golden_dir), selected_layers=(1, 3, 4, 5))


def _gguf_with(path, golden_dir, qtype, corrupt):
    """The tiny DiT as a GGUF of ``qtype`` with ``corrupt(name, data)`` applied to the stored arrays."""
    w = fx._gguf_writer(path, None)
    w.add_uint32("general.alignment", 32)
    for k, v in fx.dit_state_dict(golden_dir).items():
        data, raw = fx.gguf_quantize(v, fx.sdcpp_type(k, v, qtype))
        w.add_tensor(k, corrupt(k, np.array(data)), raw_dtype=raw)
    fx._gguf_write(w)
    return path


def test_gguf_dit_float_tensor_with_nan(tmp_path, golden_dir):
    pytest.importorskip("gguf")

    def corrupt(k, data):
        if k == "txt_in.weight":
            data.flat[7] = np.nan
        return data

    path = _gguf_with(tmp_path / "lens-F16.gguf", golden_dir, "F16", corrupt)
    m = ck.load_transformer(path, dtype=torch.float32)
    with pytest.raises(ck.CheckpointError, match=r"lens-F16\.gguf: tensor 'txt_in\.weight' holds 1 NaN"):
        run_tiny(m, golden_dir)


def test_gguf_dit_quantized_block_with_nan_scale(tmp_path, golden_dir):
    """A Q8_0 block whose f16 scale is NaN: the layer stays quantized at load (checking would mean dequantizing
    the whole model), so its first use checks the dequantized weight and names the layer — before any output."""
    pytest.importorskip("gguf")
    target = "transformer_blocks.0.attn.img_qkv.weight"

    def corrupt(k, data):
        if k == target:
            data = data.copy()
            data.reshape(-1, 34)[2, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)   # block 2's d
        return data

    path = _gguf_with(tmp_path / "lens-Q8_0.gguf", golden_dir, "Q8_0", corrupt)
    m = ck.load_transformer(path, dtype=torch.float32)
    pending = finite.pending_first_use(m)
    assert "transformer_blocks.0.attn.img_qkv" in pending and "" in pending and len(pending) > 10
    with pytest.raises(ck.CheckpointError, match=r"lens-Q8_0\.gguf: the weight of transformer_blocks\.0\.attn\."
                                                 r"img_qkv \(Q8_0 storage\) dequantizes to 32 NaN.*Fix"):
        run_tiny(m, golden_dir)
    # a clean Q8_0 file: every layer checked once at its first use, then the hooks do nothing
    clean = ck.load_transformer(_gguf_with(tmp_path / "ok.gguf", golden_dir, "Q8_0", lambda k, d: d),
                                dtype=torch.float32)
    a = run_tiny(clean, golden_dir)
    assert finite.pending_first_use(clean) == [] and torch.isfinite(a).all()


# ---------------------------------------------------------------------------------------------------------
# a cut safetensors file whose header length starts with 0x80


def test_cut_header_with_length_starting_0x80_is_a_damaged_safetensors(tmp_path):
    """A header of 0x..80 bytes (its length's first little-endian byte is 0x80, like a pickle's first byte),
    cut short: reported as a truncated safetensors file, not as "a pickle / torch.save file"."""
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    raw += b" " * (0x180 - len(raw))
    assert len(raw).to_bytes(8, "little")[0] == 0x80
    whole = len(raw).to_bytes(8, "little") + raw + b"\0" * 8
    (tmp_path / "ok.safetensors").write_bytes(whole)
    assert tuple(SafetensorsFile(tmp_path / "ok.safetensors").entries["w"].shape) == (2,)
    (tmp_path / "cut.safetensors").write_bytes(whole[:200])
    with pytest.raises(ck.CheckpointError) as exc:
        SafetensorsFile(tmp_path / "cut.safetensors")
    msg = str(exc.value)
    assert "pickle" not in msg and "header of 384 bytes" in msg and "200-byte file (truncated" in msg, msg
    # a real pickle (protocol 2+) is still named as one
    (tmp_path / "real.safetensors").write_bytes(b"\x80\x04\x95" + b"\0" * 40)
    with pytest.raises(ck.CheckpointError, match="a pickle / torch.save file"):
        SafetensorsFile(tmp_path / "real.safetensors")


# ---------------------------------------------------------------------------------------------------------
# symlink loops and broken links


def test_symlink_loops_are_reported_as_loops(tmp_path):
    from lens_core.images import open_image
    from lens_core.pipeline import resolve_paths

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    os.symlink(b, a)
    os.symlink(a, b)
    broken = tmp_path / "gone.safetensors"
    os.symlink(tmp_path / "nowhere.safetensors", broken)
    from lens_core import lora

    for call in (SafetensorsFile, ck.load_transformer, ck.inspect, lora.load_lora, open_image, resolve_paths):
        with pytest.raises(OSError) as exc:
            call(a)
        assert exc.value.errno == errno.ELOOP and "symbolic-link loop" in str(exc.value), str(exc.value)
        with pytest.raises(FileNotFoundError, match=r"gone\.safetensors: a broken symbolic link to .*nowhere"):
            call(broken)


def test_cli_names_a_symlink_loop(tmp_path, pipeline_dir, capsys):
    from lens_core.__main__ import main

    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    assert main(["inspect", str(loop)]) == 2
    err = capsys.readouterr().err
    assert "symbolic-link loop" in err and "no such file" not in err, err
    assert main(["generate", "--model", str(loop), "--prompt", "x", "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "symbolic-link loop" in err, err


# ---------------------------------------------------------------------------------------------------------
# variant from the path: the file, its folder and (diffusers) the model folder — never a grand-parent


def test_variant_not_guessed_from_a_grand_parent_folder(tmp_path, golden_dir):
    sd = bf16_dit(golden_dir)
    deep = tmp_path / "turbo-experiments" / "checkpoints"
    deep.mkdir(parents=True)
    save_file(sd, str(deep / "model.safetensors"), metadata={"format": "pt"})
    m = ck.load_transformer(deep / "model.safetensors", dtype=torch.float32)
    assert (m.lens_checkpoint.variant, m.lens_checkpoint.variant_source) == ("lens", "default (no variant hint found)")
    # the file's own folder still counts, and so does the file name
    (tmp_path / "Lens-Turbo").mkdir()
    save_file(sd, str(tmp_path / "Lens-Turbo" / "model.safetensors"), metadata={"format": "pt"})
    assert ck.detect_variant(tmp_path / "Lens-Turbo" / "model.safetensors")[0] == "turbo"
    assert ck.detect_variant(deep / "lens_turbo_bf16.safetensors")[0] == "turbo"
    # a diffusers folder: transformer/ is a component folder, the model folder above it names the variant
    root = tmp_path / "turbo-runs" / "Lens-Base"
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    assert ck.detect_variant(root / "transformer" / "diffusion_pytorch_model.safetensors")[0] == "base"
    assert ck.detect_variant(root / "transformer")[0] == "base" and ck.detect_variant(root)[0] == "base"
    plain = tmp_path / "turbo-runs" / "my-model"
    (plain / "transformer").mkdir(parents=True)
    assert ck.detect_variant(plain / "transformer" / "diffusion_pytorch_model.safetensors")[0] == "lens"
    # a Hugging Face cache snapshot: the repository folder models--org--name is the model folder
    snap = tmp_path / "hub" / "models--microsoft--Lens-Turbo" / "snapshots" / "0123abcd"
    (snap / "transformer").mkdir(parents=True)
    assert ck.detect_variant(snap / "transformer" / "diffusion_pytorch_model.safetensors")[0] == "turbo"


def test_missing_paths_one_message_shape(tmp_path):
    """Every reader reports a missing path through checks.missing_path: a broken link names its target, a
    missing file says so with the reader's fix, a missing model path lists what its folder holds."""
    from lens_core.images import open_image
    from lens_core.pipeline import resolve_paths

    (tmp_path / "link.safetensors").symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(FileNotFoundError, match=r"link\.safetensors: a broken symbolic link to .*gone\.safetensors"):
        ck.SafetensorsFile(tmp_path / "link.safetensors")
    with pytest.raises(FileNotFoundError, match=r"none\.gguf: no such file; fix: check the path$"):
        ck.GGUFFile(tmp_path / "none.gguf")
    with pytest.raises(FileNotFoundError, match=r"^image .*x\.png: no such file; fix: pass an existing PNG"):
        open_image(tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match=r"model: no such file or folder; fix: check the path \(.* holds "
                                                r"\['link\.safetensors'\]\)"):
        resolve_paths(tmp_path / "model")
