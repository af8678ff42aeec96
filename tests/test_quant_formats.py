"""ComfyUI's ``.comfy_quant`` formats (issue 23): tiny DiTs written the way ComfyUI writes them (comfy-kitchen's
quantizers, ``tests/fixtures.py write_comfy_dit_quant``) load kept quantized, their dequantized weights are
comfy-kitchen's bit for bit, each layer's output is ComfyUI's quantized Linear's, LoRA on them equals the hand
merge, the int8 ConvRot pipeline image stays within 2 % of the bf16 one, and hostile files fail naming the layer.

References (never lens_core itself): comfy-kitchen 0.2.31 (the library ComfyUI 0.33 computes these formats with)
used here as ComfyUI 0.33's ``mixed_precision_ops`` Linear uses it on the CPU: the weight is a
``QuantizedTensor`` built from the file's tensors (``_load_quantized_module``); fp8 / MXFP8 / NVFP4 matmuls are
disabled on the CPU (dequantize in the activation dtype, then ``F.linear``); ``int8_tensorwise``,
``convrot_w4a4`` and ``asym_w4a8_int8`` run ``F.linear(x, QuantizedTensor)`` (activation quantization). The real
ComfyUI Linear is compared in tests/test_comfyui_quant.py (``-m comfyui``).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fixtures as fx
import lora_fixtures as lf
from test_checkpoints import dit_io, rel, run_dit  # noqa: F401 (dit_io is a fixture)
from lens_core import checkpoints as ck
from lens_core import lora as lo
from lens_core import quant_formats as qf
from lens_core import quant_linear as ql
from lens_core.config import LensDiTConfig
from lens_core.dit import LensTransformer

ckt = pytest.importorskip("comfy_kitchen.tensor")   # pinned in requirements-dev.txt

FORMATS = {
    "float8_e4m3fn": {}, "float8_e5m2": {}, "mxfp8": {}, "nvfp4": {},
    "int8_tensorwise": {"convrot": True, "convrot_groupsize": 64},
    "convrot_w4a4": {"convrot_groupsize": 64, "linear_dtype": "int4"},
    "asym_w4a8_int8": {"group_size": 16, "convrot_groupsize": 64},
}
INT8_PLAIN = {"convrot": False}
LAYOUT = {"float8_e4m3fn": "TensorCoreFP8Layout", "float8_e5m2": "TensorCoreFP8Layout",
          "mxfp8": "TensorCoreMXFP8Layout", "nvfp4": "TensorCoreNVFP4Layout", "int8_tensorwise": "TensorWiseINT8Layout",
          "convrot_w4a4": "TensorCoreConvRotW4A4Layout", "asym_w4a8_int8": "AsymW4A8Int8Layout"}
ACT_QUANT = ("int8_tensorwise", "convrot_w4a4", "asym_w4a8_int8")   # what ComfyUI runs quantized on the CPU


def reference_qtensor(f: dict, layer: str, fmt: str, marker: dict, shape, dtype):
    """comfy-kitchen's QuantizedTensor of ``layer`` from the file's tensors ``f``, built as ComfyUI 0.33's
    ``_load_quantized_module`` builds it (its per-format scale handling), dequantizing to ``dtype``."""
    g = lambda s: f.get(f"{layer}.{s}")  # noqa: E731
    opt = lambda k, d: marker.get(k, marker.get("params", {}).get(k, d))  # noqa: E731
    L = ckt
    if fmt.startswith("float8"):
        p = L.TensorCoreFP8Layout.Params(scale=g("weight_scale"), orig_dtype=dtype, orig_shape=shape)
    elif fmt == "mxfp8":
        p = L.TensorCoreMXFP8Layout.Params(scale=g("weight_scale").view(torch.float8_e8m0fnu), orig_dtype=dtype,
                                           orig_shape=shape)
    elif fmt == "nvfp4":
        p = L.TensorCoreNVFP4Layout.Params(scale=g("weight_scale_2"), orig_dtype=dtype, orig_shape=shape,
                                           block_scale=g("weight_scale").view(torch.float8_e4m3fn))
    elif fmt == "int8_tensorwise":
        p = L.TensorWiseINT8Layout.Params(scale=g("weight_scale"), orig_dtype=dtype, orig_shape=shape,
                                          convrot=bool(opt("convrot", False)),
                                          convrot_groupsize=int(opt("convrot_groupsize", 256)))
    elif fmt == "convrot_w4a4":
        p = L.TensorCoreConvRotW4A4Layout.Params(scale=g("weight_scale"), orig_dtype=dtype, orig_shape=shape,
                                                 convrot_groupsize=int(opt("convrot_groupsize", 256)),
                                                 quant_group_size=64, linear_dtype=opt("linear_dtype", "int4"))
    else:
        s_rel = g("weight_s_rel")
        p = L.AsymW4A8Int8Layout.Params(scale=s_rel.view(torch.float8_e4m3fn) if s_rel.dtype == torch.uint8 else s_rel,
                                        orig_dtype=dtype, orig_shape=shape, s_channel=g("weight_s_channel"),
                                        codebook=g("weight_codebook"), group_size=int(opt("group_size", 16)),
                                        convrot_groupsize=int(opt("convrot_groupsize", 256)))
    return L.QuantizedTensor(g("weight"), LAYOUT[fmt], p)


def comfy_linear(x, f, layer, fmt, marker, shape, bias):
    """ComfyUI 0.33's quantized Linear on the CPU (see the module docstring)."""
    qt = reference_qtensor(f, layer, fmt, marker, shape, x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    if fmt in ACT_QUANT:
        return F.linear(x, qt, b)
    return F.linear(x, qt.dequantize(), b)


def markers_of(path) -> dict:
    f = load_file(str(path))
    return {k[: -len(".comfy_quant")]: json.loads(bytes(v.tolist()).decode()) for k, v in f.items()
            if k.endswith(".comfy_quant")}


def resident_bytes(model) -> int:
    persistent = set(model.state_dict())
    return sum(t.numel() * t.element_size() for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if n in persistent)


@pytest.fixture(scope="module")
def qfiles(golden_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("comfy_quant")
    files = {fmt: fx.write_comfy_dit_quant(out / f"lens_turbo_{fmt}.safetensors", golden_dir, (fmt, opts))
             for fmt, opts in FORMATS.items()}
    files["int8_plain"] = fx.write_comfy_dit_quant(out / "lens_int8.safetensors", golden_dir,
                                                   ("int8_tensorwise", INT8_PLAIN))
    return files


@pytest.mark.parametrize("fmt", sorted(FORMATS) + ["int8_plain"])
def test_format_loads_kept_quantized_and_matches_comfy_kitchen(qfiles, fmt, dit_io, golden_dir):
    """Every quantized layer of the file stays in its format (resident ≤ 1.1 × the file), its dequantized weight is
    comfy-kitchen's ``QuantizedTensor.dequantize()`` bit for bit (fp32 and bf16), its output is ComfyUI's
    quantized Linear's (bit for bit; fp32 rounding allowed), and the whole DiT stays near the unquantized one."""
    path, layers = qfiles[fmt]
    name = "int8_tensorwise" if fmt == "int8_plain" else fmt
    m = ck.load_transformer(path, dtype=torch.float32)
    assert m.lens_checkpoint.family == f"comfy-dit-{name}"
    assert m.lens_checkpoint.extra["quantized_layers"] == {name: len(layers)}
    size = os.path.getsize(path)
    resident = resident_bytes(ck.load_transformer(path, dtype=torch.bfloat16))    # the file's float dtype
    assert resident <= 1.1 * size, (resident, size)
    f, markers = load_file(str(path)), markers_of(path)
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(3))
    for layer in layers:
        mod = m.get_submodule(layer)
        assert isinstance(mod, ql.QuantLinear) and mod.format.name == name
        assert mod.weight.dtype == f[layer + ".weight"].dtype or mod.weight.element_size() == 1
        shape = (mod.out_features, mod.in_features)
        for dt in (torch.float32, torch.bfloat16):
            ref = reference_qtensor(f, layer, name, markers[layer], shape, dt).dequantize()
            assert torch.equal(mod.dequantized_weight(dt), ref), (layer, dt)
            if mod.in_features != x.shape[-1]:
                continue
            got, want = mod(x.to(dt)), comfy_linear(x.to(dt), f, layer, name, markers[layer], shape, mod.bias)
            assert got.dtype == dt and got.shape == want.shape
            assert (got.float() - want.float()).abs().max() <= 1e-6 * want.float().abs().max(), (layer, dt)
    out = run_dit(m, dit_io)
    err = rel(out, dit_io["out"])
    print(f"\n{fmt}: {len(layers)} layers, resident {resident} B / file {size} B, DiT rel err {err:.3g}")
    assert err <= {"convrot_w4a4": 0.12, "nvfp4": 0.08, "asym_w4a8_int8": 0.05}.get(name, 0.03)


def test_mixed_formats_prefixed_keys_and_header_metadata(golden_dir, tmp_path, dit_io):
    """One file mixing all seven formats per layer (modulation and w2 in bf16), ``model.diffusion_model.`` keys;
    the same file with the layers listed in the ``_quantization_metadata`` header instead of comfy_quant tensors
    loads to the same model; inspect reports the format per layer group."""
    p1, layers = fx.write_comfy_dit_quant(tmp_path / "lens_mixed.safetensors", golden_dir, FORMATS,
                                          prefix="model.diffusion_model.")
    p2, layers2 = fx.write_comfy_dit_quant(tmp_path / "lens_mixed_header.safetensors", golden_dir, FORMATS,
                                           prefix="model.diffusion_model.", header=True)
    assert layers == layers2 and len({f for f, _ in layers.values()}) == len(FORMATS)
    m1, m2 = (ck.load_transformer(p, dtype=torch.float32) for p in (p1, p2))
    assert m1.lens_checkpoint.family == "comfy-dit-mixed"
    for layer, (fmt, _) in layers.items():
        assert m1.get_submodule(layer).format.name == fmt == m2.get_submodule(layer).format.name
    assert not isinstance(m1.transformer_blocks[0].img_mod[1], ql.QuantStorage)
    assert torch.equal(run_dit(m1, dit_io), run_dit(m2, dit_io))
    info = ck.inspect(p1)
    assert info["family"] == "comfy-dit-mixed"
    groups = info["quantization"]
    assert groups["attn.img_qkv"] and set(groups["img_mod.1"]) == {"BF16"}
    assert {g for v in groups.values() for g in v} >= {"float8_e4m3fn", "nvfp4", "BF16"}
    assert "attn.img_qkv: " in ck.format_inspect(info)


@pytest.mark.parametrize("fmt", ["int8_tensorwise", "convrot_w4a4"])
@pytest.mark.parametrize("kind", ["lora", "lokr", "loha"])
def test_lora_on_quantized_equals_hand_merge(qfiles, fmt, kind, dit_io, golden_dir, tmp_path):
    """A LoRA / LoKr / LoHa on an int8 ConvRot (W8A8) and a ConvRot W4A4 DiT equals a plain fp32 DiT whose weights
    are comfy-kitchen's dequantized weights plus the hand-computed deltas (the layers keep their storage; with a
    patch they multiply the patched dequantized weight, as ComfyUI's Linear does with a weight function); removing
    it gives the quantized model's own output back bit for bit."""
    path, layers = qfiles[fmt]
    m = ck.load_transformer(path, dtype=torch.float32)
    base_out = run_dit(m, dit_io)
    names = lf.target_names(m)    # every block Linear: all quantized layers run the patched (dequantized) path
    assert set(layers) <= set(names)
    shapes = {n: (m.get_submodule(n).out_features, m.get_submodule(n).in_features) for n in names}
    class Shapes:       # what lora_fixtures reads of a model: the weight shape of each target
        def get_submodule(self, n):
            return type("W", (), {"weight": torch.empty(shapes[n], device="meta")})()
    factors = lf.random_factors(Shapes(), names, kind=kind, seed=5)
    lpath = lf.write(tmp_path / f"{kind}.safetensors", "onetrainer-loha" if kind == "loha" else
                     "lycoris-lokr" if kind == "lokr" else "kohya", factors)
    lo.apply_lora(m, lpath, 0.8)
    f, markers = load_file(str(path)), markers_of(path)
    ref = LensTransformer(LensDiTConfig.from_dict(fx.dit_config(golden_dir)), dtype=torch.float32)
    sd = {}
    for k in ref.state_dict():
        layer = k[: -len(".weight")]
        if layer in layers:
            mod = m.get_submodule(layer)
            sd[k] = reference_qtensor(f, layer, fmt, markers[layer], (mod.out_features, mod.in_features),
                                      torch.float32).dequantize()
        else:
            sd[k] = f[k].float()
    for n, fac in factors.items():    # kohya / OneTrainer LoHa: alpha / rank; LyCORIS LoKr with full halves: 1
        scale = 1.0 if kind == "lokr" else fac.alpha / fac.rank
        sd[n + ".weight"] = sd[n + ".weight"] + 0.8 * lf.hand_delta(fac, scale).float()
    ref.load_state_dict(sd)
    out = run_dit(m, dit_io)
    assert isinstance(m.get_submodule(names[0]), ql.QuantLinear)
    assert rel(out, run_dit(ref, dit_io)) <= 1e-5
    lo.remove_loras(m)
    assert torch.equal(run_dit(m, dit_io), base_out)


def test_pipeline_int8_convrot_within_2pct_of_bf16(pipeline_dir, golden_dir, tmp_path):
    """The tiny pipeline with its DiT as an int8 ConvRot file (W8A8 through comfy-kitchen) gives an image within
    2 % (relative L2 of the float images) of the same pipeline with the bf16 DiT file."""
    from lens_core.pipeline import LensPipeline

    q, _ = fx.write_comfy_dit_quant(tmp_path / "lens_int8_convrot.safetensors", golden_dir,
                                    ("int8_tensorwise", FORMATS["int8_tensorwise"]), which="pipeline")
    b = fx.write_comfy_dit_bf16(tmp_path / "lens_bf16.safetensors", golden_dir, which="pipeline")
    noise = load_file(str(golden_dir / "pipeline_tiny" / "cases" / "a_cfg1_4steps.fp32.safetensors"))["noise"]
    images = {}
    for name, dit in (("int8", q), ("bf16", b)):
        pipe = LensPipeline.from_pretrained(pipeline_dir, transformer=dit, dtype=torch.bfloat16, device="cpu",
                                            configs={"transformer": fx.dit_config(golden_dir, "pipeline")})
        out = pipe("a red cube on a wooden table", height=64, width=96, steps=4, cfg=1.0, latents=noise)
        images[name] = out.uint8.float()
    err = rel(images["int8"], images["bf16"])
    print(f"\nint8 ConvRot vs bf16 pipeline image: rel {err:.4f}")
    assert err <= 0.02


def test_mxfp8_without_comfy_kitchen_is_bit_identical(qfiles, monkeypatch):
    """Without comfy-kitchen the mxfp8 format (the Comfy-Org lens_*_mxfp8 files) runs on the pack's own torch code,
    bit-identical to comfy-kitchen's dequantize; every other format refuses to load, naming the fix."""
    path, layers = qfiles["mxfp8"]
    with_ck = ck.load_transformer(path, dtype=torch.float32)
    monkeypatch.setattr(qf, "_kitchen_tensor", lambda: None)      # as where comfy-kitchen is not installed
    without = ck.load_transformer(path, dtype=torch.float32)
    for layer in layers:
        for dt in (torch.float32, torch.bfloat16):
            assert torch.equal(without.get_submodule(layer).dequantized_weight(dt),
                               with_ck.get_submodule(layer).dequantized_weight(dt))
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_transformer(qfiles["int8_tensorwise"][0])
    assert "pip install comfy-kitchen" in str(e.value) and str(qfiles["int8_tensorwise"][0]) in str(e.value)


# --------------------------------------------------------------------------------------------------
# hostile files: every one fails before a weight is used, naming the file and the layer
# --------------------------------------------------------------------------------------------------
LAYER = "transformer_blocks.0.attn.img_qkv"


def _edit(src, dst, fn, metadata=None):
    sd = load_file(str(src))
    with safe_open(str(src), "pt") as h:
        md = h.metadata()
    fn(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst), metadata=metadata if metadata is not None else md)
    return dst


