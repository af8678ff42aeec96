"""GGUF (issue 15): torch dequantization against the gguf package, tiny DiT / GPT-OSS GGUF files in the real
layouts (written with the gguf package's own writer) against the safetensors models, and hostile files.

References (the gguf package is test-only): ``gguf.quants.dequantize`` for every block type, ``gguf.GGUFReader``
for the tensor index and metadata, ``gguf.GGUFWriter`` writes the files; the golden fp32 DiT output
(dit_tiny/io.safetensors) and the diffusers MXFP4 text encoder.
"""
from __future__ import annotations

import struct
import types

import numpy as np

import pytest
import torch
from safetensors.torch import load_file

import fixtures as fx
from test_checkpoints import dit_io, run_dit  # noqa: F401 (dit_io is a fixture)
from lens_core import checkpoints as ck
from lens_core import ggml
from lens_core import quant_linear as ql
from lens_core.quant import mxfp4_dequantize

gguf = pytest.importorskip("gguf")      # pinned in requirements-dev.txt; always present in CI
T = gguf.GGMLQuantizationType


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical float32 arrays; NaNs must sit at the same places (their payloads are not compared)."""
    na, nb = np.isnan(a), np.isnan(b)
    return a.shape == b.shape and bool((na == nb).all()) and bool((a.view(np.int32)[~na] == b.view(np.int32)[~na]).all())


# --------------------------------------------------------------------------------------------------
# dequantization
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", list(ggml.TYPES))
def test_dequantize_bit_exact_on_random_blocks(qtype):
    """Any bytes are valid blocks: torch output == gguf.quants.dequantize bit for bit (NaN positions equal)."""
    _, block, size = ggml.TYPES[qtype]
    rows, cols = 6, 1024
    raw = np.random.default_rng(ggml.TYPES[qtype][0]).integers(0, 256, rows * cols // block * size, dtype=np.uint8)
    raw = raw.reshape(rows, -1)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(raw, T[qtype]).astype(np.float32).reshape(rows, cols)
    out = ggml.dequantize(torch.from_numpy(raw.copy()), qtype, (rows, cols)).numpy()
    assert same_bits(ref, out)
    if qtype not in ("F32",):      # a cast to bf16 is one rounding of the same values
        bf = ggml.dequantize(torch.from_numpy(raw.copy()), qtype, (rows, cols), torch.bfloat16)
        assert torch.equal(bf.float().nan_to_num(), torch.from_numpy(out).to(torch.bfloat16).float().nan_to_num())


def test_mxfp4_layouts_agree():
    """GGML type-39 bytes → the HF layout of PackedExperts: the HF dequantizer then equals gguf's (all finite)."""
    rng = np.random.default_rng(1)
    e, rows, cols = 3, 8, 96
    raw = rng.integers(0, 256, (e, rows, cols // 32, 17), dtype=np.uint8)
    raw[..., 0] = rng.integers(100, 140, raw[..., 0].shape)
    raw = raw.reshape(e, rows, -1)
    blocks, scales = ggml.mxfp4_to_hf(torch.from_numpy(raw.copy()), rows, cols)
    assert blocks.shape == (e, rows, 3, 16) and scales.shape == (e, rows, 3)
    ref = gguf.quants.dequantize(raw, T.MXFP4).reshape(e, rows, cols)
    assert torch.equal(mxfp4_dequantize(blocks, scales, torch.float32), torch.from_numpy(ref))
    assert torch.equal(ggml.hf_to_mxfp4(blocks, scales), torch.from_numpy(raw))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K"])
def test_gguf_linear(qtype):
    """GGUFLinear = a Linear with the reference-dequantized weight; bf16 input runs in bf16; per-call patches
    (a LoRA's ``lens_lora_deltas``, a host's weight functions) see the dequantized weight, and
    ``dequantized_weight`` is the interface of every quantized storage family."""
    rng = np.random.default_rng(2)
    out_f, in_f = 16, 512
    _, block, size = ggml.TYPES[qtype]
    if qtype == "Q8_0":
        raw = gguf.quants.quantize(rng.standard_normal((out_f, in_f)).astype(np.float32), T.Q8_0)
    elif qtype == "Q4_K":
        raw = fx.quantize_q4_k(torch.randn(out_f, in_f)).reshape(out_f, -1)
    else:   # random bytes with finite f16 scales
        raw = rng.integers(0, 256, (out_f * in_f // block, size), dtype=np.uint8)
        raw[:, -2:] = np.array([0.01], np.float16).view(np.uint8)
        raw = raw.reshape(out_f, -1)
    w = torch.from_numpy(gguf.quants.dequantize(raw, T[qtype]).astype(np.float32))
    lin = ql.GGUFLinear(in_f, out_f, qtype, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(raw))
        lin.bias.copy_(torch.randn(out_f))
    x = torch.randn(3, in_f)
    assert torch.equal(lin.dequantized_weight(torch.float32), w)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, w, lin.bias))
    assert lin(x.bfloat16()).dtype == torch.bfloat16
    delta = torch.randn(out_f, in_f) * 0.01
    lin.lens_lora_deltas = (types.SimpleNamespace(patch_weight=lambda weight: weight + delta.to(weight.dtype)),)
    assert torch.allclose(lin(x), torch.nn.functional.linear(x, w + delta, lin.bias), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# tiny DiT
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_files(golden_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf_dit")
    return {q: fx.write_gguf_dit(out / f"lens-{q.lower()}.gguf", golden_dir, q) for q in ("F16", "Q8_0", "Q4_K")}


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_K"])
def test_dit_gguf_forward(dit_files, dit_io, golden_dir, qtype, capsys):
    """sd.cpp-layout GGUF DiT (no general.architecture, diffusers names; biases, img_in/txt_in, 64-wide norms and
    rows that are not whole blocks stay F16): quantized Linears stay GGUFLinear; the forward equals a plain model
    holding gguf's dequantized weights, and the golden fp32 output within the quantization error."""
    path, types = dit_files[qtype]
    m = ck.load_transformer(path, dtype=torch.float32)
    info = m.lens_checkpoint
    assert info.family == "gguf-dit"
    quantized = sorted(k[: -len(".weight")] for k, t in types.items() if t == qtype and k.endswith(".weight")
                       and m.get_submodule(k[: -len(".weight")]).__class__ is ql.GGUFLinear)
    assert info.extra["gguf_layers"] == len(quantized)
    assert all(types[k] == "F16" for k in types if "img_in" in k or "txt_in" in k or k.endswith(".bias")
               or ("norm_q" in k and qtype == "Q4_K"))
    out = run_dit(m, dit_io)
    err = rel(out, dit_io["out"])
    print(f"\n{qtype}: {len(quantized)} GGUF Linears, rel error vs golden fp32 {err:.2e}")
    # reference: the same file dequantized by gguf (numpy) into a plain fp32 model
    reader = gguf.GGUFReader(str(path))
    sd = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).copy())
          .reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    ref = ck.load_transformer(golden_dir / "dit_tiny" / "transformer", dtype=torch.float32)
    ref.load_state_dict(sd)
    assert torch.allclose(out, run_dit(ref, dit_io), rtol=0, atol=1e-5)
    bound = {"F16": 1e-3, "Q8_0": 2e-2, "Q4_K": 5e-2}[qtype]
    assert err <= bound
    if qtype == "Q8_0":
        assert len(quantized) >= 20
    if qtype == "Q4_K":     # only the 256-wide rows of the tiny model are whole Q4_K blocks
        assert quantized == ["time_text_embed.timestep_embedder.linear_1"]


def test_dit_gguf_bf16_compute_and_inspect(dit_files, dit_io):
    path, _ = dit_files["Q8_0"]
    m = ck.load_transformer(path, dtype=torch.bfloat16)
    err = rel(run_dit(m, dit_io, torch.bfloat16), dit_io["out_bf16"])
    print(f"\nQ8_0 in bf16: rel error vs the golden bf16 output {err:.2e}")
    assert err <= 5e-2
    info = ck.inspect(path)
    assert info["component"] == "transformer" and info["family"] == "gguf-dit"
    assert info["format"] == "GGUF v3" and info["architecture"] is None
    assert "Q8_0" in info["dtypes"] and "F16" in info["dtypes"]
    assert "GGUF v3" in ck.format_inspect(info)


# --------------------------------------------------------------------------------------------------
# tiny GPT-OSS
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def case_a(golden_dir):
    return load_file(str(golden_dir / "pipeline_tiny" / "cases" / "a_cfg1_4steps.fp32.safetensors"))


@pytest.fixture(scope="module")
def te_ref(golden_dir):
    return ck.load_text_encoder(golden_dir / "pipeline_tiny" / "text_encoder", dtype=torch.float32)


@pytest.mark.parametrize("fused", [False, True])
def test_te_gguf_equals_safetensors_bit_for_bit(golden_dir, tmp_path, case_a, te_ref, fused):
    """unsloth / ggml-org names, MXFP4 experts (GGML type 39, gate/up de-interleaved or fused), BF16/F32 others:
    the features equal the diffusers MXFP4 encoder's bit for bit; the config comes from the gpt-oss.* metadata."""
    path = fx.write_gguf_te(tmp_path / "gpt-oss-20b-tiny.gguf", golden_dir, fused=fused)
    m = ck.load_text_encoder(path, dtype=torch.float32, selected_layers=[1, 3, 4, 5])
    assert m.lens_checkpoint.family == "gguf-text-encoder"
    cfg = m.config
    assert (cfg.num_experts_per_tok, cfg.sliding_window, cfg.intermediate_size, cfg.num_attention_heads) == (2, 8, 64, 4)
    assert m.model.layers[0].mlp.experts.is_packed
    ref = te_ref
    ids, mask = case_a["pos_input_ids"], case_a["pos_attention_mask"].bool()
    with torch.no_grad():
        for a, b in zip(m(ids, mask), ref(ids, mask)):
            assert torch.equal(a, b)
    for name, t in ref.state_dict().items():
        assert torch.equal(m.state_dict()[name], t), name
    info = ck.inspect(path)
    assert info["component"] == "text_encoder" and info["architecture"] == "gpt-oss" and "MXFP4" in info["dtypes"]


def test_te_gguf_quantized_attention_stays_quantized(golden_dir, tmp_path, case_a):
    """A GGUF whose attention / router Linears (and norms) are Q8_0: the Linears stay GGUFLinear, the norms are
    dequantized at load, and the features equal the safetensors encoder given gguf's dequantized weights."""
    path = fx.write_gguf_te(tmp_path / "te-q8.gguf", golden_dir, float_type="Q8_0")
    m = ck.load_text_encoder(path, dtype=torch.float32, selected_layers=[1, 3, 4, 5])
    assert isinstance(m.model.layers[0].self_attn.q_proj, ql.GGUFLinear)
    ref = ck.load_text_encoder(golden_dir / "pipeline_tiny" / "text_encoder", dtype=torch.float32)
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate_inp": "mlp.router"}
    sd = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.tensor_type != T.Q8_0:
            continue
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).copy())
        parts = t.name.split(".")
        sd[f"model.layers.{parts[1]}.{names[parts[2]]}.weight"] = w
    assert len(sd) == 6 * 5
    ref.load_state_dict(sd, strict=False)
    ids, mask = case_a["pos_input_ids"], case_a["pos_attention_mask"].bool()
    with torch.no_grad():
        for a, b in zip(m(ids, mask), ref(ids, mask)):
            assert torch.equal(a, b)


