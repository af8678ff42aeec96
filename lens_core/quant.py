"""4-bit expert banks of the GPT-OSS text encoder: MXFP4 / NVFP4 unpacking and the packed expert bank.

Spec: ../shared/docs/checkpoint_formats.md §1.4 (MXFP4, the diffusers ``text_encoder/`` folder) and §2.4 + §3
(NVFP4, the Comfy-Org ``gpt_oss_20b_nvfp4.safetensors`` file); ../shared/docs/text_encoder_spec.md §1.4, §2.6.

Both formats store E2M1 4-bit codes (bit 3 = sign, ``code & 7`` → 0, .5, 1, 1.5, 2, 3, 4, 6), two per byte:
- MXFP4: ``*_blocks [E, rows, G, 16]`` uint8, **low nibble = even element**; ``*_scales [E, rows, G]`` uint8
  E8M0 exponents, one per 32 inputs: ``w = code · 2^(s − 127)``.
- NVFP4: ``.weight [E, rows, in/2]`` uint8, **high nibble = even element**; ``.weight_scale`` float8_e4m3fn,
  one per 16 inputs, stored cuBLAS-tiled per expert ``[E, Rp, Cp]``; ``.weight_scale_2 [E]`` fp32 global:
  ``w = code · fp32(scale) · global``.
The dequantized result is always the ``nn.Linear`` layout ``[..., out, in]``.

:class:`PackedExperts` keeps the bytes as (non-trainable) parameters, so a host like ComfyUI's ModelPatcher
sees and moves them, and dequantizes, at each forward, only the experts the router picked, in the input's
dtype on the input's device (weights left on an offload device are copied per call, one expert at a time; a
host such as ComfyUI subclasses it to take part in its own offloading, nodes/bridge/quant.py). ``mode="dequantized"`` expands every expert once when the state dict is loaded.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from .ops import cast_to

# E2M1 value of each 4-bit code (OCP microscaling spec; checkpoint_formats.md §1.4).
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32
NVFP4_BLOCK = 16
# Dtypes in which "4-bit value × block scale" is computed directly (exact for bf16/fp32: both factors are
# representable and the product has at most 3 significant bits); anything else goes through fp32.
_DIRECT_DTYPES = (torch.bfloat16, torch.float32, torch.float64)
_MATVEC_CHUNK_BYTES = 1 << 18
# below this many packed bytes per projection, unpacking the k experts is faster (measured crossover 32–128 KB)
_MATVEC_MIN_BYTES = 1 << 16
# several tokens: routed experts are unpacked together up to this many bytes of dense weights at once (small:
# unpacking one large expert at a time and multiplying it while it is in cache is 2-3x faster than big groups)
_UNPACK_GROUP_BYTES = 1 << 20


@functools.lru_cache(maxsize=None)
def _byte_table(dtype: torch.dtype, device: str, low_first: bool) -> torch.Tensor:
    """``[256, 2]``: the two values of a packed byte in element order."""
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32)
    codes = torch.arange(256)
    lo, hi = lut[codes & 0x0F], lut[codes >> 4]
    pair = torch.stack([lo, hi] if low_first else [hi, lo], dim=-1)
    return pair.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _e8m0_table(dtype: torch.dtype, device: str) -> torch.Tensor:
    """``[256]``: 2^(s − 127) for each exponent byte (s = 255 gives inf, as a plain ldexp would)."""
    exps = torch.arange(256, dtype=torch.int32) - 127
    return torch.ldexp(torch.ones(256, dtype=torch.float32), exps).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _mxfp4_pair_table(dtype: torch.dtype, device: str) -> torch.Tensor:
    """``[65536]`` indexed by ``scale_byte · 256 + packed_byte``: the byte's two dequantized values (element
    order) stored as one 32/64-bit word, so unpacking + scaling is a single gather. Each entry is the fp32
    product rounded once to ``dtype`` (the same value as multiplying in ``dtype``: both factors are exact)."""
    pair = _byte_table(torch.float32, "cpu", True)                          # [256, 2]
    scale = _e8m0_table(torch.float32, "cpu")                               # [256]
    vals = (scale.view(256, 1, 1) * pair.view(1, 256, 2)).to(dtype).contiguous()
    word = torch.int32 if vals.element_size() == 2 else torch.int64
    return vals.view(word).reshape(65536).to(device)


def _work_dtype(dtype):
    return dtype if dtype in _DIRECT_DTYPES else torch.float32


def _unpack_codes(packed: torch.Tensor, dtype, low_first: bool) -> torch.Tensor:
    """``[..., n]`` bytes → ``[..., 2n]`` E2M1 values."""
    table = _byte_table(dtype, str(packed.device), low_first)
    # index_select (a row gather) is several times faster on CPU than advanced indexing with the same result
    pairs = table.index_select(0, packed.reshape(-1).int())
    return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16,
                     work: dict | None = None) -> torch.Tensor:
    """MXFP4 ``blocks [..., rows, G, 16]`` + E8M0 ``scales [..., rows, G]`` → ``[..., rows, G·32]`` in ``dtype``.

    Bit-identical to transformers' ``convert_moe_packed_tensors`` (up to its final transpose) for bf16/fp32.
    ``work``: a dict in which the index and result buffers are kept for the next call of the same shape (the
    result is then overwritten by that call; ≈ 25 % faster than fresh multi-MB buffers, page-faulted on first
    touch).
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4: expected uint8 blocks and scales, found {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != MXFP4_BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4: expected blocks [..., G, 16] and scales [..., G] with the same leading shape, "
                         f"found blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)}")
    if dtype in (torch.bfloat16, torch.float16, torch.float32):
        table = _mxfp4_pair_table(dtype, str(blocks.device))
        key = (tuple(blocks.shape), dtype, blocks.device)
        if work is not None and work.get("key") == key:
            index, words = work["index"], work["words"]
        else:
            index = torch.empty(blocks.shape, dtype=torch.int32, device=blocks.device)
            words = torch.empty(blocks.numel(), dtype=table.dtype, device=blocks.device)
            if work is not None:
                work.update(key=key, index=index, words=words)
        # int32 [..., G, 16] = scale · 256 + byte, built in place (a mixed uint8 + int32 sum is 10x slower)
        index.copy_(blocks)
        index.add_(scales.to(torch.int32).mul_(256).unsqueeze(-1))
        torch.index_select(table, 0, index.reshape(-1), out=words)
        return words.view(dtype).reshape(*blocks.shape[:-2], blocks.shape[-2] * MXFP4_BLOCK)
    work = _work_dtype(dtype)
    values = _unpack_codes(blocks, work, low_first=True)                    # [..., G, 32]
    scale = _e8m0_table(work, str(scales.device)).index_select(0, scales.reshape(-1).int()).reshape(scales.shape)
    out = (values * scale.unsqueeze(-1)).reshape(*blocks.shape[:-2], blocks.shape[-2] * MXFP4_BLOCK)
    return out.to(dtype)


