"""``python -m lens_core quantize`` (issue 23 part 5) without ComfyUI: the file against comfy-kitchen's own
quantization of the source (read with the reference readers: ``safetensors``, ``gguf``), every input family,
hostile inputs and the no-clobber rules. The real ComfyUI 0.33 checks are in tests/test_comfyui_quantize.py."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fixtures as fx
from lens_core import checkpoints as ck
from lens_core.__main__ import main
from lens_core.convert import RECIPES, ConvertError, quantize_file

kitchen = pytest.importorskip("comfy_kitchen.tensor")     # pinned in requirements-dev.txt: always there in CI

QUANTIZED = ("attn.img_qkv", "attn.txt_qkv", "attn.to_out.0", "attn.to_add_out", "img_mlp.w1", "img_mlp.w3",
             "txt_mlp.w1", "txt_mlp.w3")


def reference(w: torch.Tensor, fmt: str, group: int) -> dict:
    """comfy-kitchen's own state dict of ``w`` in the layout ComfyUI maps the format to (comfy/quant_ops.py)."""
    kw = {"int8_convrot": dict(per_channel=True, convrot=True, convrot_groupsize=group),
          "int8": dict(per_channel=True), "convrot_w4a4": dict(convrot_groupsize=group),
          "fp8_scaled": dict(dtype=torch.float8_e4m3fn), "fp8_e5m2_scaled": dict(dtype=torch.float8_e5m2),
          "mxfp8": {}, "nvfp4": {}}[fmt]
    layout = {"int8_convrot": "TensorWiseINT8Layout", "int8": "TensorWiseINT8Layout",
              "convrot_w4a4": "TensorCoreConvRotW4A4Layout", "fp8_scaled": "TensorCoreFP8Layout",
              "fp8_e5m2_scaled": "TensorCoreFP8Layout", "mxfp8": "TensorCoreMXFP8Layout",
              "nvfp4": "TensorCoreNVFP4Layout"}[fmt]
    return kitchen.QuantizedTensor.from_float(w.float(), layout, **kw).state_dict("weight")


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def source(golden_dir):
    return golden_dir / "pipeline_tiny" / "transformer"


@pytest.mark.parametrize("fmt", sorted(RECIPES))
def test_file_equals_comfy_kitchen_quantization(source, tmp_path, fmt):
    out = tmp_path / f"lens_{fmt}.safetensors"
    s = quantize_file(source, out, fmt)
    ref_sd = load_file(str(source / "diffusion_pytorch_model.safetensors"))
    with safe_open(str(out), "pt") as f:                    # the reference reader
        keys, meta = set(f.keys()), f.metadata()
        got = {k: f.get_tensor(k) for k in keys}
    assert meta["quantized_from"] == "pipeline_tiny/transformer" and meta["quantization_format"] == fmt
    assert meta["quantized_from_family"] == "diffusers-transformer" and "comfy-kitchen 0.2.31" in meta["quantized_by"]
    marked = sorted(k[: -len(".comfy_quant")] for k in keys if k.endswith(".comfy_quant"))
    assert len(marked) == s["quantized_layers"]
    wide = RECIPES[fmt].in_multiple == 1 and RECIPES[fmt].out_multiple == 1 and not RECIPES[fmt].convrot
    expect = [f"transformer_blocks.{b}.{n}" for b in (0, 1) for n in QUANTIZED
              if wide or fmt in ("int8_convrot", "convrot_w4a4") or n.startswith("attn")]
    if wide:
        expect += [f"transformer_blocks.{b}.{m}.w2" for b in (0, 1) for m in ("img_mlp", "txt_mlp")]
    assert marked == sorted(expect)
    for layer in marked:
        m = json.loads(bytes(got[layer + ".comfy_quant"].tolist()))
        group = m.get("convrot_groupsize", 0)
        assert m["format"] == {"int8_convrot": "int8_tensorwise", "int8": "int8_tensorwise",
                               "fp8_scaled": "float8_e4m3fn", "fp8_e5m2_scaled": "float8_e5m2"}.get(fmt, fmt)
        if RECIPES[fmt].convrot:
            assert group == 64 and (fmt == "convrot_w4a4" or m["convrot"] is True)   # 128 inputs: g256 → g64
        ref = reference(ref_sd[layer + ".weight"], fmt, group)
        for k, t in ref.items():
            assert torch.equal(bytes_of(got[f"{layer}.{k}"]), bytes_of(t)), (layer, k)
        assert {k for k in keys if k.startswith(layer + ".weight")} == {f"{layer}.{k}" for k in ref}
    # everything else: bf16 of the source, nothing missing or added
    rest = {k for k in keys if not any(k.startswith(layer + ".") and not k.endswith(".bias") for layer in marked)}
    assert rest == set(ref_sd) - {layer + ".weight" for layer in marked}
    for k in rest:
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], ref_sd[k].to(torch.bfloat16)), k
    # every tensor starts at a multiple of its element size (no misaligned reads in any loader)
    with ck.SafetensorsFile(out) as f:
        assert all((e.start - f.data_start) % ck.ST_DTYPES[e.dtype].itemsize == 0 for e in f.entries.values())
        assert f.data_start % 8 == 0