def test_index_equals_ggufreader(dit_files, golden_dir, tmp_path):
    """The bounded header walk finds what ggml's own reader finds: names, types, shapes, offsets, sizes, and the
    metadata (long arrays summarized)."""
    from lens_core.checkpoints.gguf import GGUFFile

    te = fx.write_gguf_te(tmp_path / "te.gguf", golden_dir, fused=True)
    for path in (dit_files["Q4_K"][0], dit_files["Q8_0"][0], te):
        ours, ref = GGUFFile(path), gguf.GGUFReader(str(path))
        assert ours.data_start == ref.data_offset and len(ours.entries) == len(ref.tensors)
        for t in ref.tensors:
            e = ours.entries[t.name]
            assert (e.dtype, e.shape, e.start, e.nbytes) == (T(t.tensor_type).name,
                                                             tuple(reversed(t.shape.tolist())), t.data_offset,
                                                             t.n_bytes)
        for key, field in ref.fields.items():
            if key.startswith("GGUF.") or key not in ours.metadata:
                continue
            value = field.contents()
            if isinstance(value, list) and len(value) > 64:
                assert ours.metadata[key] == f"<array of {len(value)} strings>"
            elif isinstance(value, float):
                assert ours.metadata[key] == pytest.approx(value)
            else:
                assert ours.metadata[key] == value, key
        assert ours.architecture == (None if path != te else "gpt-oss")


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def _raises(fn, *parts):
    with pytest.raises(ck.CheckpointError) as exc:
        fn()
    for p in parts:
        assert p in str(exc.value), (p, str(exc.value))
    return str(exc.value)