@functools.lru_cache(maxsize=None)
def _pair_offsets(n_tables: int, pairs: int, device: str) -> torch.Tensor:
    """int32 ``[n_tables, pairs]``: ``(t · pairs + j) · 256``, the start of row ``j`` of product table ``t``."""
    return (torch.arange(n_tables * pairs, dtype=torch.int32) * 256).reshape(n_tables, pairs).to(device)


def _e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """int32 4-bit codes → their E2M1 values in fp32, by arithmetic instead of a table (inductor turns this
    into vector code; a gathered table stays scalar): with ``m = code & 7``, ``|v| = m/2 + relu(m − 4)/2 +
    relu(m − 6)`` gives 0, .5, 1, 1.5, 2, 3, 4, 6 exactly, and bit 3 negates."""
    m = (codes & 7).float()
    v = 0.5 * m + 0.5 * torch.relu(m - 4.0) + torch.relu(m - 6.0)
    return torch.where((codes & 8) != 0, -v, v)


def _mxfp4_matvec_fused(blocks, scales, experts, x_even, x_odd, scale_table):
    """:func:`mxfp4_matvec` as one expression for ``torch.compile``: the routed experts' bytes read in place
    from the bank, each decoded in registers (both nibbles), times its inputs and its block's scale, summed
    over the row in one fused loop; nothing is written but the ``[k, rows]`` result. ``x_even`` / ``x_odd``:
    ``[n, 1, G, 16]``."""
    b = blocks[experts].to(torch.int32)
    scale = scale_table[scales[experts].to(torch.int32)].unsqueeze(-1)
    return ((_e2m1_values(b & 15) * x_even + _e2m1_values(b >> 4) * x_odd) * scale).sum((-1, -2))


def _no_eager_fallback():
    """While calling the compiled kernel: past dynamo's recompile limit, raise (→ the table kernel) instead of
    running :func:`_mxfp4_matvec_fused` eagerly, which would expand the experts into several dense temporaries."""
    cfg = torch._dynamo.config
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        return cfg.patch(fail_on_recompile_limit_hit=True)
    return contextlib.nullcontext()


# distinct matrix shapes compiled per process (a model has two: gate_up and down); torch's recompile limit is 8
_COMPILED_SHAPES_MAX = 6


