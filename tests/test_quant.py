"""lens_core.quant: MXFP4 vs transformers' dequantizer (bit-exact), NVFP4 from a known dense weight, the bank."""
import pytest
import torch
from conftest import cxx_compiler

from lens_core import quant as Q

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_bit_exact_vs_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 5, 16), generator=g, dtype=torch.uint8)
    # every exponent byte except 255 (NaN in E8M0), including the sub-normal and overflowing ends
    scales = torch.randint(0, 255, (3, 40, 5), generator=g, dtype=torch.uint8)
    scales[0, 0, :] = torch.tensor([0, 1, 127, 253, 254], dtype=torch.uint8)
    ours = Q.mxfp4_dequantize(blocks, scales, dtype)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)  # theirs is [E, in, out]
    assert ours.shape == (3, 40, 160) and ours.dtype == dtype
    assert torch.equal(_bits(ours), _bits(ref.contiguous()))
    # realistic exponents: bf16 dequantization is exact, i.e. equals the fp32 one
    s = torch.randint(110, 135, (3, 40, 5), generator=g, dtype=torch.uint8)
    assert torch.equal(Q.mxfp4_dequantize(blocks, s, torch.bfloat16).float(), Q.mxfp4_dequantize(blocks, s, torch.float32))


def test_mxfp4_nibble_order_and_scale_by_hand():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x2F  # low nibble 0xF (-6) = element 0, high nibble 0x2 (1.0) = element 1
    scales = torch.tensor([[129]], dtype=torch.uint8)  # 2^2
    w = Q.mxfp4_dequantize(blocks, scales, torch.float32)
    assert w[0, :3].tolist() == [-24.0, 4.0, 0.0]
    with pytest.raises(ValueError, match=r"blocks \[..., G, 16\]"):
        Q.mxfp4_dequantize(torch.zeros(2, 3, 8, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        Q.mxfp4_dequantize(blocks.float(), scales)


def _tile_reference(s):
    """cuBLAS 128x4 tiling written as reshapes (independent of the closed-form offsets in quant.py)."""
    r, c = s.shape
    rp, cp = -(-r // 128) * 128, -(-c // 4) * 4
    p = torch.zeros(rp, cp, dtype=s.dtype)
    p[:r, :c] = s
    # [row tiles, 4 sub-blocks of 32 rows, 32 rows, col tiles, 4 cols] -> [row tile, col tile, 32, 4 sub, 4 cols]
    t = p.view(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4)
    return t.reshape(rp, cp)


def _known_nvfp4_bank(e, rows, cols, seed):
    """A dense bank W that NVFP4 represents exactly, and its packed/tiled on-disk form."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (e, rows, cols), generator=g)
    # E4M3 block scales: random positive finite bytes (0x01..0x7E), one per 16 inputs
    scale_bytes = torch.randint(1, 0x7F, (e, rows, cols // 16), generator=g, dtype=torch.uint8)
    scales = scale_bytes.view(torch.float8_e4m3fn)
    global_scale = torch.tensor([0.25 * (i + 1) for i in range(e)], dtype=torch.float32)
    dense = E2M1[codes] * scales.float().repeat_interleave(16, -1) * global_scale.view(e, 1, 1)
    packed = ((codes[..., 0::2] << 4) | codes[..., 1::2]).to(torch.uint8)  # high nibble = even element
    tiled = torch.stack([_tile_reference(scale_bytes[i]) for i in range(e)]).view(torch.float8_e4m3fn)
    return dense, packed, tiled, global_scale


def test_untile_matches_independent_tiling():
    g = torch.Generator().manual_seed(1)
    for r, c in [(2880, 180), (300, 7), (128, 4), (64, 3)]:
        s = torch.randint(0, 256, (r, c), generator=g, dtype=torch.uint8)
        assert torch.equal(Q.untile_block_scales(_tile_reference(s), r, c), s)
    with pytest.raises(ValueError, match=r"expected \[..., 128, 8\]"):
        Q.untile_block_scales(torch.zeros(64, 8, dtype=torch.uint8), 64, 5)


def test_nvfp4_from_known_dense_weight():
    dense, packed, tiled, gs = _known_nvfp4_bank(3, 200, 64, seed=2)
    assert tiled.shape == (3, 256, 4)  # rows padded to 128, cols to 4 by the tiling
    bank = Q.nvfp4_bank_tensors("down_proj", packed, tiled, gs, bias=torch.zeros(3, 200))
    assert set(bank) == {"down_proj_blocks", "down_proj_scales", "down_proj_scales_2", "down_proj_bias"}
    w = Q.nvfp4_dequantize(bank["down_proj_blocks"], bank["down_proj_scales"], bank["down_proj_scales_2"],
                           torch.float32)
    assert torch.equal(w, dense)
    # raw uint8 scale bytes and a scalar global scale are accepted too
    w0 = Q.nvfp4_dequantize(packed[0], Q.untile_block_scales(tiled[0].view(torch.uint8), 200, 4), gs[0],
                            torch.float32)
    assert torch.equal(w0, dense[0])
    one = Q.nvfp4_bank_tensors("x", packed, tiled, torch.tensor(0.5))
    assert one["x_scales_2"].tolist() == [0.5] * 3
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        Q.nvfp4_dequantize(packed, bank["down_proj_scales"].float(), gs)
    with pytest.raises(ValueError, match="weight_scale_2"):
        Q.nvfp4_bank_tensors("x", packed, tiled, torch.ones(2))


def test_nvfp4_state_dict_to_lens_and_bank_forward():
    e, d, inter = 3, 32, 32
    gu, gu_p, gu_t, gu_g = _known_nvfp4_bank(e, 2 * inter, d, seed=3)
    dn, dn_p, dn_t, dn_g = _known_nvfp4_bank(e, d, inter, seed=4)
    gu, dn = gu / 8, dn / 8  # keep activations moderate: scale the global scales instead
    gu_g, dn_g = gu_g / 8, dn_g / 8
    b_gu, b_dn = torch.randn(e, 2 * inter), torch.randn(e, d)
    sd = {"layers.0.mlp.experts.gate_up_proj.weight": gu_p, "layers.0.mlp.experts.gate_up_proj.weight_scale": gu_t,
          "layers.0.mlp.experts.gate_up_proj.weight_scale_2": gu_g, "layers.0.mlp.experts.gate_up_proj.bias": b_gu,
          "layers.0.mlp.experts.gate_up_proj.comfy_quant": torch.tensor(list(b'{"format":"nvfp4"}'), dtype=torch.uint8),
          "layers.0.mlp.experts.down_proj.weight": dn_p, "layers.0.mlp.experts.down_proj.weight_scale": dn_t,
          "layers.0.mlp.experts.down_proj.weight_scale_2": dn_g, "layers.0.mlp.experts.down_proj.bias": b_dn,
          "layers.0.mlp.router.weight": torch.zeros(e, d), "tokenizer_json": torch.zeros(5, dtype=torch.uint8)}
    out = Q.nvfp4_state_dict_to_lens(sd)
    prefix = "model.layers.0.mlp.experts."
    assert "model.layers.0.mlp.router.weight" in out and "tokenizer_json" not in out
    assert not any(k.endswith("comfy_quant") for k in out)
    bank = Q.PackedExperts(e, d, inter, fmt="nvfp4", dtype=torch.float32, device="meta")
    bank.load_state_dict({k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}, assign=True)
    x = torch.randn(10, d)
    idx = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0], [1, 2], [0, 2], [1, 0], [2, 1], [0, 1]])
    wts = torch.softmax(torch.randn(10, 2), -1)
    y = bank(x, idx, wts)
    ref = torch.zeros_like(x)
    for n in range(10):
        for s in range(2):
            k = idx[n, s]
            h = gu[k] @ x[n] + b_gu[k]
            g_, u_ = h[0::2].clamp(max=7.0), h[1::2].clamp(-7.0, 7.0)
            ref[n] += wts[n, s] * (dn[k] @ ((u_ + 1) * g_ * torch.sigmoid(1.702 * g_)) + b_dn[k])
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    with pytest.raises(ValueError, match="missing"):
        Q.nvfp4_state_dict_to_lens({"layers.0.mlp.experts.down_proj.weight": dn_p})


def _random_mxfp4_bank(e, d, inter, seed, bias_dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for proj, (rows, cols) in {"gate_up_proj": (2 * inter, d), "down_proj": (d, inter)}.items():
        sd[f"{proj}_blocks"] = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
        sd[f"{proj}_scales"] = torch.randint(121, 124, (e, rows, cols // 32), generator=g, dtype=torch.uint8)
        sd[f"{proj}_bias"] = (0.1 * torch.randn(e, rows, generator=g)).to(bias_dtype)
    return sd


def test_packed_bank_matches_dequantized_mode_and_is_frozen():
    e, d, inter = 4, 64, 32
    sd = _random_mxfp4_bank(e, d, inter, seed=5)
    packed = Q.PackedExperts(e, d, inter, device="meta", dtype=torch.float32)
    packed.load_state_dict(sd, assign=True)
    dense = Q.PackedExperts(e, d, inter, mode="dequantized", device="meta", dtype=torch.float32)
    dense.load_state_dict(sd, assign=True)
    assert packed.is_packed and not dense.is_packed
    assert {n for n, _ in dense.named_parameters()} == {"gate_up_proj", "gate_up_proj_bias", "down_proj",
                                                         "down_proj_bias"}
    assert dense.gate_up_proj.shape == (e, 2 * inter, d) and dense.gate_up_proj.dtype == torch.float32
    assert all(not p.requires_grad for p in packed.parameters())
    assert packed.gate_up_proj_blocks.dtype == torch.uint8
    assert not hasattr(packed, "comfy_cast_weights")     # lens_core knows no host (nodes/bridge/quant.py adds it)
    x = torch.randn(12, d)
    idx = torch.stack([torch.randperm(e)[:2] for _ in range(12)])
    wts = torch.softmax(torch.randn(12, 2), -1)
    assert torch.equal(packed(x, idx, wts), dense(x, idx, wts))
    # experts unpacked one at a time (a small unpacking budget) give the same bits
    old, Q._UNPACK_GROUP_BYTES = Q._UNPACK_GROUP_BYTES, 1
    try:
        assert torch.equal(packed(x, idx, wts), dense(x, idx, wts))
    finally:
        Q._UNPACK_GROUP_BYTES = old
    # bf16 compute from bf16-stored biases, fp32 input on the other side: both follow the input dtype
    assert packed(x.bfloat16(), idx, wts.bfloat16()).dtype == torch.bfloat16
    # only routed experts contribute: an expert nobody picked can hold garbage
    packed.gate_up_proj_scales.data[3] = 255
    idx3 = idx.clone()
    idx3[idx3 == 3] = (idx3[idx3 == 3] + 1) % 3
    assert torch.isfinite(packed(x, idx3, wts)).all()


@pytest.mark.parametrize("shared", [True, False])
def test_mxfp4_matvec_equals_dequantized_matrix_times_x(shared, matvec_kernel):
    """The one-token packed matvec (compiled kernel, or product table) on routed experts of a bank against the
    dequantized matrices times x in float64: within fp32 rounding, whatever the chunking of the table kernel
    (rows not a multiple of the chunk)."""
    g = torch.Generator().manual_seed(3)
    n_experts, rows, groups = 5, 300, 6
    experts = torch.tensor([0, 2, 4])
    k = len(experts)
    blocks = torch.randint(0, 256, (n_experts, rows, groups, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 150, (n_experts, rows, groups), generator=g, dtype=torch.uint8)
    x = torch.randn(1 if shared else k, groups * 32, generator=g)
    dense = Q.mxfp4_dequantize(blocks, scales, torch.float64)[experts]
    ref = torch.matmul(dense, x.double().unsqueeze(-1)).squeeze(-1)
    # fp32 error bound of a dot product of length n: n · eps · sum |w x|
    bound = groups * 32 * 2 ** -24 * torch.matmul(dense.abs(), x.double().abs().unsqueeze(-1)).squeeze(-1)
    for chunk in (Q._MATVEC_CHUNK_BYTES, 7 * groups * 16):
        old, Q._MATVEC_CHUNK_BYTES = Q._MATVEC_CHUNK_BYTES, chunk
        try:
            ours = Q.mxfp4_matvec(blocks, scales, x, experts)
        finally:
            Q._MATVEC_CHUNK_BYTES = old
        assert ours.shape == (k, rows) and ours.dtype == torch.float32
        assert ((ours.double() - ref).abs() <= bound).all()
        assert ((ours.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6
    assert len(matvec_kernel.checked) == (1 if matvec_kernel.enabled else 0)   # the compiled code really ran
    # without experts: every matrix of the bank
    whole = Q.mxfp4_matvec(blocks[experts].contiguous(), scales[experts].contiguous(), x)
    assert ((whole.double() - ref).abs() <= bound).all()
    with pytest.raises(ValueError, match=r"x \[1 or 3, 192\]"):
        Q.mxfp4_matvec(blocks, scales, torch.zeros(2, 192), experts)
    with pytest.raises(ValueError, match="blocks \\[E, rows, G, 16\\]"):
        Q.mxfp4_matvec(blocks[0], scales[0], x)
    with pytest.raises(ValueError, match="int64 experts"):
        Q.mxfp4_matvec(blocks, scales, x, experts.int())
    with pytest.raises(ValueError, match=r"in \[0, 5\), found 0\.\.5"):
        Q.mxfp4_matvec(blocks, scales, x, torch.tensor([0, 2, 5]))


def test_compiled_matvec_falls_back_to_the_table_kernel(monkeypatch):
    """Whatever goes wrong with the compiled kernel, the result is the table kernel's: a compiler failure or a
    result off by more than fp32 rounding switches it off for the process with one warning; a shape past the
    per-process limit uses the table kernel silently; LENS_COMPILED_KERNELS=0 never tries."""
    g = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (4, 64, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 130, (4, 64, 2), generator=g, dtype=torch.uint8)
    x, experts = torch.randn(1, 64, generator=g), torch.tensor([1, 3])
    ref = Q._mxfp4_matvec_table(blocks[experts], scales[experts], x)

    real_compile = torch.compile

    def broken_compile(*a, **k):
        raise RuntimeError("Compiler: cl is not found.\nmore text")

    state = Q._CompiledMatvec()
    state.enabled = True
    monkeypatch.setattr(Q, "_COMPILED_MATVEC", state)
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match=r"compiled packed-expert kernel is off .*RuntimeError: Compiler: cl is not "
                                         r"found\..*LENS_COMPILED_KERNELS=0"):
        assert torch.equal(Q.mxfp4_matvec(blocks, scales, x, experts), ref)
    assert state.enabled is False
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # switched off: no second attempt, no second warning
        assert torch.equal(Q.mxfp4_matvec(blocks, scales, x, experts), ref)

    state = Q._CompiledMatvec()             # a "compiled" function with a wrong result
    state.enabled, state.fn = True, (lambda *a: torch.zeros(2, 64))
    monkeypatch.setattr(Q, "_COMPILED_MATVEC", state)
    with pytest.warns(UserWarning, match=r"result for blocks \(4, 64, 2, 16\) is [0-9.e+-]+ from the table"):
        assert torch.equal(Q.mxfp4_matvec(blocks, scales, x, experts), ref)
    assert state.enabled is False

    state = Q._CompiledMatvec()             # past the per-process shape limit: table kernel, still enabled
    state.enabled, state.fn = True, (lambda *a: torch.zeros(2, 64))
    state.checked = {("other", i) for i in range(Q._COMPILED_SHAPES_MAX)}
    monkeypatch.setattr(Q, "_COMPILED_MATVEC", state)
    assert torch.equal(Q.mxfp4_matvec(blocks, scales, x, experts), ref) and state.enabled

    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        # dynamo's own recompile limit reached (here: 1, by another shape first): an error (→ the table kernel, one
        # warning), never dynamo's silent eager run of the expression (dense temporaries of the routed experts)
        torch._dynamo.reset()
        monkeypatch.setattr(torch, "compile", real_compile)
        monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
        state = Q._CompiledMatvec()
        state.enabled = True
        monkeypatch.setattr(Q, "_COMPILED_MATVEC", state)
        if cxx_compiler() is not None:
            Q.mxfp4_matvec(blocks[:, :32].contiguous(), scales[:, :32].contiguous(), x, experts)
            assert state.enabled and len(state.checked) == 1
            with pytest.warns(UserWarning, match="compiled packed-expert kernel is off"):
                assert torch.equal(Q.mxfp4_matvec(blocks, scales, x, experts), ref)
            assert not state.enabled
        torch._dynamo.reset()

    state = Q._CompiledMatvec()             # the environment switch: never compiled
    monkeypatch.setattr(Q, "_COMPILED_MATVEC", state)
    monkeypatch.setenv("LENS_COMPILED_KERNELS", "0")
    assert torch.equal(Q.mxfp4_matvec(blocks, scales, x, experts), ref)
    assert state.enabled is False and state.fn is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_packed_path_equals_dequantized_bank(dtype, monkeypatch, matvec_kernel):
    """One token through a packed bank on the product-table path (forced for a small bank) vs the dequantized
    bank: equal to fp32 rounding (bf16: to one bf16 rounding step of the outputs)."""
    e, d, inter = 6, 96, 64
    sd = _random_mxfp4_bank(e, d, inter, seed=9)
    packed = Q.PackedExperts(e, d, inter, device="meta", dtype=dtype)
    packed.load_state_dict(sd, assign=True)
    dense = Q.PackedExperts(e, d, inter, mode="dequantized", device="meta", dtype=torch.float64)
    dense.load_state_dict(sd, assign=True)
    monkeypatch.setattr(Q, "_MATVEC_MIN_BYTES", 0)
    calls = []
    real = Q.mxfp4_matvec
    monkeypatch.setattr(Q, "mxfp4_matvec", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = torch.randn(1, d, generator=g)
        idx = torch.randperm(e, generator=g)[:3].view(1, 3)
        wts = torch.softmax(torch.randn(1, 3, generator=g), -1)
        ours = packed(x.to(dtype), idx, wts.to(dtype))
        ref = dense(x.to(dtype).double(), idx, wts.to(dtype).double())
        assert ours.dtype == dtype and ours.shape == (1, d)
        tol = 1e-6 if dtype == torch.float32 else 2 ** -7
        assert ((ours.double() - ref).abs().max() / ref.abs().max()).item() < tol
    assert len(calls) == 6          # gate_up and down of each token went through the matvec
    assert len(matvec_kernel.checked) == (2 if matvec_kernel.enabled else 0)     # (compiled: both shapes)


def test_bank_bad_arguments():
    with pytest.raises(ValueError, match="expected 'mxfp4' or 'nvfp4'"):
        Q.PackedExperts(2, 64, 64, fmt="int4")
    with pytest.raises(ValueError, match="expected 'packed' or 'dequantized'"):
        Q.PackedExperts(2, 64, 64, mode="fast")
    with pytest.raises(ValueError, match="divisible by 32"):
        Q.PackedExperts(2, 48, 64)