def test_every_input_family(golden_dir, tmp_path):
    """diffusers folder, Comfy-Org bf16 single file under model.diffusion_model., F16 GGUF: each converts, and
    its quantized weights are comfy-kitchen's quantization of that file's own values (read with safetensors /
    gguf); the variant found in the input's name is recorded first in the metadata."""
    import gguf

    comfy = fx.write_comfy_dit_bf16(tmp_path / "lens_turbo_bf16.safetensors", golden_dir, which="pipeline_tiny",
                                    prefix="model.diffusion_model.")
    g, types = fx.write_gguf_dit(tmp_path / "lens-turbo-F16.gguf", golden_dir, "F16", which="pipeline_tiny")
    reader = gguf.GGUFReader(str(g))
    gguf_values = {t.name: torch.from_numpy(np.array(t.data)).reshape(tuple(reversed(t.shape.tolist())))
                   for t in reader.tensors}
    layer = "transformer_blocks.1.attn.img_qkv"
    for src, values in ((comfy, {k[len("model.diffusion_model."):]: v for k, v in load_file(str(comfy)).items()}),
                        (g, gguf_values)):
        out = tmp_path / f"{src.stem}.int8.safetensors"
        s = quantize_file(src, out, "int8_convrot")
        assert s["variant"] == "turbo" and s["quantized_layers"] == 16
        with ck.SafetensorsFile(out) as f:
            assert next(iter(f.metadata.items())) == ("lens_variant", "Lens-Turbo")
            ref = reference(values[layer + ".weight"], "int8_convrot", 64)
            assert torch.equal(f.read(layer + ".weight"), ref["weight"])
            assert torch.equal(f.read(layer + ".weight_scale"), ref["weight_scale"])
            assert "model.diffusion_model.img_in.weight" not in f.entries and "img_in.weight" in f.entries
        assert ck.detect_variant(out, ck.open_source(out))[0] == "turbo"
    assert types[layer + ".weight"] == "F16"


def test_refuses_and_never_clobbers(golden_dir, source, tmp_path):
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
        quantize_file(source, out, "int8")
    assert out.read_bytes() == b"precious"
    quantize_file(source, out, "int8", overwrite=True)
    assert out.stat().st_size > 1000
    comfy = fx.write_comfy_dit_bf16(tmp_path / "lens_bf16.safetensors", golden_dir, which="pipeline_tiny")
    with pytest.raises(ConvertError, match="is the input file itself"):
        quantize_file(comfy, comfy, "int8", overwrite=True)
    with pytest.raises(ConvertError, match=r"expected a \.safetensors file name"):
        quantize_file(source, tmp_path / "q.gguf", "int8")
    with pytest.raises(ConvertError, match="--format 'int3'"):
        quantize_file(source, tmp_path / "x.safetensors", "int3")
    with pytest.raises(ConvertError, match="--convrot-groupsize 100: expected a power of 4"):
        quantize_file(source, tmp_path / "x.safetensors", "int8_convrot", groupsize=100)
    # already quantized inputs: a second rounding is refused
    mx, _ = fx.write_comfy_dit_mxfp8(tmp_path / "lens_mxfp8.safetensors", golden_dir)
    with pytest.raises(ConvertError, match="already a quantized ComfyUI file"):
        quantize_file(mx, tmp_path / "x.safetensors", "int8")
    q8, _ = fx.write_gguf_dit(tmp_path / "lens-Q8_0.gguf", golden_dir, "Q8_0")
    with pytest.raises(ConvertError, match=r"stored as \['Q8_0'\]"):
        quantize_file(q8, tmp_path / "x.safetensors", "int8")
    # not a DiT, truncated, incomplete, NaN
    with pytest.raises(ck.CheckpointError, match="expected a Lens DiT"):
        quantize_file(golden_dir / "pipeline_tiny" / "vae", tmp_path / "x.safetensors", "int8")
    with pytest.raises(ck.CheckpointError, match="truncated"):
        quantize_file(fx.write_truncated(comfy, tmp_path / "cut.safetensors"), tmp_path / "x.safetensors", "int8")
    sd = load_file(str(comfy))
    del sd["transformer_blocks.1.img_mlp.w3.weight"]
    save_file(sd, str(tmp_path / "hole.safetensors"))
    with pytest.raises(ConvertError, match=r"not a complete Lens DiT.*missing \['transformer_blocks.1.img_mlp.w3"):
        quantize_file(tmp_path / "hole.safetensors", tmp_path / "x.safetensors", "int8")
    sd = load_file(str(comfy))
    sd["transformer_blocks.1.attn.to_out.0.weight"][3, 5] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ConvertError, match=r"'transformer_blocks.1.attn.to_out.0.weight' holds 1 NaN/inf"):
        quantize_file(tmp_path / "nan.safetensors", tmp_path / "x.safetensors", "int8")
    # failures leave neither OUT nor a temporary file behind
    assert not (tmp_path / "x.safetensors").exists()
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_cli(source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "lens_w4a4.safetensors"
    assert main(["quantize", str(source), str(out), "--format", "convrot_w4a4", "--quiet"]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"{out}: convrot_w4a4, 16 Linears quantized, 4 kept in bf16") and "341 inputs" not in line
    assert main(["quantize", str(source), str(out), "--format", "convrot_w4a4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: OUT {out}: already exists") and err.count("\n") == 1
    # comfy-kitchen missing: exit 3, the install command named, nothing written
    import sys

    from lens_core import quant_formats as qf

    monkeypatch.setitem(sys.modules, "comfy_kitchen", None)
    monkeypatch.setitem(sys.modules, "comfy_kitchen.tensor", None)
    qf._kitchen_tensor.cache_clear()                 # found again on first use: now missing
    monkeypatch.setattr(qf, "_kitchen_tensor", qf._kitchen_tensor.__wrapped__)
    assert main(["quantize", str(source), str(tmp_path / "n.safetensors"), "--format", "int8"]) == 3
    err = capsys.readouterr().err
    assert "pip install comfy-kitchen==0.2.31" in err and "Traceback" not in err
    assert not (tmp_path / "n.safetensors").exists()