class _CompiledMatvec:
    """The compiled form of :func:`_mxfp4_matvec_fused`, used by :func:`mxfp4_matvec` on the CPU when
    torch.compile works here (inductor needs a C++ compiler). It reads the packed bytes once and decodes them
    in vector registers: 3–5× faster than the product-table kernel and faster than a dense fp32 matvec,
    which reads 8× the bytes (BENCHMARKS.md, prompt enhancer, Run 3). Each new matrix shape compiles once (a
    few seconds; torch keeps the result in its on-disk cache) and is checked once against the table kernel;
    any failure (no compiler, a compile error, dynamo's recompile limit, a result off by more than fp32
    rounding) switches it off for the process with one warning, and the table kernel is used.
    ``LENS_COMPILED_KERNELS=0`` (or :func:`set_compiled_kernels`) turns it off."""

    def __init__(self):
        self.fn = None
        self.enabled = None             # None: decided on first use from LENS_COMPILED_KERNELS
        self.checked = set()

    def usable(self, device) -> bool:
        if self.enabled is None:
            self.enabled = os.environ.get("LENS_COMPILED_KERNELS", "").strip() not in ("0", "false", "no", "off")
        return self.enabled and device.type == "cpu" and not torch.compiler.is_compiling()

    def disable(self, why: str):
        self.enabled = False
        warnings.warn(f"lens_core: the compiled packed-expert kernel is off for this process ({why}); text "
                      f"generation on the CPU uses the slower table kernel. Set LENS_COMPILED_KERNELS=0 to skip "
                      f"the attempt, or install a C++ compiler (torch.compile's inductor needs one).",
                      stacklevel=3)
        return None

    def __call__(self, blocks, scales, experts, x):
        """``[k, rows]`` fp32, or None when the compiled kernel is not usable (the caller falls back)."""
        key = (tuple(blocks.shape), len(experts), x.shape[0])
        if key not in self.checked and len(self.checked) >= _COMPILED_SHAPES_MAX:
            return None     # past dynamo's recompile limit the expression would run eagerly (big temporaries)
        xv = x.float().reshape(x.shape[0], 1, blocks.shape[2], 16, 2)
        args = (blocks, scales, experts, xv[..., 0].contiguous(), xv[..., 1].contiguous(),
                _e8m0_table(torch.float32, str(blocks.device)))
        try:
            if self.fn is None:
                self.fn = torch.compile(_mxfp4_matvec_fused, dynamic=False, fullgraph=True)
            with _no_eager_fallback():
                y = self.fn(*args)
        except Exception as e:  # noqa: BLE001 — any compiler/toolchain failure means "use the eager kernel"
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return self.disable(f"{type(e).__name__}: {first}")
        if key not in self.checked:     # once per shape: the compiled code against the table kernel
            ref = _mxfp4_matvec_table(blocks.index_select(0, experts), scales.index_select(0, experts), x)
            if y.shape != ref.shape:
                return self.disable(f"it returned {tuple(y.shape)} for {tuple(ref.shape)}")
            fin = torch.isfinite(ref)   # (an E8M0 byte 255 is inf/NaN: both kernels give non-finite garbage)
            err = (y[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0
            if not err <= 1e-4 * ref[fin].abs().max().item() + 1e-30:
                return self.disable(f"its result for blocks {tuple(blocks.shape)} is {err:.3g} from the table "
                                    f"kernel's")
            self.checked.add(key)
        return y


_COMPILED_MATVEC = _CompiledMatvec()


def set_compiled_kernels(enabled: bool):
    """Turn the compiled packed-expert matvec (see :class:`_CompiledMatvec`) on or off for this process."""
    _COMPILED_MATVEC.enabled = bool(enabled)


def mxfp4_matvec(blocks: torch.Tensor, scales: torch.Tensor, x: torch.Tensor,
                 experts: torch.Tensor | None = None) -> torch.Tensor:
    """``y[i, r] = Σ_c W_e[r, c] · x[c]`` for the MXFP4 matrices ``W_e``, ``e = experts[i]``, of a bank
    (``blocks [E, rows, G, 16]``, ``scales [E, rows, G]``, the layout of :func:`mxfp4_dequantize`; ``experts``
    int64 ``[k]``, default all ``E``) without expanding them: ``x`` is ``[1, G·32]`` (one vector for all ``k``
    matrices) or ``[k, G·32]`` (one each). Returns fp32 ``[k, rows]``.

    Two kernels, the same products summed in different orders (each a few fp32 ulps from the exact sum): on
    the CPU, where torch.compile works, the compiled one of :class:`_CompiledMatvec` (the bytes decoded
    arithmetically in vector registers, read in place from the bank); otherwise the product table: for each
    input pair ``(x[2j], x[2j+1])`` a 256-entry table ``T[j, byte] = lo(byte)·x[2j] + hi(byte)·x[2j+1]``
    (``lo``/``hi``: the byte's two E2M1 values) is built once; every packed byte is then one table read, each
    16-byte block is summed and multiplied by its E8M0 scale ``2^(s − 127)``, and the blocks of a row are
    summed. The same products as the dequantized matrix times ``x`` in fp32, summed in another order (a few
    fp32 ulps apart). Meant for one token on the CPU (text generation); it reads 4.25 bits per weight where a
    dense matvec reads 32."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() != 4 or blocks.shape[-1] != 16 \
            or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"mxfp4_matvec: expected uint8 blocks [E, rows, G, 16] and scales [E, rows, G], found "
                         f"{blocks.dtype} {tuple(blocks.shape)} and {scales.dtype} {tuple(scales.shape)}")
    if experts is None:
        experts = torch.arange(blocks.shape[0], device=blocks.device)
    if experts.dtype != torch.int64 or experts.dim() != 1 or len(experts) < 1:
        raise ValueError(f"mxfp4_matvec: expected int64 experts [k], k >= 1, found {experts.dtype} "
                         f"{tuple(experts.shape)}")
    lo, hi = int(experts.min()), int(experts.max())
    if lo < 0 or hi >= blocks.shape[0]:
        raise ValueError(f"mxfp4_matvec: expert indices must be in [0, {blocks.shape[0]}), found {lo}..{hi}")
    k, groups = len(experts), blocks.shape[2]
    pairs = groups * 16
    if x.dim() != 2 or x.shape[0] not in (1, k) or x.shape[1] != 2 * pairs:
        raise ValueError(f"mxfp4_matvec: expected x [1 or {k}, {2 * pairs}], found {tuple(x.shape)}")
    experts = experts.to(blocks.device)
    if _COMPILED_MATVEC.usable(blocks.device):
        y = _COMPILED_MATVEC(blocks, scales, experts, x)
        if y is not None:
            return y
    return _mxfp4_matvec_table(blocks.index_select(0, experts), scales.index_select(0, experts), x)


def _mxfp4_matvec_table(blocks: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The product-table kernel of :func:`mxfp4_matvec` (arguments already checked)."""
    k, rows, groups, _ = blocks.shape
    pairs = groups * 16
    dev, n = str(blocks.device), x.shape[0]
    pair = _byte_table(torch.float32, dev, True)                              # [256, 2]
    xf = x.float().reshape(n, pairs, 2, 1)
    table = torch.addcmul(pair[:, 0] * xf[:, :, 0], pair[:, 1], xf[:, :, 1]).reshape(-1)   # [n · pairs · 256]
    offsets = _pair_offsets(n, pairs, dev)
    # rows in chunks of ~256 KB of bytes: the int32 indices and the picked products stay in cache (3x faster
    # than whole matrices at GPT-OSS-20B sizes)
    step = max(1, _MATVEC_CHUNK_BYTES // pairs)
    index = torch.empty(min(step, rows), pairs, dtype=torch.int32, device=blocks.device)
    picked = torch.empty(index.numel(), dtype=torch.float32, device=blocks.device)
    ones = torch.ones(16, dtype=torch.float32, device=blocks.device)
    block_sums = torch.empty(k, rows, groups, dtype=torch.float32, device=blocks.device)
    flat = blocks.reshape(k, rows, pairs)
    for e in range(k):
        off = offsets[e if n == k else 0]
        for r0 in range(0, rows, step):
            m = min(step, rows - r0)
            idx, got = index[:m], picked[: m * pairs]
            idx.copy_(flat[e, r0:r0 + m])                                     # byte values as int32
            idx.add_(off)                                                     # + row start of its pair's table
            torch.index_select(table, 0, idx.view(-1), out=got)               # one product per byte
            torch.mv(got.view(-1, 16), ones, out=block_sums[e, r0:r0 + m].view(-1))
    scale = _e8m0_table(torch.float32, dev).index_select(0, scales.reshape(-1).int()).view(k, rows, groups)
    return (block_sums * scale).sum(-1)


def ceil_to(n: int, m: int) -> int:
    """``n`` rounded up to a multiple of ``m``."""
    return -(-n // m) * m


def tiled_scale_shape(rows: int, cols: int) -> tuple[int, int]:
    """Stored shape ``[128·⌈rows/128⌉, 4·⌈cols/4⌉]`` of a cuBLAS-tiled ``[rows, cols]`` block-scale matrix
    (comfy-kitchen ``to_blocked``; checkpoint_formats.md §2.4)."""
    return ceil_to(rows, 128), ceil_to(cols, 4)


@functools.lru_cache(maxsize=64)
def _untile_index(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """The flat offsets (int64 ``[rows·cols]``, on ``device``) of :func:`untile_block_scales`: built once per
    shape and device (a layer un-tiles its scales on every call without comfy-kitchen). Never modified."""
    cp = tiled_scale_shape(rows, cols)[1]
    r = torch.arange(rows, device=device).unsqueeze(1)
    c = torch.arange(cols, device=device).unsqueeze(0)
    tile = (r // 128) * (cp // 4) + c // 4
    return (tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + (c % 4)).reshape(-1)


def untile_block_scales(tiled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Undo ComfyUI's cuBLAS 128×4 block-scale tiling (checkpoint_formats.md §2.4).

    ``tiled``: ``[Rp, Cp]`` or per expert ``[E, Rp, Cp]`` with ``Rp = 128·⌈rows/128⌉``, ``Cp = 4·⌈cols/4⌉``.
    Returns the logical ``[..., rows, cols]`` scales (same dtype). The byte of logical (r, c) sits at
    ``t·512 + (r mod 32)·16 + ((r mod 128) // 32)·4 + (c mod 4)`` with ``t = (r // 128)·(Cp/4) + c // 4``.
    """
    rp, cp = tiled_scale_shape(rows, cols)
    if tiled.dim() not in (2, 3) or tuple(tiled.shape[-2:]) != (rp, cp):
        raise ValueError(f"tiled block scales: expected [..., {rp}, {cp}] for a logical [{rows}, {cols}] matrix, "
                         f"found {tuple(tiled.shape)}")
    flat = tiled.reshape(*tiled.shape[:-2], rp * cp)
    return flat[..., _untile_index(rows, cols, tiled.device)].reshape(*tiled.shape[:-2], rows, cols)


def _as_e4m3(scales: torch.Tensor) -> torch.Tensor:
    if scales.dtype == torch.float8_e4m3fn:
        return scales
    if scales.dtype in (torch.uint8, torch.int8):
        return scales.view(torch.float8_e4m3fn)
    raise ValueError(f"NVFP4 block scales: expected float8_e4m3fn (or its raw uint8 bytes), found {scales.dtype}")


def nvfp4_dequantize(weight: torch.Tensor, block_scales: torch.Tensor, global_scale, dtype=torch.bfloat16,
                     ) -> torch.Tensor:
    """NVFP4 ``weight [..., rows, in/2]`` uint8 (high nibble = even element) with **un-tiled** E4M3
    ``block_scales [..., rows, in/16]`` and an fp32 global scale (a scalar, or one per leading index, e.g.
    ``[E]`` for a bank) → ``[..., rows, in]`` in ``dtype``. The products are computed in fp32 (accuracy) then
    rounded once to ``dtype``; ComfyUI's eager kernel multiplies the scales in the output dtype first, which
    can differ by one rounding step."""
    if weight.dtype != torch.uint8:
        raise ValueError(f"NVFP4 weight: expected uint8 packed codes, found {weight.dtype}")
    block_scales = _as_e4m3(block_scales)
    n_in = weight.shape[-1] * 2
    if n_in % NVFP4_BLOCK or tuple(block_scales.shape) != (*weight.shape[:-1], n_in // NVFP4_BLOCK):
        raise ValueError(f"NVFP4: expected block scales {(*weight.shape[:-1], n_in // NVFP4_BLOCK)} for weight "
                         f"{tuple(weight.shape)}, found {tuple(block_scales.shape)}")
    values = _unpack_codes(weight, torch.float32, low_first=False)
    values = values.reshape(*weight.shape[:-1], n_in // NVFP4_BLOCK, NVFP4_BLOCK)
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=weight.device)
    g = g.reshape(*g.shape, *([1] * (weight.dim() - g.dim())))               # broadcast over rows / blocks
    scale = block_scales.to(torch.float32) * g
    return (values * scale.unsqueeze(-1)).reshape(*weight.shape[:-1], n_in).to(dtype)


def nvfp4_bank_tensors(proj: str, weight, weight_scale, weight_scale_2, bias=None) -> dict:
    """Turn one NVFP4 expert bank of the Comfy-Org GPT-OSS file (``layers.i.mlp.experts.<proj>.weight``,
    ``.weight_scale``, ``.weight_scale_2``, ``.bias``) into the tensors :class:`PackedExperts` holds in
    ``fmt="nvfp4"``: ``{proj}_blocks`` uint8 ``[E, out, in/2]``, ``{proj}_scales`` float8_e4m3fn ``[E, out, in/16]``
    (un-tiled), ``{proj}_scales_2`` fp32 ``[E]`` and ``{proj}_bias`` (unchanged, if given)."""
    if weight.dtype != torch.uint8 or weight.dim() != 3:
        raise ValueError(f"{proj}.weight: expected a uint8 [E, out, in/2] NVFP4 bank, found {weight.dtype} "
                         f"{tuple(weight.shape)}")
    e, rows, half = weight.shape
    scales = untile_block_scales(_as_e4m3(weight_scale), rows, half * 2 // NVFP4_BLOCK)
    g = torch.as_tensor(weight_scale_2, dtype=torch.float32)
    if g.numel() == 1:
        g = g.reshape(1).expand(e).clone()
    if tuple(g.shape) != (e,):
        raise ValueError(f"{proj}.weight_scale_2: expected a scalar or [{e}] global scales, found {tuple(g.shape)}")
    out = {f"{proj}_blocks": weight, f"{proj}_scales": scales.contiguous(), f"{proj}_scales_2": g}
    if bias is not None:
        out[f"{proj}_bias"] = bias
    return out


def nvfp4_state_dict_to_lens(state_dict: dict) -> dict:
    """Map a Comfy-Org ``gpt_oss_20b_nvfp4.safetensors`` state dict (keys without ``model.``) to the keys of a
    ``LensTextEncoder(..., expert_format="nvfp4")``: adds ``model.``, converts each expert bank with
    :func:`nvfp4_bank_tensors`, drops ``*.comfy_quant`` markers and the ``tokenizer_json`` blob (read it
    separately with ``lens_core.prompt.load_tokenizer``). Tensors are not copied except the un-tiled scales."""
    out, banks = {}, {}
    for key, t in state_dict.items():
        if key == "tokenizer_json" or key.endswith(".comfy_quant"):
            continue
        for proj in ("gate_up_proj", "down_proj"):
            marker = f".mlp.experts.{proj}."
            if marker in key:
                prefix, leaf = key.split(marker)
                banks.setdefault((prefix + ".mlp.experts.", proj), {})[leaf] = t
                break
        else:
            out[key if key.startswith("model.") or key.startswith("lm_head") else "model." + key] = t
    for (prefix, proj), parts in banks.items():
        missing = {"weight", "weight_scale", "weight_scale_2"} - set(parts)
        if missing:
            raise ValueError(f"NVFP4 expert bank {prefix}{proj}: expected weight, weight_scale and weight_scale_2, "
                             f"missing {sorted(missing)}")
        tensors = nvfp4_bank_tensors(proj, parts["weight"], parts["weight_scale"], parts["weight_scale_2"],
                                     parts.get("bias"))
        base = prefix if prefix.startswith("model.") else "model." + prefix
        out.update({base + name: t for name, t in tensors.items()})
    return out


def swiglu_clamped(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS activation on interleaved ``[gate0, up0, gate1, up1, …]``: gate clamped above, up clamped both
    ways, ``(up + 1) · gate · sigmoid(alpha · gate)`` (text_encoder_spec.md §2.6)."""
    gate = gate_up[..., 0::2].clamp(max=limit)
    act = torch.mul(gate, alpha).sigmoid_().mul_(gate)         # gate · sigmoid(alpha · gate)
    del gate
    # in place (3 new tensors instead of 7: a fresh multi-MB tensor is page-faulted on first touch)
    return gate_up[..., 1::2].clamp(min=-limit, max=limit).add_(1).mul_(act)


class ExpertCache:
    """Dequantized experts kept for one-token steps (text generation): least-recently-used, at most ``max_bytes``
    of dense weights in all. Memory for time: a hit multiplies an expert's dense weight (as fast as
    ``experts="dequantized"``), a miss unpacks the expert once (about 4x a packed matvec) and stores it. Shared by
    the banks of one encoder (:meth:`lens_core.text_encoder.LensTextEncoder.set_expert_cache`)."""

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"expert cache: expected max_bytes as an int >= 0, found {max_bytes!r}")
        self.max_bytes, self.nbytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self._entries = collections.OrderedDict()

    def get(self, bank, proj: str, expert: int, dtype, device) -> torch.Tensor:
        key = (id(bank), proj, expert, dtype, str(device))
        w = self._entries.get(key)
        if w is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return w
        self.misses += 1
        w = bank.dequantize_expert(proj, expert, dtype, device)
        size = w.numel() * w.element_size()
        if size <= self.max_bytes:
            while self.nbytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.numel() * old.element_size()
            self._entries[key] = w
            self.nbytes += size
        return w

    def clear(self):
        self._entries.clear()
        self.nbytes = 0


class PackedExperts(nn.Module):
    """The ``mlp.experts`` bank of one GPT-OSS layer with 4-bit weights kept packed.

    Parameter names are the on-disk MXFP4 keys (``gate_up_proj_blocks``, ``gate_up_proj_scales``,
    ``gate_up_proj_bias``, ``down_proj_*``); ``fmt="nvfp4"`` holds the converted NVFP4 tensors of
    :func:`nvfp4_bank_tensors` instead (plus ``*_scales_2``). All packed tensors are ``requires_grad=False``
    parameters. ``mode="dequantized"`` replaces them by dense ``gate_up_proj``/``down_proj`` ``[E, out, in]`` in
    ``dtype`` as soon as the packed tensors are loaded (or on :meth:`dequantize_`).

    ``forward(x [N, D], router_indices [N, k], routing_weights [N, k]) -> [N, D]``.
    """

    def __init__(self, num_experts, hidden_size, intermediate_size, alpha=1.702, limit=7.0, fmt="mxfp4",
                 mode="packed", device=None, dtype=None):
        super().__init__()
        if fmt not in ("mxfp4", "nvfp4"):
            raise ValueError(f"expert format: expected 'mxfp4' or 'nvfp4', found {fmt!r}")
        if mode not in ("packed", "dequantized"):
            raise ValueError(f"experts: expected 'packed' or 'dequantized', found {mode!r}")
        block = MXFP4_BLOCK if fmt == "mxfp4" else NVFP4_BLOCK
        for n in (hidden_size, intermediate_size):
            if n % block:
                raise ValueError(f"{fmt} experts: expected hidden/intermediate sizes divisible by {block}, found {n}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.alpha, self.limit, self.fmt, self.mode = alpha, limit, fmt, mode
        self.dense_dtype = dtype or torch.bfloat16
        shapes = {"gate_up_proj": (2 * intermediate_size, hidden_size), "down_proj": (hidden_size, intermediate_size)}

        def frozen(*shape, dt):
            return nn.Parameter(torch.empty(*shape, device=device, dtype=dt), requires_grad=False)

        for proj, (rows, cols) in shapes.items():
            if fmt == "mxfp4":
                setattr(self, f"{proj}_blocks", frozen(num_experts, rows, cols // 32, 16, dt=torch.uint8))
                setattr(self, f"{proj}_scales", frozen(num_experts, rows, cols // 32, dt=torch.uint8))
            else:
                setattr(self, f"{proj}_blocks", frozen(num_experts, rows, cols // 2, dt=torch.uint8))
                setattr(self, f"{proj}_scales", frozen(num_experts, rows, cols // 16, dt=torch.float8_e4m3fn))
                setattr(self, f"{proj}_scales_2", frozen(num_experts, dt=torch.float32))
            setattr(self, f"{proj}_bias", frozen(num_experts, rows, dt=dtype or torch.bfloat16))

    @property
    def is_packed(self) -> bool:
        return hasattr(self, "gate_up_proj_blocks")

    def _packed_names(self, proj):
        names = [f"{proj}_blocks", f"{proj}_scales"]
        return names + [f"{proj}_scales_2"] if self.fmt == "nvfp4" else names

    def dequantize_expert(self, proj: str, e: int, dtype, device) -> torch.Tensor:
        """Dense ``[out, in]`` weight of expert ``e`` of ``proj`` in ``dtype`` on ``device``."""
        if f"{proj}_blocks" not in self._parameters:
            return cast_to(getattr(self, proj)[e], dtype, device)
        parts = [cast_to(getattr(self, n)[e], None, device) for n in self._packed_names(proj)]
        if self.fmt == "mxfp4":
            return mxfp4_dequantize(parts[0], parts[1], dtype)
        return nvfp4_dequantize(parts[0], parts[1], parts[2], dtype)

    @torch.no_grad()
    def dequantize_(self, dtype=None):
        """Expand every expert once into dense ``gate_up_proj``/``down_proj`` parameters and drop the bytes."""
        if not self.is_packed:
            return self
        dtype = dtype or self.dense_dtype
        for proj in ("gate_up_proj", "down_proj"):
            blocks = getattr(self, f"{proj}_blocks")
            rows = blocks.shape[1]
            cols = blocks.shape[2] * 32 if self.fmt == "mxfp4" else blocks.shape[2] * 2
            if blocks.device.type == "meta":
                dense = torch.empty(self.num_experts, rows, cols, device="meta", dtype=dtype)
            else:
                dense = torch.empty(self.num_experts, rows, cols, device=blocks.device, dtype=dtype)
                for e in range(self.num_experts):
                    dense[e] = self.dequantize_expert(proj, e, dtype, blocks.device)
            for n in self._packed_names(proj):
                delattr(self, n)
            setattr(self, proj, nn.Parameter(dense, requires_grad=False))
        self.mode = "dequantized"
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.mode == "dequantized" and self.is_packed and f"{prefix}gate_up_proj_blocks" in state_dict:
            self.dequantize_()

    def _experts_weight(self, proj: str, experts: torch.Tensor, dtype, device, work=None) -> torch.Tensor:
        """Dense ``[k, out, in]`` weights of the experts ``experts [k]`` in one gather + one unpacking
        (``work``: see :func:`mxfp4_dequantize`)."""
        if f"{proj}_blocks" not in self._parameters:
            return cast_to(getattr(self, proj).index_select(0, experts.to(getattr(self, proj).device)), dtype, device)
        parts = []
        one = int(experts[0]) if len(experts) == 1 else None
        for n in self._packed_names(proj):
            t = getattr(self, n)
            picked = t.narrow(0, one, 1) if one is not None else t.index_select(0, experts.to(t.device))
            parts.append(cast_to(picked, None, device))             # (one expert: read in place)
        if self.fmt == "mxfp4":
            return mxfp4_dequantize(parts[0], parts[1], dtype, work)
        return nvfp4_dequantize(parts[0], parts[1], parts[2], dtype)

    def _selected(self, name: str, experts: torch.Tensor, device, dtype=None) -> torch.Tensor:
        t = getattr(self, name)
        return cast_to(t.index_select(0, experts.to(t.device)), dtype, device)

    def _matvec_experts(self, proj: str, experts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[k, out]``: each routed expert's ``proj`` times its row of ``x`` (``[1, in]`` shared or ``[k, in]``),
        without the bias, in ``x``'s dtype. Packed MXFP4 on the CPU: :func:`mxfp4_matvec` (nothing expanded);
        dense experts: a matvec on each expert's own weight (no copy of the bank); with an :class:`ExpertCache`
        set (``self.expert_cache``), the cached dense weights; otherwise (GPU, NVFP4, or
        matrices so small that per-op overhead dominates) the k experts are dequantized and multiplied."""
        cache = self.__dict__.get("expert_cache")
        if f"{proj}_blocks" not in self._parameters:
            bank = getattr(self, proj)
            dense = lambda e: cast_to(bank[e], x.dtype, x.device)  # noqa: E731
        elif cache is not None:
            dense = lambda e: cache.get(self, proj, e, x.dtype, x.device)  # noqa: E731
        else:
            dense = None
        if dense is not None:  # one matvec per expert on its own dense weight (no copy of the bank)
            return torch.stack([torch.matmul(x[min(i, x.shape[0] - 1)], dense(e).t())
                                for i, e in enumerate(experts.tolist())])
        blocks = getattr(self, f"{proj}_blocks")
        if self.fmt == "mxfp4" and x.device.type == "cpu" and \
                len(experts) * blocks[0].numel() >= _MATVEC_MIN_BYTES:
            if blocks.device == x.device:   # the bank read in place
                y = mxfp4_matvec(blocks, getattr(self, f"{proj}_scales"), x, experts)
            else:                           # offloaded: copy only the routed experts
                y = mxfp4_matvec(self._selected(f"{proj}_blocks", experts, x.device),
                                 self._selected(f"{proj}_scales", experts, x.device), x)
            return y.to(x.dtype)
        w = self._experts_weight(proj, experts, x.dtype, x.device)                        # [k, out, in]
        return torch.matmul(x.unsqueeze(1), w.transpose(1, 2)).squeeze(1)

    def _forward_one_token(self, x, router_indices, routing_weights):
        """One token (text generation): the k routed experts' matvecs, the packed ones read in place."""
        experts, order = torch.sort(router_indices[0])
        w = routing_weights[0, order]
        b_gu = self._selected("gate_up_proj_bias", experts, x.device, x.dtype)
        act = swiglu_clamped(self._matvec_experts("gate_up_proj", experts, x) + b_gu, self.alpha, self.limit)
        b_d = self._selected("down_proj_bias", experts, x.device, x.dtype)
        y = (self._matvec_experts("down_proj", experts, act) + b_d) * w[:, None].to(x.dtype)       # [k, D]
        out = torch.zeros_like(x)
        for i in range(y.shape[0]):     # accumulate in expert order, like the per-expert loop
            out += y[i]
        return out

    def _grouped_matmul(self, proj, experts, bounds, inp, out, bias):
        """``out[a:b] = inp[a:b] @ W_e.T + bias[i]`` (the matmul, then the bias as its own rounding step) for the
        ``i``-th routed expert ``e`` and ``a, b = bounds[i:i+2]``; the experts are unpacked a few at a time (at
        most ``_UNPACK_GROUP_BYTES`` of dense weights at once)."""
        if f"{proj}_blocks" not in self._parameters:           # dense bank: each expert's own weight, no copy
            bank = getattr(self, proj)
            for i, e in enumerate(experts.tolist()):
                a, b = bounds[i], bounds[i + 1]
                torch.matmul(inp[a:b], cast_to(bank[e], inp.dtype, inp.device).t(), out=out[a:b])
                out[a:b] += bias[i]
            return
        rows = out.shape[1]
        per_expert = rows * inp.shape[1] * inp.element_size()
        group = max(1, _UNPACK_GROUP_BYTES // per_expert)
        work = {}       # one set of unpacking buffers for all groups of this call
        for g0 in range(0, len(experts), group):
            w = self._experts_weight(proj, experts[g0:g0 + group], inp.dtype, inp.device, work)  # [g, out, in]
            for i in range(w.shape[0]):
                a, b = bounds[g0 + i], bounds[g0 + i + 1]
                torch.matmul(inp[a:b], w[i].t(), out=out[a:b])
                out[a:b] += bias[g0 + i]
            del w

    def forward(self, x: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor):
        if x.shape[0] == 1 and router_indices.shape[-1] > 1:
            return self._forward_one_token(x, router_indices, routing_weights)
        # Several tokens: the (token, slot) pairs sorted by expert so each routed expert multiplies one contiguous
        # slice (experts unpacked a few at a time, see _grouped_matmul), biases / activation / routing weights
        # applied once over all pairs. Per element the same operations in the same order as one expert at a time
        # (matmul, then the bias as a separate rounding step: bit-identical to transformers in bf16), and the
        # sum over a token's experts in expert order (index_add_ follows the sorted order).
        k = router_indices.shape[1]
        flat = router_indices.reshape(-1)
        experts, counts = torch.unique(flat, return_counts=True)
        order = torch.argsort(flat, stable=True)
        tok = torch.div(order, k, rounding_mode="floor")
        bounds = [0] + torch.cumsum(counts, 0).tolist()
        # (the bias additions and the routing-weight product run in place: same values, fewer fresh tensors)
        xs = x.index_select(0, tok)
        h = torch.empty(flat.shape[0], 2 * self.intermediate_size, dtype=x.dtype, device=x.device)
        self._grouped_matmul("gate_up_proj", experts, bounds, xs, h,
                             self._selected("gate_up_proj_bias", experts, x.device, x.dtype))
        del xs
        act = swiglu_clamped(h, self.alpha, self.limit)
        del h
        y = torch.empty(flat.shape[0], self.hidden_size, dtype=x.dtype, device=x.device)
        self._grouped_matmul("down_proj", experts, bounds, act, y,
                             self._selected("down_proj_bias", experts, x.device, x.dtype))
        del act
        y.mul_(routing_weights.reshape(-1).index_select(0, order)[:, None])
        out = torch.zeros_like(x)
        out.index_add_(0, tok, y.to(x.dtype))
        return out

    def extra_repr(self):
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"fmt={self.fmt}, mode={self.mode}")