def test_gguf_of_another_architecture(tmp_path):
    w = fx._gguf_writer(tmp_path / "llama.gguf", "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), np.float16))
    w.add_tensor("token_embd.weight", np.zeros((10, 64), np.float16))
    fx._gguf_write(w)
    _raises(lambda: ck.load_transformer(tmp_path / "llama.gguf"), "llama.gguf", "architecture 'llama'")
    _raises(lambda: ck.load_text_encoder(tmp_path / "llama.gguf"), "architecture 'llama'")
    w = fx._gguf_writer(tmp_path / "flux.gguf", None)
    w.add_tensor("double_blocks.0.img_attn.qkv.weight", np.zeros((96, 32), np.float16))
    fx._gguf_write(w)
    _raises(lambda: ck.load_transformer(tmp_path / "flux.gguf"), "FLUX")
    assert ck.inspect(tmp_path / "llama.gguf")["family"] == "unknown"


def test_gguf_unsupported_type_and_experts(tmp_path, golden_dir):
    w = fx._gguf_writer(tmp_path / "iq.gguf", None)
    w.add_tensor("img_in.weight", np.zeros((64, 66), np.uint8), raw_dtype=T.IQ2_XXS)
    fx._gguf_write(w)
    _raises(lambda: ck.load_transformer(tmp_path / "iq.gguf"), "iq.gguf", "img_in.weight", "IQ2_XXS", "Q4_K",
            "MXFP4")


def _header_only(path, n_tensors, kv: bytes, infos: bytes, n_kv=0, version=3, tail=b""):
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kv + infos + tail)
    return path