def _marker(obj) -> torch.Tensor:
    return qf.marker_tensor(obj)


HOSTILE = {
    "huge marker": (lambda sd: sd.__setitem__(LAYER + ".comfy_quant", torch.full((70000,), 32, dtype=torch.uint8)),
                    ("comfy_quant", "small JSON", "4096")),
    "marker over 4 KB": (lambda sd: sd.__setitem__(LAYER + ".comfy_quant", _marker(
        {"format": "int8_tensorwise", "pad": "x" * 5000})), ("small JSON", LAYER)),
    "marker not JSON": (lambda sd: sd.__setitem__(LAYER + ".comfy_quant", torch.tensor([0xff, 0xfe, 0x00],
                                                                                       dtype=torch.uint8)),
                        ("not UTF-8 JSON", LAYER)),
    "marker a list": (lambda sd: sd.__setitem__(LAYER + ".comfy_quant", _marker(["int8_tensorwise"])),
                      ("JSON object", LAYER)),
    "unknown format": (lambda sd: sd.__setitem__(LAYER + ".comfy_quant", _marker({"format": "int3_magic"})),
                       ("int3_magic", "int8_tensorwise", LAYER)),
    "scale shape": (lambda sd: sd.__setitem__(LAYER + ".weight_scale", torch.ones(7, 1)),
                    ("weight_scale", "[7, 1]", LAYER)),
    "scale dtype": (lambda sd: sd.__setitem__(LAYER + ".weight_scale", sd[LAYER + ".weight_scale"].to(torch.int32)),
                    ("weight_scale", "I32", LAYER)),
    "weight dtype": (lambda sd: sd.__setitem__(LAYER + ".weight", sd[LAYER + ".weight"].float()),
                     ("weight", "F32", LAYER)),
    "missing scale": (lambda sd: sd.pop(LAYER + ".weight_scale"), ("weight_scale", "missing", LAYER)),
    "unknown tensor": (lambda sd: sd.__setitem__(LAYER + ".weight_zero", torch.zeros(1)),
                       ("weight_zero", LAYER)),
    "group does not divide": (lambda sd: sd.__setitem__(LAYER + ".comfy_quant", _marker(
        {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256})), ("256", "128", LAYER)),
    "group not a power of 4": (lambda sd: sd.__setitem__(LAYER + ".comfy_quant", _marker(
        {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 32})), ("power of 4", LAYER)),
    "group a string": (lambda sd: sd.__setitem__(LAYER + ".comfy_quant", _marker(
        {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": "64"})), ("convrot_groupsize", LAYER)),
    "convrot not bool": (lambda sd: sd.__setitem__(LAYER + ".comfy_quant", _marker(
        {"format": "int8_tensorwise", "convrot": "yes"})), ("convrot", LAYER)),
    "NaN scale": (lambda sd: sd[LAYER + ".weight_scale"].__setitem__((3, 0), float("nan")), ("NaN", LAYER)),
    "inf scale": (lambda sd: sd[LAYER + ".weight_scale"].__setitem__((0, 0), float("inf")), ("NaN/inf", LAYER)),
    "marker on a norm": (lambda sd: sd.__setitem__("transformer_blocks.0.img_norm1.comfy_quant", _marker(
        {"format": "int8_tensorwise"})), ("img_norm1", "Linear")),
    "marker on no layer": (lambda sd: sd.__setitem__("transformer_blocks.9.attn.img_qkv.comfy_quant", _marker(
        {"format": "int8_tensorwise"})), ("transformer_blocks.9",)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_quantized_files(qfiles, tmp_path, case):
    fn, needles = HOSTILE[case]
    p = _edit(qfiles["int8_tensorwise"][0], tmp_path / "bad.safetensors", fn)
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_transformer(p)
    msg = str(e.value)
    assert str(p) in msg
    for n in needles:
        assert n in msg, (n, msg)


@pytest.mark.parametrize("case", ["w4a4 group", "w4a8 group size", "w4a8 group string", "nvfp4 block scale shape",
                                  "nvfp4 inf global scale", "mxfp8 NaN exponent", "w4a8 s_rel shape",
                                  "w4a8 NaN s_rel as U8"])
def test_hostile_scales_other_formats(qfiles, tmp_path, case):
    fmt = {"w4a4 group": "convrot_w4a4", "w4a8 group size": "asym_w4a8_int8", "w4a8 group string": "asym_w4a8_int8",
           "nvfp4 block scale shape": "nvfp4", "nvfp4 inf global scale": "nvfp4", "mxfp8 NaN exponent": "mxfp8",
           "w4a8 s_rel shape": "asym_w4a8_int8", "w4a8 NaN s_rel as U8": "asym_w4a8_int8"}[case]

    def fn(sd):
        if case == "w4a4 group":
            sd[LAYER + ".comfy_quant"] = _marker({"format": fmt, "convrot_groupsize": 1024})
        elif case == "w4a8 group size":
            sd[LAYER + ".comfy_quant"] = _marker({"format": fmt, "group_size": 48, "convrot_groupsize": 64})
        elif case == "w4a8 group string":
            sd[LAYER + ".comfy_quant"] = _marker({"format": fmt, "params": {"group_size": "16"}})
        elif case == "nvfp4 block scale shape":
            sd[LAYER + ".weight_scale"] = sd[LAYER + ".weight_scale"][:64]
        elif case == "nvfp4 inf global scale":
            sd[LAYER + ".weight_scale_2"] = torch.tensor(float("inf"))
        elif case == "mxfp8 NaN exponent":
            sd[LAYER + ".weight_scale"] = sd[LAYER + ".weight_scale"].view(torch.uint8).clone().fill_(255)
        elif case == "w4a8 NaN s_rel as U8":     # E4M3 bytes stored as U8: 0x7F is NaN (not E8M0's 0xFF)
            s_rel = sd[LAYER + ".weight_s_rel"].view(torch.uint8).clone()
            s_rel[1, 2] = 0x7F
            sd[LAYER + ".weight_s_rel"] = s_rel
        else:
            sd[LAYER + ".weight_s_rel"] = sd[LAYER + ".weight_s_rel"][:, :4]
    p = _edit(qfiles[fmt][0], tmp_path / "bad.safetensors", fn)
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_transformer(p)
    assert str(p) in str(e.value) and LAYER in str(e.value), str(e.value)
    if "NaN" in case:
        assert "NaN" in str(e.value), str(e.value)


def test_hostile_header_metadata(qfiles, tmp_path):
    """A ``_quantization_metadata`` header that is not a JSON object with a ``layers`` object, or names an unknown
    format, fails naming the file."""
    src = qfiles["int8_tensorwise"][0]
    strip = lambda sd: [sd.pop(k) for k in [k for k in sd if k.endswith(".comfy_quant")]]  # noqa: E731
    for md, needle in (({"_quantization_metadata": "[1, 2"}, "_quantization_metadata"),
                       ({"_quantization_metadata": json.dumps({"layers": [1]})}, "_quantization_metadata"),
                       ({"_quantization_metadata": json.dumps({"layers": {LAYER: {"format": "fp2"}}})}, "fp2")):
        p = _edit(src, tmp_path / "bad_md.safetensors", strip, metadata=md)
        with pytest.raises(ck.CheckpointError) as e:
            ck.load_transformer(p)
        assert str(p) in str(e.value) and needle in str(e.value), str(e.value)


def test_text_encoder_int8_convrot_embedding_and_fp8_attention(golden_dir, tmp_path):
    """A Comfy-Org style encoder file mixing the family (int8 ConvRot token table, fp8 scaled attention Linears)
    with its NVFP4 experts: the table and Linears stay quantized (QuantEmbedding / QuantLinear), and the features
    equal those of the same encoder holding comfy-kitchen's dequantized weights; inspect names the formats."""
    p = fx.write_comfy_te_nvfp4(tmp_path / "gpt_oss_mixed.safetensors", golden_dir, None, embed_tokenizer=False)
    sd = load_file(str(p))
    quant = {"embed_tokens": ("int8_tensorwise", {"convrot": True, "convrot_groupsize": 64})}
    quant.update({f"layers.{i}.self_attn.{proj}": ("float8_e4m3fn", {}) for i in range(2)
                  for proj in ("q_proj", "k_proj", "v_proj", "o_proj")})
    refs = {}
    for layer, (fmt, opts) in quant.items():
        w = sd.pop(layer + ".weight").float()
        tensors, marker = qf.get(fmt).quantize(w, opts)
        for suffix, t in tensors.items():
            sd[f"{layer}.{suffix}"] = t
        sd[layer + ".comfy_quant"] = qf.marker_tensor(marker)
        refs[layer] = reference_qtensor({f"{layer}.{s}": t for s, t in tensors.items()}, layer, fmt, marker,
                                        tuple(w.shape), torch.float32).dequantize()
    q = tmp_path / "gpt_oss_mixed_q.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(q))
    cfg = fx.te_config(golden_dir)
    te = ck.load_text_encoder(q, dtype=torch.float32, selected_layers=(1, 3, 4, 5), config=cfg)
    emb = te.model.embed_tokens
    assert isinstance(emb, ql.QuantEmbedding) and emb.weight.dtype == torch.int8
    assert isinstance(te.model.layers[0].self_attn.q_proj, ql.QuantLinear)
    assert te.model.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert te.model.layers[0].mlp.experts.gate_up_proj_blocks.dtype == torch.uint8      # NVFP4 bank kept packed
    ref = ck.load_text_encoder(p, dtype=torch.float32, selected_layers=(1, 3, 4, 5), config=cfg)
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(refs["embed_tokens"])
        for layer, w in refs.items():
            if layer != "embed_tokens":
                ref.get_submodule("model." + layer).weight.copy_(w)
    ids = torch.randint(0, 201088, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 24, dtype=torch.bool)
    with torch.no_grad():
        for a, b in zip(te(ids, mask), ref(ids, mask)):
            assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
    groups = ck.inspect(q)["quantization"]
    assert groups["embed_tokens"] == {"int8_tensorwise+convrot": 1}
    assert groups["self_attn.q_proj"] == {"float8_e4m3fn": 2, "BF16": 4}


def test_nvfp4_pre_quant_scale_on_every_path(qfiles, tmp_path):
    """An NVFP4 layer with a ModelOpt ``pre_quant_scale`` (AWQ smoothing): ComfyUI 0.33 scales the input by it
    before every path of its Linear (``mixed_precision_ops.forward``). The layer's output equals that reference
    (comfy-kitchen's dequantized weight times the scaled input) unpatched, with a zero-delta patch (the dequantized
    path of LoRA / lowvram weight functions) and loaded with ``dequantize=True`` (a plain Linear whose weight folds
    the scale in: ``W * pre[None, :]``)."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(96, 128, generator=g)
    pre = torch.rand(128, generator=g) * 3.75 + 0.25            # far from 1: a dropped scale shows
    bias = torch.randn(96, generator=g)
    tensors, marker = qf.get("nvfp4").quantize(w, {})
    f = {f"{LAYER}.{k}": v for k, v in tensors.items()}
    f[LAYER + ".pre_quant_scale"] = pre
    x = torch.randn(2, 5, 128, generator=g)

    def reference(dt):
        qt = reference_qtensor(f, LAYER, "nvfp4", marker, (96, 128), dt)
        return F.linear(x.to(dt) * pre.to(dt), qt.dequantize(), bias.to(dt))

    # the layer as the loaders build it from the file's tensors
    found = {k[len(LAYER) + 1:]: (qf.st_name(v.dtype), tuple(v.shape)) for k, v in f.items()}
    layout = qf.get("nvfp4").layout_of(96, 128, {}, LAYER, found)
    assert "pre_quant_scale" in layout
    lin = ql.QuantLinear(128, 96, True, fmt="nvfp4", options={}, layout=layout)
    with torch.no_grad():
        for k, v in f.items():
            p = getattr(lin, k[len(LAYER) + 1:])
            p.copy_(qf.as_kept(v, p.dtype))
        lin.bias.copy_(bias)
    zero = type("ZeroDelta", (), {"patch_weight": staticmethod(lambda t: t + torch.zeros_like(t))})()
    for dt in (torch.float32, torch.bfloat16):
        want = reference(dt).float()
        with torch.no_grad():
            plain = lin(x.to(dt)).float()
            lin.lens_lora_deltas = (zero,)
            patched = lin(x.to(dt)).float()
            del lin.lens_lora_deltas
        tol = 1e-6 * want.abs().max()
        assert (plain - want).abs().max() <= tol, dt
        assert (patched - plain).abs().max() <= tol, dt

    # a file with the layer (the fixture's NVFP4 DiT plus the scale), loaded kept quantized and dequantized
    path, layers = qfiles["nvfp4"]
    assert LAYER in layers
    sd = load_file(str(path))
    p = tmp_path / "nvfp4_pre.safetensors"
    sd[LAYER + ".pre_quant_scale"] = pre
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    kept = ck.load_transformer(p, dtype=torch.float32).get_submodule(LAYER)
    dense = ck.load_transformer(p, dtype=torch.float32, dequantize=True).get_submodule(LAYER)
    assert isinstance(kept, ql.QuantLinear) and not isinstance(dense, ql.QuantStorage)
    xl = torch.randn(2, 5, dense.in_features, generator=g)
    qt = reference_qtensor(sd, LAYER, "nvfp4", markers_of(path)[LAYER], (dense.out_features, dense.in_features),
                           torch.float32)
    want = F.linear(xl * pre, qt.dequantize(), sd[LAYER + ".bias"].float())
    with torch.no_grad():
        for mod in (kept, dense):
            assert (mod(xl) - want).abs().max() <= 1e-5 * want.abs().max(), type(mod)


def test_text_encoder_markers_on_layers_it_does_not_build(golden_dir, tmp_path):
    """Quantized Linears the feature encoder never builds (decoder layers past the last selected one, ``lm_head``)
    are not "layers the model lacks": the file loads with custom ``selected_layers`` and gives the features of the
    unquantized file; a marker on a layer no GPT-OSS encoder has still fails naming it."""
    p = fx.write_comfy_te_nvfp4(tmp_path / "gpt_oss.safetensors", golden_dir, None, embed_tokenizer=False)
    sd = load_file(str(p))
    sd["lm_head.weight"] = sd["embed_tokens.weight"].clone()
    for layer in ("layers.4.self_attn.q_proj", "layers.5.self_attn.o_proj", "lm_head"):
        tensors, marker = qf.get("float8_e4m3fn").quantize(sd.pop(layer + ".weight").float(), {})
        sd.update({f"{layer}.{s}": t for s, t in tensors.items()})
        sd[layer + ".comfy_quant"] = qf.marker_tensor(marker)
    q = tmp_path / "gpt_oss_q.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(q))
    cfg = fx.te_config(golden_dir)
    te = ck.load_text_encoder(q, dtype=torch.float32, selected_layers=(0, 1, 2, 3), config=cfg)
    ref = ck.load_text_encoder(p, dtype=torch.float32, selected_layers=(0, 1, 2, 3), config=cfg)
    assert len(te.model.layers) == 4
    ids = torch.randint(0, 201088, (1, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad():
        for a, b in zip(te(ids, mask), ref(ids, mask)):
            assert torch.equal(a, b)
    sd["layers.1.self_attn.x_proj.comfy_quant"] = qf.marker_tensor({"format": "float8_e4m3fn"})
    bad = tmp_path / "gpt_oss_bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(bad))
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_text_encoder(bad, dtype=torch.float32, selected_layers=(0, 1, 2, 3), config=cfg)
    assert "x_proj" in str(e.value) and str(bad) in str(e.value)


def test_quant_embedding_shares_the_storage_hooks():
    """The quantized token table takes the same per-call patches as the quantized Linears (``lens_lora_deltas``:
    added to comfy-kitchen's dequantized table, then the lookup) and its stored tensors skip absent ones."""
    g = torch.Generator().manual_seed(4)
    table = torch.randn(300, 64, generator=g)
    opts = {"convrot": True, "convrot_groupsize": 64}
    tensors, marker = qf.get("int8_tensorwise").quantize(table, opts)
    found = {k: (qf.st_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
    layout = qf.get("int8_tensorwise").layout_of(300, 64, opts, "embed", found)
    emb = ql.QuantEmbedding(300, 64, fmt="int8_tensorwise", options=opts, layout=layout, dtype=torch.float32)
    with torch.no_grad():
        for k, v in tensors.items():
            getattr(emb, k).copy_(qf.as_kept(v, getattr(emb, k).dtype))
    ref_table = reference_qtensor({f"e.{k}": v for k, v in tensors.items()}, "e", "int8_tensorwise", marker,
                                  (300, 64), torch.float32).dequantize()
    ids = torch.randint(0, 300, (2, 9), generator=g)
    delta = torch.randn(300, 64, generator=g) * 0.1
    emb.lens_lora_deltas = (type("D", (), {"patch_weight": staticmethod(lambda w: w + delta)})(),)
    with torch.no_grad():
        got = emb(ids)
    assert (got - F.embedding(ids, ref_table + delta)).abs().max() <= 1e-6
    del emb.lens_lora_deltas
    assert set(emb.stored()) == set(layout)