def _info(name, dims, type_id, offset):
    n = name.encode()
    return struct.pack("<Q", len(n)) + n + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + \
        struct.pack("<IQ", type_id, offset)


def test_gguf_hostile_headers(tmp_path, golden_dir):
    good, _ = fx.write_gguf_dit(tmp_path / "good.gguf", golden_dir, "Q8_0")
    raw = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[: len(raw) * 2 // 3])
    _raises(lambda: ck.load_transformer(tmp_path / "cut.gguf"), "cut.gguf", "truncated")
    (tmp_path / "head.gguf").write_bytes(raw[:200])
    _raises(lambda: ck.load_transformer(tmp_path / "head.gguf"), "head.gguf")
    big = struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9) + struct.pack("<IQ", 4, 1 << 60)
    _raises(lambda: ck.load_transformer(_header_only(tmp_path / "arr.gguf", 0, big, b"", n_kv=1)), "exceed")
    _raises(lambda: ck.load_transformer(_header_only(tmp_path / "cnt.gguf", 1 << 62, b"", b"")), "cannot fit")
    s = struct.pack("<Q", 1 << 40) + b"x"
    _raises(lambda: ck.load_transformer(_header_only(tmp_path / "str.gguf", 0, s, b"", n_kv=1)), "str.gguf")
    pad = b"\0" * 64
    past = _info("img_in.weight", [64, 64], 1, 1 << 40)
    _raises(lambda: ck.load_transformer(_header_only(tmp_path / "off.gguf", 1, b"", past, tail=pad)), "truncated")
    dims = _info("img_in.weight", [64, 1 << 50], 1, 0)
    _raises(lambda: ck.load_transformer(_header_only(tmp_path / "dims.gguf", 1, b"", dims, tail=pad)), "dimension")
    five = _info("img_in.weight", [2, 2, 2, 2, 2], 1, 0)
    _raises(lambda: ck.load_transformer(_header_only(tmp_path / "nd.gguf", 1, b"", five, tail=pad)), "dimensions")
    rows = _info("img_in.weight", [48, 2], 8, 0)
    _raises(lambda: ck.load_transformer(_header_only(tmp_path / "rows.gguf", 1, b"", rows, tail=pad)), "block size")
    two = _info("a", [32], 0, 0) + _info("b", [32], 0, 64)
    _raises(lambda: ck.load_transformer(_header_only(tmp_path / "ovl.gguf", 2, b"", two, tail=b"\0" * 400)),
            "overlap")
    _raises(lambda: ck.load_transformer(_header_only(tmp_path / "v1.gguf", 0, b"", b"", version=1)), "version 1")
    nan = struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<If", 6, float("nan"))
    _raises(lambda: ck.load_transformer(_header_only(tmp_path / "al.gguf", 0, nan, b"", n_kv=1)), "alignment")


def test_gguf_encoder_tokenizer_beside_the_file(golden_dir, tmp_path, tokenizer_json):
    import shutil

    path = fx.write_gguf_te(tmp_path / "gpt-oss-20b-Q4_K_M.gguf", golden_dir)
    _raises(lambda: ck.load_tokenizer(path), "gpt-oss-20b-Q4_K_M.tokenizer.json", "tokenizer.json")
    shutil.copy(tokenizer_json, tmp_path / "gpt-oss-20b-Q4_K_M.tokenizer.json")
    tok = ck.load_tokenizer(path)
    assert tok is not None
